"""A staged-catalog index of the examples' photos, built in this process by the index
job's own stages (no Ray): for the stager's tests and the /v1/stage server's."""

from __future__ import annotations

import pyarrow as pa
from conftest import EXAMPLES

from pipelines._product_rows import unpack
from pipelines.index import EmbedScenes, SegmentScenes, decode_catalog, kept_rows, write_catalog
from ray_app import retrieval
from ray_app.batching import object_array
from ray_app.config import RestageConfig
from ray_app.models import source_tag
from ray_app.sources import SourcePolicy
from ray_app.storage import IndexLayout

PRODUCTS = {"bottle-teal-002": "bottle", "cereal-box-003": "box", "mug-red-001": "mug"}


def example_index(root: str, config: RestageConfig) -> str:
    """-> the index folder (IndexLayout(root).index_dir()) of the three examples' photos."""
    ids = sorted(PRODUCTS)
    uris = [[str(p) for p in sorted((EXAMPLES / "products" / pid).glob("*.jpg"))] for pid in ids]
    batch = {
        "product_id": object_array(ids),
        "image_uris": object_array(uris),
        "category": object_array([PRODUCTS[pid] for pid in ids]),
    }
    policy = SourcePolicy.for_manifest(str(EXAMPLES / "products.jsonl"))
    rows = decode_catalog(batch, config, policy, root)
    for stage in (SegmentScenes(config), EmbedScenes(config)):
        rows = stage(rows)
    assert not any(s.failed for s in unpack(rows))
    write_catalog(rows, root)
    layout = IndexLayout(root)
    kept = kept_rows(pa.table({"product_id": ids}), root)
    assert kept.num_rows >= 4, "too few example scenes were indexed"
    retrieval.build_index(
        kept, layout.index_dir(), exact_below=1000, model=source_tag(config, "clip")
    )
    return layout.index_dir()
