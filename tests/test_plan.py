"""Placement plans: GPU fractions derived from memory, the mode each cluster gets, the
preflight that refuses a job the cluster cannot hold, and the cost estimate."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from ray_app.config import ROLES, load_config
from ray_app.plan import (
    USABLE,
    Cluster,
    GpuClass,
    _fits,
    autoscaler_node_types,
    build_plan,
    estimate,
    job_pools,
    render,
)
from ray_app.resources import role_need, train_need
from tests.conftest import EXAMPLES, ROOT

DEFAULT_FRACTIONS = [
    f"{role}.num_gpus={load_config('default').role(role).num_gpus}" for role in ROLES
]

# The augment roles held at 8 actors each (the default profile's pools have no cap).
EIGHT_ACTORS = [
    f"{r}.max_actors=8"
    for r in ("captioner", "segmenter", "novel_view", "inpainter", "generator", "clip", "dino")
]


def gpus(n: float, gib: float = 80.0, cpus: float = 64.0) -> Cluster:
    return Cluster(n, gib, cpus, "test")


def per_gpu_load(plan) -> float:
    return sum(p.gpu_fraction * p.actors[0] for p in plan.pools)


def test_first_fit_decreasing_packs_fractions_into_whole_gpus():
    assert _fits([0.5, 0.5, 0.3, 0.7], 2)
    assert not _fits([0.6, 0.6, 0.6], 1)
    assert not _fits([0.6, 0.6, 0.6], 1.5)  # half a GPU holds no fraction
    assert _fits([1, 1, 0.2], 3)
    assert not _fits([2, 0.5], 2)  # whole-GPU requests take their GPUs first


def test_estimates_grow_with_batch_and_resolution():
    cfg = load_config("default")
    need = role_need(cfg, "generator")
    assert need.source.startswith("estimated")
    assert need.at_batch(4).gpu_gib > need.gpu_gib > need.at_batch(1).gpu_gib
    big = load_config("default", overrides=["generate.width=2048", "generate.height=2048"])
    assert role_need(big, "generator").gpu_gib > need.gpu_gib
    small = load_config("default", overrides=["train.resolution=512"])
    assert train_need(small).gpu_gib < train_need(cfg).gpu_gib


def test_one_80gb_gpu_packs_the_whole_augment_chain():
    cfg = load_config("default")
    plan = build_plan("augment", cfg, gpus(1, 80))
    assert plan.mode == "packed" and plan.runnable, render(plan)
    assert per_gpu_load(plan) <= 1.0
    for pool in plan.pools:  # every pool's fraction holds the memory its roles need
        assert pool.gpu_fraction * 80 * USABLE >= pool.gpu_gib - 1e-6, pool.name
    # The job runs with the plan: fractions and batch sizes applied to its config.
    run = plan.apply(cfg)
    seg = next(p for p in plan.pools if p.name == "segment")
    assert run.segmenter.batch_size == seg.batch["segmenter"]
    assert run.novel_view.num_gpus < 1 < cfg.novel_view.num_gpus + 0.5


def test_one_24gb_gpu_runs_augment_stage_by_stage():
    cfg = load_config("default")
    plan = build_plan("augment", cfg, gpus(1, 24))
    assert plan.mode == "stage" and plan.runnable, render(plan)
    assert "_stages" in render(plan)
    # Each pool alone on the GPU, at its configured batch size, with the memory it needs.
    for pool in plan.pools:
        assert pool.gpu_fraction <= 1 and pool.batch == {
            r: cfg.role(r).batch_size for r in pool.roles
        }
        assert pool.gpu_fraction * 24 * USABLE >= pool.gpu_gib - 1e-6
    # generate runs stage by stage too; serve cannot, and says so.
    tight = load_config("default", overrides=["generate.width=2048", "generate.height=2048"])
    generate = build_plan("generate", tight, gpus(1, 24))
    assert generate.runnable and generate.mode == "stage", render(generate)
    serve = build_plan("serve", tight, gpus(1, 24))
    assert not serve.runnable, render(serve)
    forced = load_config("tiny", overrides=["ray.placement=stage"])
    assert build_plan("augment", forced, gpus(0, 0, cpus=4)).mode == "stage"
    assert not build_plan("train", forced, gpus(0, 0, cpus=4)).runnable


def test_eight_small_gpus_pack_with_memory_not_the_hand_set_fractions():
    cfg = load_config("default")
    plan = build_plan("augment", cfg, gpus(8, 24))
    assert plan.runnable and plan.mode == "packed", render(plan)
    seg = next(p for p in plan.pools if p.name == "segment")
    assert seg.gpu_fraction > cfg.segmenter.num_gpus  # SAM ViT-H does not fit a quarter of 24 GB
    assert any("num_gpus=0.25" in n for n in plan.notes)


def test_no_gpus_names_every_gpu_role_and_the_fix():
    plan = build_plan("augment", load_config("default"), gpus(0, 0))
    assert not plan.runnable
    text = render(plan)
    for pool in job_pools("augment", load_config("default")):
        assert pool.name in text
    assert "--profile tiny" in text


def test_tiny_on_cpu_streams_and_tiny_with_default_fractions_packs_one_gpu():
    tiny = load_config("tiny")
    assert build_plan("augment", tiny, gpus(0, 0, cpus=4)).mode == "streaming"
    fractions = load_config("tiny", overrides=DEFAULT_FRACTIONS)
    plan = build_plan("augment", fractions, gpus(1, 24, cpus=4))
    assert plan.mode == "packed" and plan.runnable, render(plan)
    unfused = load_config("tiny", overrides=["ray.fuse_cpu_stages=false"])
    too_few_cpus = build_plan("augment", unfused, gpus(0, 0, cpus=1))
    assert not too_few_cpus.runnable and "CPUs" in render(too_few_cpus)


def test_model_stages_without_a_gpu_run_fused_in_one_pool_and_need_its_cpus_only():
    tiny = load_config("tiny")
    for job in ("augment", "generate", "index", "stage", "evaluate"):
        plan = build_plan(job, tiny, gpus(0, 0, cpus=1))  # one CPU holds the one pool
        assert plan.fused and plan.runnable, render(plan)
        assert (
            render(plan).splitlines()[0].startswith(f"restage {job}: streaming mode, stages fused")
        )
        (note,) = [n for n in plan.notes if "fused" in n]
        assert f"the {len(plan.pools)} stages run fused, in one pool of 1-1 actors" in note
        assert plan.to_dict()["fused"] is True
    # Off by the setting, on GPUs, stage by stage, and for jobs with no model stages to chain.
    off = load_config("tiny", overrides=["ray.fuse_cpu_stages=false"])
    assert not build_plan("augment", off, gpus(0, 0, cpus=8)).fused
    on_gpus = load_config("tiny", overrides=DEFAULT_FRACTIONS)
    assert not build_plan("augment", on_gpus, gpus(1, 24, cpus=4)).fused
    staged = load_config("tiny", overrides=["ray.placement=stage"])
    assert not build_plan("augment", staged, gpus(0, 0, cpus=4)).fused
    assert not build_plan("train", tiny, gpus(0, 0, cpus=4)).fused
    assert not build_plan("personalize-evaluate", tiny, gpus(0, 0, cpus=4)).fused


def test_train_caps_workers_at_the_gpus_and_refuses_cards_too_small():
    cfg = load_config("default", overrides=["train.num_workers=8"])
    plan = build_plan("train", cfg, gpus(2, 80))
    assert plan.runnable and plan.apply(cfg).train.num_workers == 2
    everyone = load_config("default", overrides=["train.num_workers=null"])
    big = gpus(64, 80, cpus=512)
    assert build_plan("train", everyone, big).apply(everyone).train.num_workers == 64
    few_cpus = build_plan("train", cfg, gpus(8, 80, cpus=32))  # 8 CPUs per worker
    assert few_cpus.apply(cfg).train.num_workers == 4
    assert any("train.num_workers=8 capped at 4" in n for n in few_cpus.notes)
    on_cpus = load_config("tiny", overrides=["train.num_workers=null"])
    assert build_plan("train", on_cpus, gpus(0, 0, cpus=6)).apply(on_cpus).train.num_workers == 6
    small = build_plan("train", cfg, gpus(8, 24))
    assert not small.runnable and "train.batch_size" in render(small)


def test_estimate_names_its_sources_and_scales_with_products():
    cfg = load_config("default")
    plan = build_plan("augment", cfg, gpus(8, 80))
    one, many = estimate(plan, cfg, 1_000), estimate(plan, cfg, 1_000_000)
    assert many["gpu_hours"] == pytest.approx(one["gpu_hours"] * 1000, rel=0.01)
    assert many["wall_hours"] == pytest.approx(many["gpu_hours"] / 8, rel=0.01)
    assert all(s["source"].startswith(("estimated", "measured")) for s in many["stages"])
    assert many["bottleneck"] in {s["pool"] for s in many["stages"]}


def test_a_pool_of_few_actors_sets_the_pace_of_a_large_cluster():
    """An actor runs one call at a time on one GPU: 8 inpainter actors keep 8 of 64 GPUs busy,
    whatever the cluster holds, and the plan says which max_actors to raise; the default
    profile's pools have no cap (max_actors null) and use the whole cluster."""
    cfg = load_config("default", overrides=EIGHT_ACTORS)
    small = estimate(build_plan("augment", cfg, gpus(8, 80)), cfg, 1_000)
    large = estimate(build_plan("augment", cfg, gpus(64, 80)), cfg, 1_000)
    assert large["gpu_hours"] == small["gpu_hours"]
    inpaint = {s["pool"]: s for s in large["stages"]}["inpaint"]
    assert inpaint["parallel"] == cfg.inpainter.max_actors == 8
    assert large["bottleneck"] == "inpaint"
    assert large["wall_hours"] == pytest.approx(1_000 * inpaint["seconds"] / 8 / 3600, rel=0.01)
    assert large["wall_hours"] > large["gpu_hours"] / 64 * 1.5
    assert any("inpainter.max_actors" in c for c in large["capped"])
    uncapped = load_config("default")
    assert uncapped.inpainter.max_actors is None
    freed = estimate(build_plan("augment", uncapped, gpus(64, 80)), uncapped, 1_000)
    assert freed["capped"] == []
    assert {s["parallel"] for s in freed["stages"]} == {64}
    assert freed["wall_hours"] == pytest.approx(freed["gpu_hours"] / 64, rel=0.01)
    assert "1+" in render(build_plan("augment", uncapped, gpus(64, 80)))


