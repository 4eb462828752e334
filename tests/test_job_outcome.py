"""How a job ends: exit status and last line when products failed, a whole-job summary
after a resume, and a restage message when Ray loses its node."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from output import last_line
from ray import exceptions as rex

from ray_app import storage
from ray_app.config import load_config
from ray_app.node_loss import EXIT_NODE_LOST, NodeLost, is_node_lost, node_loss_guard
from ray_app.report import CompletedTotals, StageStats

RESTAGE = str(Path(sys.executable).with_name("restage"))
INVALID = [
    {"product_id": "CON", "image_uris": ["a.png"]},
    {"product_id": "../x", "image_uris": ["a.png"]},
]


def _augment(tmp_path: Path, rows: list[dict]) -> subprocess.CompletedProcess:
    manifest = tmp_path / "products.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [RESTAGE, "augment", "--profile", "tiny", "--manifest", str(manifest)]
    cmd += ["--out", str(tmp_path / "out")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the manifest is read on Ray
def test_a_job_where_every_product_failed_exits_non_zero(tmp_path):
    proc = _augment(tmp_path, INVALID)  # no valid record: no model runs
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = last_line(proc.stdout)
    assert last.startswith("restage augment: FAILED: all 2 products failed")
    assert str(tmp_path / "out" / "errors") in last


@pytest.mark.slow  # the manifest is read on Ray
def test_a_job_where_some_products_failed_exits_zero_and_says_so(tmp_path):
    # A product finished by an earlier (killed) invocation: its marker, no summary.json.
    marker = {"product_id": "mug-1", "status": "ok", "stats": {}}
    storage.write_json(str(tmp_path / "out" / "_done" / "mug-1.json"), marker)
    proc = _augment(tmp_path, [{"product_id": "mug-1", "image_uris": ["a.png"]}, *INVALID])
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = last_line(proc.stdout)
    assert last.startswith("restage augment: done with failures: 2 of 3 products failed")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["products"]["ok"] == 1 and saved["this_run"]["ok"] == 0


def _stats(n: int) -> dict:
    return {"decode": StageStats("decode", "images", items_in=n, items_out=n).__dict__}


def test_completed_totals_add_only_what_the_previous_summary_did_not_count():
    previous = CompletedTotals(invocations=1, counted_until=100.0)
    previous.add("ok", _stats(3))
    previous.add("partial", _stats(2))
    newer = CompletedTotals()  # a marker a killed invocation wrote after that summary
    newer.add("ok", _stats(4))
    totals = CompletedTotals.before_this_run({"completed": previous.to_dict()}, newer)
    assert (totals.products, totals.ok, totals.partial, totals.invocations) == (3, 2, 1, 1)
    assert totals.stages["decode"].items_in == 9 and totals.counted_until == 100.0


def test_completed_totals_are_rebuilt_from_markers_without_a_summary_that_says_until_when():
    markers = [
        {"status": "ok", "stats": _stats(3)},
        {"status": "partial", "stats": _stats(4)},
        {"status": "ok"},  # a marker of an older version, without stats
    ]
    everything = CompletedTotals()
    for block in (markers[:1], markers[1:]):  # two blocks, as the intake tasks total them
        part = CompletedTotals()
        for marker in block:
            part.add(marker["status"], marker.get("stats", {}))
        everything.merge(part)
    older = CompletedTotals(invocations=1)  # a summary of an older version: no counted_until
    older.add("ok", _stats(3))
    for previous in (None, {"completed": older.to_dict()}):
        totals = CompletedTotals.before_this_run(previous, copy.deepcopy(everything))
        assert (totals.products, totals.ok, totals.partial) == (3, 2, 1)
        assert totals.stages["decode"].items_in == 7
        assert totals.invocations == (1 if previous else 0)


def _actor_died(text: str) -> rex.ActorDiedError:
    err = rex.ActorDiedError()
    err.error_msg = text
    return err


@pytest.mark.parametrize(
    "exc",
    [
        rex.NodeDiedError("node 3f2a marked dead after missing heartbeats"),
        rex.LocalRayletDiedError(),
        _actor_died("The actor died because its node has died. Node Id: 3f2a"),
    ],
)
def test_ray_node_died_errors_are_recognised(exc):
    assert is_node_lost(exc)
    wrapped = RuntimeError("Ray Data: a task failed")
    wrapped.__cause__ = exc
    assert is_node_lost(wrapped)


@pytest.mark.parametrize(
    "exc", [ValueError("node"), _actor_died("The actor died: ZeroDivisionError"), rex.RayError()]
)
def test_other_errors_are_not_node_loss(exc):
    assert not is_node_lost(exc)
    with pytest.raises(type(exc)), node_loss_guard("augment", load_config("tiny")):
        raise exc


def test_the_cli_says_the_node_was_lost_and_how_to_resume(tmp_path, monkeypatch, capsys):
    """augment as the CLI runs it, with Ray's node dying under the dataset iteration."""
    import pipelines.augment as job
    from ray_app import cli, runtime

    class DyingDataset:
        def iter_batches(self, **kwargs):
            raise rex.NodeDiedError("The node with node id 3f2a has been marked dead")

    from types import SimpleNamespace

    from ray_app import plan

    monkeypatch.setattr(runtime, "init_ray", lambda config: {})
    monkeypatch.setattr(plan, "preflight", lambda config, job: (config, SimpleNamespace(mode="-")))
    monkeypatch.setattr(job, "build_dataset", lambda *args: DyingDataset())
    folder = tmp_path / "vendor"
    folder.mkdir()
    (folder / "products.jsonl").write_text(
        json.dumps({"product_id": "mug-1", "image_uris": ["a.png"]}) + "\n"
    )
    argv = ["augment", "--profile", "tiny", "--manifest", str(folder / "products.jsonl")]
    argv += ["--out", str(tmp_path / "out"), "--set", "ray.health_check_failure_threshold=7"]
    assert cli.main(argv) == EXIT_NODE_LOST
    err = capsys.readouterr().err
    # After the job's own progress line, the message, and no traceback.
    assert "\nrestage augment: Ray lost a node this job was running on" in "\n" + err
    assert "Traceback" not in err
    assert "Re-run the same command to resume" in err
    assert "--set ray.health_check_failure_threshold=14" in err


def test_a_local_ray_gets_the_health_check_settings(monkeypatch):
    import ray

    from ray_app import runtime

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", dict)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config("tiny", overrides=["ray.health_check_timeout_ms=45000"])
    runtime.init_ray(cfg)
    assert seen["_system_config"] == {
        "health_check_period_ms": cfg.ray.health_check_period_ms,
        "health_check_timeout_ms": 45000,
        "health_check_failure_threshold": cfg.ray.health_check_failure_threshold,
    }


def test_node_lost_is_raised_from_the_guard():
    guard = node_loss_guard("generate", load_config("tiny"))
    with pytest.raises(NodeLost, match=r"ray\.health_check_timeout_ms"), guard:
        raise rex.NodeDiedError("node died")
