"""`restage augment` on an untrusted manifest (issue 9): local files outside the manifest's
folder, internal hosts and a redirect to one are refused by policy without a single request,
and the good products beside them finish."""

from __future__ import annotations

import io
import json
import shutil

import pandas as pd
import pytest
from conftest import EXAMPLES
from http_sources import recording_server
from PIL import Image

from pipelines.augment import augment
from ray_app import storage
from ray_app.config import load_config
from ray_app.sources import REFUSED

PUBLIC = "127.0.0.2"  # stands for a public image host: exempted through allowed_networks


def _gif(frames: int = 3) -> bytes:
    images = [Image.new("RGB", (96, 96), (40 * i, 90, 160)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=50)
    return buf.getvalue()


@pytest.mark.slow
def test_refused_sources_get_no_request_and_good_products_finish(ray_local, tmp_path):
    vendor = tmp_path / "vendor"  # the manifest's folder: its tree is trusted
    shutil.copytree(EXAMPLES / "products" / "mug-red-001", vendor / "mug")
    (vendor / "mug" / "spin.gif").write_bytes(_gif())
    (tmp_path / "secret.png").write_bytes((vendor / "mug" / "00-white.jpg").read_bytes())
    jpeg = (EXAMPLES / "products" / "bottle-teal-002" / "00-white.jpg").read_bytes()
    with recording_server() as internal, recording_server(PUBLIC) as public:
        internal.serve("/secret.png", jpeg, "image/jpeg")
        bad = {
            "file-uri": f"file://{tmp_path / 'secret.png'}",
            "absolute": "/etc/passwd",
            "escaping-relative": "../../../../../../etc/hostname",
            "escaping-sibling": "../secret.png",
            "loopback-http": internal.url("/secret.png"),
            "link-local": "http://169.254.169.254/latest/meta-data/iam/",
            "redirect-to-loopback": public.redirect("/moved.png", internal.url("/secret.png")),
        }
        good_http = public.serve("/bottle.jpg", jpeg, "image/jpeg")
        rows = [
            {
                "product_id": "mug-good",
                "category": "mug",
                "image_uris": ["mug/00-white.jpg", "mug/spin.gif", bad["escaping-sibling"]],
            },
            {
                "product_id": "bottle-http",
                "category": "Flacon <b>@admin</b> x=1\x1b[31m",  # free text: never raw in prompts
                "image_uris": [good_http],
            },
            *({"product_id": f"bad-{name}", "image_uris": [uri]} for name, uri in bad.items()),
        ]
        manifest = vendor / "products.jsonl"
        storage.write_bytes(str(manifest), "".join(json.dumps(r) + "\n" for r in rows).encode())
        config = load_config(
            "tiny",
            overrides=[
                "ray.progress_bars=false",
                "augment.views.enabled=false",  # not what this test is about; saves a stage
                "storage.allowed_sources=['http://']",
                f"storage.http.allowed_networks=['{PUBLIC}/32']",
            ],
        )
        summary = augment(config, str(manifest), str(tmp_path / "out"))
        assert internal.log == []  # not one request reached the internal server
        assert public.log.count("/moved.png") == 1 and "/bottle.jpg" in public.log

    errors = storage.read_parquet(str(tmp_path / "out" / "errors")).to_pandas()
    decode = errors[errors.stage == "decode"]
    refused = decode[decode.item.notna()]
    # Items are the URIs as the manifest resolved them (relative to its folder).
    expected = {storage.resolve_relative(uri, str(vendor)) for uri in bad.values()}
    assert set(refused.item) == expected, refused[["item", "reason"]]
    assert refused.reason.str.startswith(REFUSED).all(), refused.reason.tolist()
    # No size, no existence: the reasons never carry what a read would have learnt.
    assert not refused.reason.str.contains("bytes|not found|exist", regex=True).any()
    assert summary.products["ok"] + summary.products["partial"] == 2
    assert summary.products["failed"] == len(bad)
    table = storage.read_parquet(str(tmp_path / "out" / "manifest")).to_pandas()
    assert set(table.product_id) == {"mug-good", "bottle-http"}
    reals = table[table.kind == "real"].set_index("origin_uri")
    gif = str(vendor / "mug" / "spin.gif")
    assert reals.loc[gif, "origin_frames"] == 3  # an animation: its first frame, recorded
    contexts = table[(table.product_id == "bottle-http") & (table.kind == "context")]
    prompts = " ".join(contexts.prompt)  # bank scenes filled with the product's noun
    assert "flacon" in prompts and not set("<>@=\x1b") & set(prompts)
    assert pd.isna(reals.loc[str(vendor / "mug" / "00-white.jpg"), "origin_frames"])  # a still
