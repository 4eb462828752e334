"""The source policy of untrusted manifests (ray_app/sources.py): what is allowed, what is
refused, and that a refusal never touches its target."""

from __future__ import annotations

import io
import os

import pytest
from http_sources import recording_server
from PIL import Image

from ray_app import storage
from ray_app.config import ConfigError, load_config
from ray_app.records import validate_record
from ray_app.sources import REFUSED, HttpOptions, SourcePolicy, SourceRefused, address_refusal

EXEMPT = "127.0.0.2"  # the "public" server of these tests: exempt through allowed_networks


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """A manifest folder with an image, a sibling folder outside it, and a link out."""
    folder = tmp_path / "vendor"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(_png())
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.png").write_bytes(_png())
    (tmp_path / "vendor-evil").mkdir()
    os.symlink(tmp_path / "secret" / "key.png", folder / "img" / "link.png")
    manifest = folder / "products.jsonl"
    manifest.write_text("")
    return folder, manifest


def _policy(manifest, *allowed: str, networks: tuple[str, ...] = ()) -> SourcePolicy:
    cfg = load_config(
        "tiny",
        overrides=[
            f"storage.allowed_sources={list(allowed)}",
            f"storage.http.allowed_networks={list(networks)}",
            "storage.http.max_redirects=2",
            "storage.http.max_bytes=100000",
        ],
    )
    return SourcePolicy.for_manifest(str(manifest), cfg.storage)


def _uri(raw: str, folder) -> str:
    """A manifest entry resolved as records resolve it (relative to the manifest folder)."""
    rec = validate_record({"product_id": "p", "image_uris": [raw]}, str(folder))
    return rec.image_uris[0]


def test_the_manifest_folder_tree_is_allowed(tree):
    folder, manifest = tree
    policy = _policy(manifest)
    assert policy.read(_uri("img/a.png", folder)) == _png()
    assert policy.read(f"file://{folder}/img/a.png") == _png()
    assert policy.read(_uri("img/../img/a.png", folder)) == _png()


@pytest.mark.parametrize(
    "raw",
    [
        "../secret/key.png",  # relative, escaping the manifest folder
        "img/../../secret/key.png",
        "../../../../../../etc/hostname",
        "/etc/passwd",
        "file:///etc/passwd",
        "FILE:///etc/shadow",
        "local:///etc/passwd",
        "../vendor-evil/x.png",  # a sibling whose name starts like the folder's
        "img/link.png",  # a symlink inside the tree that points outside it
        "http://127.0.0.1:9/a.png",  # http(s) is off unless listed
        "https://example.com/a.png",
        "s3://bucket/a.png",  # a bucket nobody named
        "simplecache::file:///etc/passwd",
        "memory://x/a.png",
    ],
)
def test_outside_the_allowed_sources_is_refused(tree, raw):
    folder, manifest = tree
    policy = _policy(manifest)
    with pytest.raises(SourceRefused, match=f"^{REFUSED}"):
        policy.read(_uri(raw, folder))


def test_a_refusal_does_not_reveal_whether_the_target_exists(tree, tmp_path):
    _, manifest = tree
    policy = _policy(manifest)
    messages = []
    for path in (tmp_path / "secret" / "key.png", tmp_path / "secret" / "missing.png"):
        with pytest.raises(SourceRefused) as err:
            policy.read(str(path))
        messages.append(str(err.value).replace(path.name, "NAME"))
    assert messages[0] == messages[1]
    assert str(len(_png())) not in messages[0]


def test_named_prefixes_match_on_segment_boundaries(tree, tmp_path):
    _, manifest = tree
    policy = _policy(manifest, "s3://photos/vendor-a", str(tmp_path / "secret"))
    assert policy.check("s3://photos/vendor-a/x.png") == "s3://photos/vendor-a/x.png"
    assert policy.read(str(tmp_path / "secret" / "key.png")) == _png()
    for uri in (
        "s3://photos/vendor-ab/x.png",
        "s3://photos/other/x.png",
        "s3://photos/vendor-a/../other/x.png",
        "gs://photos/vendor-a/x.png",
    ):
        with pytest.raises(SourceRefused):
            policy.check(uri)
    assert _policy(manifest, "s3://").check("s3://any/key.png") == "s3://any/key.png"
    https = _policy(manifest, "HTTPS://CDN.Example.com/")
    assert https.check("https://cdn.EXAMPLE.com/a.png") == "https://cdn.example.com/a.png"
    with pytest.raises(SourceRefused):
        https.check("https://cdn.example.com.evil.net/a.png")