def test_stage_by_stage_the_pools_wall_times_add_up():
    """One model stage at a time: each pool's wall time on its own actors, added up (at once,
    the slowest pool would set the pace)."""
    cfg = load_config("default", overrides=["ray.placement=stage", *EIGHT_ACTORS])
    plan = build_plan("augment", cfg, gpus(16, 80))
    assert plan.mode == "stage"
    est = estimate(plan, cfg, 100)
    assert all(s["parallel"] == 8 for s in est["stages"])
    walls = sum(s["seconds"] / 8 for s in est["stages"])
    assert est["wall_hours"] == pytest.approx(100 * walls / 3600, rel=0.01)
    at_once = estimate(build_plan("augment", load_config("default"), gpus(16, 80)), cfg, 100)
    assert at_once["wall_hours"] < est["wall_hours"]


def test_train_steps_are_priced_from_the_gpu_run_with_the_same_settings():
    """bench/gpu_train.py's measured step prices the default profile's training (its GPU
    named); other settings keep the estimate, and the memory stays estimated."""
    from ray_app.resources import RESULTS, TRAIN_REFERENCE

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("gpu_train_*.json"))]
    measured = {r["summary"]["restage_seconds_per_step"]: r["machine"]["gpu"] for r in runs}
    cfg = load_config("default")
    need = train_need(cfg)
    assert need.seconds_per_item in measured
    assert need.source.startswith(f"measured on {measured[need.seconds_per_item]}")
    assert "memory estimated" in need.source
    for other in ("train.rank=16", "train.resolution=768", "train.gradient_checkpointing=false"):
        changed = train_need(load_config("default", overrides=[other]))
        assert changed.seconds_per_item == TRAIN_REFERENCE.seconds, other
        assert changed.source.startswith("estimated"), other
    assert train_need(load_config("default", overrides=["train.rank=16"])).gpu_gib < need.gpu_gib


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray_app.cli", "plan", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_plan_command_packed_stage_and_cost():
    packed = _plan_cli("augment", "--profile", "default", "--gpus", "1", "--gpu-memory", "80")
    assert packed.returncode == 0 and "packed mode" in packed.stdout, packed.stderr
    stage = _plan_cli("augment", "--profile", "default", "--gpus", "1", "--gpu-memory", "24")
    assert stage.returncode == 0 and "stage mode" in stage.stdout
    cost = _plan_cli(
        "augment", "--profile", "default", "--gpus", "8", "--products", "1000000", "--json"
    )
    est = json.loads(cost.stdout)["estimate"]
    assert est["gpu_hours"] > 0 and all(s["source"] for s in est["stages"])


