"""cluster.yaml is a valid Ray cluster launcher config (checked with Ray's own schema)."""

from __future__ import annotations

import yaml
from conftest import ROOT


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any("g5" in t["node_config"]["InstanceType"] for t in types.values())
