"""An adapter's metadata as restage 0.1's `restage train` wrote it (``ShardTrainer.finish``
before ``AdapterMeta`` existed: no ``version`` field), for tests that need one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_app.adapter_meta import AdapterMeta

UNVERSIONED = Path(__file__).parent / "data" / "adapter_unversioned.json"


def unversioned_dict() -> dict[str, Any]:
    return json.loads(UNVERSIONED.read_text())


def example_meta(**update: Any) -> AdapterMeta:
    """The fixture's metadata with ``update`` applied (e.g. product_id, token, noun)."""
    return AdapterMeta.from_dict({**unversioned_dict(), **update}, str(UNVERSIONED))