@pytest.mark.slow
def test_default_profile_without_gpus_or_hub_fails_in_seconds_without_a_traceback(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ray_app.cli", "augment", "--profile", "default",
         "--manifest", str(EXAMPLES / "products.jsonl"), "--out", str(tmp_path / "out"),
         "--set", "ray.num_cpus=2", "--set", "ray.dashboard=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "needs a GPU" in proc.stderr and "Traceback" not in proc.stderr
    # No hub here: every role's checkpoint is named, with where restage looked and the fix.
    for role in ("captioner", "segmenter", "inpainter", "generator", "clip", "dino"):
        assert f"\n{role}: " in proc.stderr or f"cannot run: {role}: " in proc.stderr, role
    assert "restage models fetch" in proc.stderr
    assert elapsed < 60, f"preflight took {elapsed:.0f}s"


@pytest.mark.slow
@pytest.mark.parametrize(("gpus", "mode"), [(1, "packed"), (2, "packed"), (8, "streaming")])
def test_preflight_on_logical_gpus_picks_the_mode(gpus, mode):
    """A local Ray with N logical GPUs and the default profile's fractions (4.5 GPUs in all;
    tiny models): the preflight reads the running cluster and chooses the mode."""
    import ray

    from ray_app.plan import preflight

    if ray.is_initialized():
        ray.shutdown()
    cfg = load_config("tiny", overrides=[*DEFAULT_FRACTIONS, "ray.progress_bars=false"])
    ray.init(num_gpus=gpus, num_cpus=4, include_dashboard=False)
    try:
        run, plan = preflight(cfg, "augment")
    finally:
        ray.shutdown()
    assert plan.mode == mode and plan.cluster.gpus == gpus, render(plan)
    fractions = [run.role(r).num_gpus for p in plan.pools for r in p.roles]
    assert sum(fractions) <= gpus


@pytest.mark.slow
def test_one_logical_gpu_with_default_fractions_runs_packed(tmp_path):
    """The default profile's fractions add up to 4.5 GPUs: on 1 GPU the plan packs them
    instead of leaving Ray Data waiting forever (tiny models, logical GPU, CPU compute)."""
    import ray

    from pipelines.augment import augment

    if ray.is_initialized():
        ray.shutdown()
    manifest = tmp_path / "m.jsonl"  # one product of the examples, beside their photos
    (tmp_path / "products").symlink_to(EXAMPLES / "products")
    manifest.write_text((EXAMPLES / "products.jsonl").read_text().splitlines()[0] + "\n")
    cfg = load_config(
        "tiny",
        overrides=[*DEFAULT_FRACTIONS, "ray.num_gpus=1", "ray.progress_bars=false",
                   "augment.views.enabled=false",
                   # the photos are a symlink out of the manifest's folder: trust their folder
                   f"storage.allowed_sources=[{EXAMPLES / 'products'}]"],
    )  # fmt: skip
    try:
        summary = augment(cfg, str(manifest), str(tmp_path / "out"))
    finally:
        ray.shutdown()
    assert summary.extra["placement"] == "packed"
    assert summary.products["ok"] + summary.products["partial"] == 1, summary.products


MIXED = [GpuClass("a10g", 8, 24, "restage_gpu_24gb"), GpuClass("a100", 8, 80, "restage_gpu_80gb")]


def test_mixed_cluster_routes_heavy_roles_to_large_gpus_and_pins_them():
    cfg = load_config("default", overrides=["augment.views.num_frames=25"])
    mixed = Cluster(16, 24, 256, "test", MIXED)
    plan = build_plan("augment", cfg, mixed)
    assert plan.runnable, render(plan)
    homes = {p.name: p.node_type for p in plan.pools}
    assert homes["views"] == "a100" and homes["caption"] == "a10g", homes
    run = plan.apply(cfg)
    assert run.novel_view.resources == {"restage_gpu_80gb": 0.001}
    assert run.captioner.resources == {"restage_gpu_24gb": 0.001}
    train = build_plan("train", load_config("default"), mixed)
    assert train.runnable and train.pools[0].node_type == "a100"
    assert train.apply(load_config("default")).train.resources == {"restage_gpu_80gb": 0.001}
    small_only = Cluster(8, 24, 64, "test", [MIXED[0], GpuClass("t4", 4, 16, "x")])
    assert not build_plan("train", load_config("default"), small_only).runnable


def test_a_mixed_clusters_wall_time_counts_each_class_on_its_own_gpus():
    """Pools routed to a GPU class share that class's GPUs only: all of augment pinned to the
    24 GB cards goes at their pace, not the whole cluster's; training, on the 80 GB cards
    only, is capped by train.num_workers only below their count."""
    cfg = load_config("default", overrides=["ray.gpu_routing=smallest"])
    mixed = Cluster(
        40, 24, 480, "test", [GpuClass("a10g", 32, 24, "s"), GpuClass("a100", 8, 80, "l")]
    )
    plan = build_plan("augment", cfg, mixed)
    assert {p.node_type for p in plan.pools} == {"a10g"}, render(plan)
    est = estimate(plan, cfg, 1_000)
    assert est["wall_hours"] == pytest.approx(est["gpu_hours"] / 32, rel=0.01)
    train = estimate(build_plan("train", cfg, mixed), cfg, 1_000)
    assert train["capped"] == [] and train["stages"][0]["parallel"] == 8
    four = load_config("default", overrides=["train.num_workers=4"])
    held = estimate(build_plan("train", four, mixed), four, 1_000)
    assert held["capped"] == [
        "train runs at most 4 actor(s) and the cluster has 8 GPUs of a100 for it: raise "
        "train.num_workers"
    ]


def test_a_job_that_fits_the_smallest_gpus_spreads_over_a_fixed_mixed_cluster():
    """On a fixed cluster every GPU is paid for: augment, whose pools all fit the 24 GB
    cards, runs on all 40 GPUs with nothing pinned, and goes at their pace. Where the
    autoscaler can add GPU nodes, pools stay pinned (and where a pool needs the large cards:
    the test above, on a fixed cluster)."""
    cfg = load_config("default")
    classes = [GpuClass("a10g", 32, 24, "restage_gpu_24gb"), GpuClass("a100", 8, 80, "l")]
    fixed = Cluster(40, 24, 480, "test", classes)
    plan = build_plan("augment", cfg, fixed)
    assert plan.runnable, render(plan)
    assert {p.node_type for p in plan.pools} == {""}
    assert all(p.resources == {} for p in plan.pools)
    assert any("ray.gpu_routing=spread" in n for n in plan.notes)
    spread = estimate(plan, cfg, 1_000)
    assert spread["wall_hours"] == pytest.approx(spread["gpu_hours"] / 40, rel=0.01)
    run = plan.apply(cfg)
    assert run.inpainter.resources == {} and run.inpainter.num_gpus > 0
    # fractions are sized for the smallest card: every actor fits wherever it lands
    pinned = build_plan(
        "augment", load_config("default", overrides=["ray.gpu_routing=smallest"]), fixed
    )
    assert [p.gpu_fraction for p in plan.pools] == [p.gpu_fraction for p in pinned.pools]
    assert estimate(pinned, cfg, 1_000)["wall_hours"] > spread["wall_hours"] * 1.2
    autoscaling = dataclasses.replace(fixed, autoscaling=True)
    assert {p.node_type for p in build_plan("augment", cfg, autoscaling).pools} == {"a10g"}


def test_configured_resources_are_kept_and_a_pin_to_a_gpu_class_is_honoured():
    """A role's own custom resources reach its actors through the plan (they were dropped),
    and one that names a GPU class's resource sends the pool there."""
    cfg = load_config(
        "tiny", overrides=["generator.resources={special: 1}", "train.resources={special: 1}"]
    )
    one = Cluster(1, 24, 8, "test")
    assert build_plan("generate", cfg, one).apply(cfg).generator.resources == {"special": 1}
    assert build_plan("train", cfg, one).apply(cfg).train.resources == {"special": 1}
    default = load_config("default", overrides=["captioner.resources={restage_gpu_80gb: 0.5}"])
    mixed = Cluster(16, 24, 256, "test", MIXED)
    plan = build_plan("augment", default, mixed)
    assert plan.runnable, render(plan)
    homes = {p.name: p.node_type for p in plan.pools}
    assert homes["caption"] == "a100" and homes["inpaint"] == "a10g", homes
    assert plan.apply(default).captioner.resources == {"restage_gpu_80gb": 0.5}
    # pinned to cards too small for it: refused, naming the pin
    small = load_config("default", overrides=["novel_view.resources={restage_gpu_24gb: 1}"])
    heavy = load_config("default", overrides=["augment.views.num_frames=25"])
    small = small.model_copy(update={"augment": heavy.augment})
    problems = build_plan("augment", small, mixed).problems
    assert any("GPUs its resources pin it to (a10g)" in p and "unpin it" in p for p in problems)


def test_an_actor_larger_than_every_node_is_refused_naming_the_setting():
    """Ray waits for an actor (a Ray Train group) that no node can hold: the plan refuses it,
    where the nodes are known, instead of letting the job hang."""
    cfg = load_config("default")
    small_nodes = Cluster(8, 80, 32, "test", nodes=[{"CPU": 4.0, "GPU": 1.0}])
    train = build_plan("train", cfg, small_nodes)
    assert not train.runnable
    (problem,) = [p for p in train.problems if "no node has that" in p]
    assert "8 CPU, 1 GPU" in problem and "train.cpus_per_worker" in problem
    assert "the largest: 4 CPU, 1 GPU" in problem
    fits = load_config("default", overrides=["train.cpus_per_worker=4"])
    assert build_plan("train", fits, small_nodes).runnable
    assert build_plan("train", cfg, Cluster(8, 80, 64, "test")).runnable  # nodes unknown
    tiny = load_config("tiny")
    assert build_plan("augment", tiny, Cluster.local(tiny)).runnable  # the local node


def test_autoscaler_node_types_count_toward_the_plan():
    types = {name: (n, res) for name, n, res in autoscaler_node_types(str(ROOT / "cluster.yaml"))}
    assert set(types) == {"gpu_a10g", "gpu_a100"}
    n, res = types["gpu_a100"]
    assert n == 16 and res["GPU"] == 8 and res["restage_gpu_80gb"] == 8
    assert autoscaler_node_types(str(ROOT / "no-such-file.yaml")) == []


@pytest.mark.slow
def test_gpu_classes_are_read_from_a_mixed_ray_cluster(monkeypatch):
    """Two worker nodes with different restage_gpu_<N>gb resources (logical GPUs)."""
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = RayCluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        nodes.add_node(num_cpus=1, num_gpus=1, resources={"restage_gpu_24gb": 1})
        nodes.add_node(num_cpus=1, num_gpus=2, resources={"restage_gpu_80gb": 2})
        ray.init(address=nodes.address)
        nodes.wait_for_nodes()
        cluster = Cluster.from_ray(load_config("default"))
        assert [(c.name, c.gpus, c.gpu_gib) for c in cluster.classes] == [
            ("restage_gpu_24gb", 1, 24), ("restage_gpu_80gb", 2, 80)
        ]  # fmt: skip
        plan = build_plan("train", load_config("default"), cluster)
        assert plan.pools[0].resources == {"restage_gpu_80gb": 0.001}
        # each node has 1 CPU: a worker of 8 would wait forever for one
        assert any("train.cpus_per_worker" in p for p in plan.problems), render(plan)
        one = load_config("default", overrides=["train.cpus_per_worker=1"])
        assert build_plan("train", one, cluster).runnable
        # On the cluster launcher's head, the node types the autoscaler may add count too.
        monkeypatch.setenv("RAY_BOOTSTRAP_CONFIG", str(ROOT / "cluster.yaml"))
        scaled = Cluster.from_ray(load_config("default"))
        assert scaled.gpus == 3 + 32 * 1 + 16 * 8 and "autoscaler" in scaled.source
        assert scaled.autoscaling and not cluster.autoscaling  # ray.gpu_routing's default
        assert {c.name: c.gpus for c in scaled.classes}["restage_gpu_80gb"] == 2 + 16 * 8
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_serve_preflight_refuses_a_cluster_that_cannot_hold_it(tmp_path):
    """`restage serve` plans before Ray starts: no GPU and no hub here, so it ends at once."""
    import os

    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ray_app.cli", "serve", "--profile", "default",
         "--adapters", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
        env={**os.environ, "RESTAGE_API_KEYS": "k" * 32},
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "Generator" in proc.stderr and "needs a GPU" in proc.stderr
    assert "Traceback" not in proc.stderr
    print(f"serve preflight ended in {time.monotonic() - start:.1f}s")


# --------------------------------------------------------------------------- personalize


def test_personalize_costs_its_steps_of_images_with_gradients():
    """A personalize step passes every one of its images forward and back: the cost and the
    memory follow ``images_per_step``, not the encoder's inference batch."""
    from ray_app.plan import ENCODER_TRAIN_PASSES

    cfg = load_config("default")
    p, need = cfg.personalize, role_need(cfg, "encoder")
    plan = build_plan("personalize", cfg, gpus(1, 80))
    (stage,) = estimate(plan, cfg, 10)["stages"]
    assert stage["items"] == p.steps and stage["unit"] == "step"
    per_step = p.images_per_step * ENCODER_TRAIN_PASSES * need.seconds_per_item
    assert stage["seconds_per_item"] == pytest.approx(per_step)
    (pool,) = plan.pools
    assert pool.gpu_gib == pytest.approx(
        need.fixed_gib + p.images_per_step * need.per_item_gib, abs=0.01
    )
    bigger = load_config("default", overrides=["personalize.batch_size=32"])
    assert build_plan("personalize", bigger, gpus(1, 80)).pools[0].gpu_gib > pool.gpu_gib


def test_personalize_evaluate_work_per_product_grows_with_the_test_set():
    """Every product's encoder embeds the whole test pool: twice the products, about twice
    the work per product (four times the whole)."""
    cfg = load_config("default")
    plan = build_plan("personalize-evaluate", cfg, gpus(1, 80))
    assert [p.roles for p in plan.pools] == [("encoder",)]
    small, large = estimate(plan, cfg, 10_000), estimate(plan, cfg, 20_000)
    assert large["seconds_per_product"] / small["seconds_per_product"] == pytest.approx(2, rel=0.01)
    assert large["gpu_hours"] / small["gpu_hours"] == pytest.approx(4, rel=0.02)


def test_the_tiny_personalize_cost_is_the_bench_measurement():
    """The tiny profile's plan prices a step from bench/personalize.py's measured step (a step
    of the same images), not from the role's generic estimate."""
    from ray_app.resources import RESULTS

    measured = json.loads((RESULTS / "personalize_tiny_cpu.json").read_text())["train"]
    cfg = load_config("tiny")
    (stage,) = estimate(build_plan("personalize", cfg, gpus(0, 0, cpus=4)), cfg, 10)["stages"]
    assert stage["source"].startswith("measured on CPU")
    per_step = measured["seconds_per_step"]
    assert stage["seconds"] == pytest.approx(per_step * cfg.personalize.steps, rel=0.01)


def test_plan_personalize_with_adapters_plans_its_generate_steps_first():
    cfg = load_config("default")
    shares = cfg.personalize.generated.shares()
    args = ["personalize", "--profile", "default", "--gpus", "8", "--products", "1000", "--json"]
    alone = _plan_cli(*args)
    assert alone.returncode == 0, alone.stderr
    assert "before" not in json.loads(alone.stdout)

    both = _plan_cli(*args, "--adapters", "s3://bucket/adapters")
    assert both.returncode == 0, both.stderr
    out = json.loads(both.stdout)
    assert out["job"] == "personalize" and len(out["before"]) == len(shares)
    for step, (guidance, images) in zip(out["before"], shares, strict=True):
        assert step["job"] == "generate" and f"guidance {guidance:g}" in step["title"]
        assert {s["pool"]: s["items"] for s in step["estimate"]["stages"]}["generate"] == images
    steps = [*(s["estimate"] for s in out["before"]), out["estimate"]]
    assert out["total"]["gpu_hours"] == pytest.approx(sum(e["gpu_hours"] for e in steps), abs=0.2)

    text = _plan_cli(*args[:-1], "--adapters")  # the flag alone, as in the job's own command
    assert text.returncode == 0 and f"step {len(shares) + 1} of {len(shares) + 1}" in text.stdout
    wrong = _plan_cli("generate", "--profile", "default", "--gpus", "1", "--adapters")
    assert wrong.returncode == 2 and "only personalize takes --adapters" in wrong.stderr


def test_readme_plan_personalize_command(user_dir):
    """The README's `restage plan personalize --adapters` command, exactly as written."""
    from tests.conftest import readme_command

    proc = subprocess.run(
        ["bash", "-c", readme_command("plan-personalize")],
        cwd=user_dir, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = len(load_config("default").personalize.generated.guidance_scales) + 1
    assert f"step {steps} of {steps}: personalize" in proc.stdout
    assert f"total of the {steps} steps for 1,000 products" in proc.stdout