@pytest.mark.parametrize(
    "entry", ["photos", "s3://b::x", "s3://bucket/../other", "file://relative/x", "https://user@"]
)
def test_bad_allowed_sources_name_the_key(entry):
    with pytest.raises(ConfigError, match=r"storage\.allowed_sources"):
        load_config("tiny", overrides=[f"storage.allowed_sources=['{entry}']"])


def test_bad_allowed_networks_name_the_key():
    with pytest.raises(ConfigError, match=r"storage\.http\.allowed_networks"):
        load_config("tiny", overrides=["storage.http.allowed_networks=['10.0.0.0/99']"])


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("fd00:ec2::254", "private"),
        ("100.64.0.1", "public"),  # carrier-grade NAT
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address, kind):
    assert kind in address_refusal(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


def test_allowed_networks_exempt_only_what_they_name():
    assert address_refusal("10.2.3.4", ("10.2.0.0/16",)) is None
    assert "private" in address_refusal("10.3.0.1", ("10.2.0.0/16",))


def test_a_host_resolving_to_any_internal_address_is_refused(tree):
    _, manifest = tree
    policy = _policy(manifest, "https://cdn.example.com")
    mixed = lambda host, port: ["93.184.215.14", "169.254.169.254"]  # noqa: E731
    with pytest.raises(SourceRefused, match=r"169\.254\.169\.254, a link-local"):
        policy.read("https://cdn.example.com/a.png", resolve=mixed)
    with pytest.raises(SourceRefused, match="outside"):  # a host that is not listed
        policy.read("https://cdn.example.org/a.png", resolve=mixed)


def test_http_is_fetched_from_listed_hosts_and_refused_internal_targets_get_no_request(tree):
    _, manifest = tree
    with recording_server() as internal, recording_server(EXEMPT) as public:
        secret = internal.serve("/secret.png", _png())
        good = public.serve("/a.png", _png())
        policy = _policy(manifest, "http://", networks=(f"{EXEMPT}/32",))
        assert policy.read(good) == _png()
        public.redirect("/moved.png", "/a.png")
        assert policy.read(public.url("/moved.png")) == _png()  # a checked redirect
        to_internal = public.redirect("/r1.png", secret)
        to_metadata = public.redirect("/r2.png", "http://169.254.169.254/latest/meta-data/")
        to_file = public.redirect("/r3.png", "file:///etc/passwd")
        for uri in (secret, "http://[::1]:9/a.png", "http://169.254.169.254/x", to_internal):
            with pytest.raises(SourceRefused, match=REFUSED):
                policy.read(uri)
        with pytest.raises(SourceRefused, match="link-local"):
            policy.read(to_metadata)
        with pytest.raises(SourceRefused, match="another scheme"):
            policy.read(to_file)
        public.redirect("/loop.png", "/loop.png")
        with pytest.raises(SourceRefused, match="more than 2 redirects"):
            policy.read(public.url("/loop.png"))
        big = public.serve("/big.png", b"x" * 100001)
        with pytest.raises(OSError, match="max_bytes"):
            policy.read(big)
        assert internal.log == []
        assert "/r1.png" in public.log and "/a.png" in public.log


def test_https_never_redirects_down_to_http(monkeypatch):
    """A TLS server is not available in tests: a stub connection answers the first hop."""
    from ray_app import sources

    class Redirect:
        status, reason = 302, "Found"

        def getheader(self, name, default=None):
            return "http://cdn.example.com/a.png" if name == "Location" else default

    class Connection:
        def request(self, *args, **kwargs):
            pass

        def getresponse(self):
            return Redirect()

        def close(self):
            pass

    opened = []
    monkeypatch.setattr(sources, "_connection", lambda *args: opened.append(args) or Connection())
    policy = SourcePolicy(roots=("https://", "http://"), http=HttpOptions())
    with pytest.raises(SourceRefused, match="https->http"):
        policy.fetch("https://cdn.example.com/x.png", resolve=lambda host, port: ["93.184.215.14"])
    assert len(opened) == 1  # the http target was never connected to


def test_missing_cloud_backend_names_the_extra(monkeypatch):
    import sys

    # s3fs as if not installed (the dev extra installs it): no module, no class loaded yet
    # (`fsspec.registry` is also the name of a mapping in fsspec: the module by its path).
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(storage.MissingBackendError, match=r"pip install restage\[cloud\]"):
        storage.read_bytes("s3://bucket/a.png")
