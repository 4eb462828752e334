"""The placement plan of a job: which actor pools it runs, what each needs, how they share
the GPUs, and whether the cluster can hold them at all.

Every job builds its plan before any work (``preflight``) and runs with it; ``restage plan``
prints the same plan. Three modes, chosen in this order unless ``ray.placement`` forces one:

- ``streaming``: every pool at once with the configured ``num_gpus``, when those fractions
  fit the GPUs and give each role the memory it needs;
- ``packed``: every pool at once, with GPU fractions derived from memory (``ray_app.resources``)
  and batch sizes halved where needed, when the pools fit the GPUs by first-fit-decreasing;
- ``stage``: one model stage at a time, each alone on its GPUs, for clusters too small to
  pack (``pipelines/_staged.py``; augment and generate run this way, the others fail the preflight).

A plan that cannot run fails within seconds, naming each role, what it needs, what the
cluster has, and the fix, instead of leaving Ray Data waiting for resources that never come.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from ray_app.config import ConfigError, RestageConfig
from ray_app.gpus import LocalGpus, local_gpus
from ray_app.resources import RoleNeed, encoder_train_need, role_need, train_need

USABLE = 0.95  # of each GPU's memory: allocator fragmentation and library workspaces
MODES = ("streaming", "packed", "stage")
JOBS = (
    "augment",
    "train",
    "generate",
    "serve",
    "prompts",
    "evaluate",
    "index",
    "stage",
    "personalize",
    "personalize-evaluate",
)
STAGED_JOBS = ("augment", "generate")  # jobs that can run stage by stage (pipelines/_staged.py)
# Jobs whose model stages go through pipelines/_product_rows.map_stages, so can run fused.
FUSING_JOBS = ("augment", "generate", "evaluate", "index", "stage", "personalize")
# GiB of memory per GPU by Ray's accelerator_type resource, for `--cluster current`.
ACCELERATOR_GIB = {
    "H200": 141, "H100": 80, "A100-80G": 80, "A100-40G": 40, "A100": 40, "L40S": 48, "L40": 48,
    "A10G": 24, "L4": 24, "A10": 24, "T4": 16, "V100": 16, "A6000": 48,
}  # fmt: skip
ASSUMED_GIB = 24.0  # the smallest common data-centre card: safe when memory is unknown


class PlanError(RuntimeError):
    """The job cannot run on this cluster; the message says why and what to change."""


@dataclass
class GpuClass:
    """The GPUs of one node type: how many, their memory, and the Ray resource that pins an
    actor to them (None in a cluster with one kind of GPU)."""

    name: str
    gpus: float
    gpu_gib: float
    resource: str | None = None


@dataclass
class Cluster:
    """What the job can use: GPUs (count and memory each) and CPUs. ``classes`` lists the GPU
    node types of a mixed cluster (largest memory last); empty when all GPUs are alike."""

    gpus: float
    gpu_gib: float
    cpus: float
    source: str  # where the figures come from
    classes: list[GpuClass] = field(default_factory=list)
    # The resources of each kind of node (up, or that the autoscaler may add): an actor must
    # fit one of them. Empty where they are not known (--gpus/--cpus give totals only).
    nodes: list[dict[str, float]] = field(default_factory=list)
    autoscaling: bool = False  # the autoscaler may add GPU nodes (ray.gpu_routing's default)

    @classmethod
    def local(cls, config: RestageConfig) -> Cluster:
        """The local Ray a job would start (``ray.num_gpus``/``num_cpus``, else this machine),
        known without starting it."""
        here = local_gpus()  # once: NVML's start takes longer on a machine of many GPUs
        gpus = here.count if config.ray.num_gpus is None else config.ray.num_gpus
        cpus = config.ray.num_cpus or os.cpu_count() or 1
        gib, source = gpu_memory(config, {}, here)
        node = {"CPU": float(cpus), "GPU": float(gpus)}
        return cls(
            float(gpus), gib, float(cpus), f"the local Ray this job starts; {source}", nodes=[node]
        )

    @classmethod
    def from_ray(cls, config: RestageConfig) -> Cluster:
        """The running Ray cluster's resources (``ray.init`` must have run): GPU node types
        from each node's ``accelerator_type:X`` or ``restage_gpu_<N>gb`` resource."""
        import ray

        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0))
        gib, source = gpu_memory(config, res)
        classes: dict[str, GpuClass] = {}
        shapes: dict[tuple, dict[str, float]] = {}
        for node in ray.nodes():
            node_res = node.get("Resources", {})
            if node.get("Alive"):
                _add_shape(shapes, node_res)
            if not node.get("Alive") or not node_res.get("GPU"):
                continue
            key, mem = _gpu_class_of(node_res)
            if key is None:
                key, mem = "GPU", gib
            c = classes.setdefault(key, GpuClass(key.split(":")[-1], 0.0, mem, _pin(key)))
            c.gpus += node_res["GPU"]
        cpus = float(res.get("CPU", 0))
        # An autoscaling cluster holds what its node types can add, not only what is up now.
        scaled = autoscaler_node_types()
        for _, count, node_res in scaled:
            _add_shape(shapes, node_res)
            if node_res.get("GPU"):
                key, mem = _gpu_class_of(node_res)
                key, mem = (key, mem) if key else ("GPU", gib)
                c = classes.setdefault(key, GpuClass(key.split(":")[-1], 0.0, mem, _pin(key)))
                c.gpus += count * node_res["GPU"]
                gpus += count * node_res["GPU"]
            cpus += count * node_res.get("CPU", 0)
        if scaled:
            source += f"; autoscaler node types {', '.join(n for n, _, _ in scaled)} at max_workers"
        found = sorted(classes.values(), key=lambda c: c.gpu_gib)
        if len({c.gpu_gib for c in found}) < 2:
            found = []  # one kind of GPU: no routing needed
        # A node type that leaves its CPUs or GPUs to Ray's detection has shapes not known
        # here: then no actor is refused for want of a node that might fit it.
        declared = all({"CPU", "GPU"} <= set(node_res) for _, _, node_res in scaled)
        nodes = list(shapes.values()) if declared else []
        autoscaling = any(node_res.get("GPU") for _, _, node_res in scaled)
        return cls(gpus, gib, cpus, f"ray.cluster_resources(); {source}", found, nodes, autoscaling)


def _add_shape(shapes: dict[tuple, dict[str, float]], resources: dict[str, float]) -> None:
    """Keep a node's CPUs, GPUs and custom resources (not its memory or its address), once per
    kind of node."""
    shape = {
        k: float(v)
        for k, v in resources.items()
        if k not in ("memory", "object_store_memory") and not k.startswith("node:")
    }
    shapes.setdefault(tuple(sorted(shape.items())), shape)


AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher writes it on the head


def autoscaler_node_types(path: str | None = None) -> list[tuple[str, int, dict[str, float]]]:
    """Worker node types the autoscaler may still start: (name, nodes it can add, resources
    per node), from the cluster launcher's config on the head (``RAY_BOOTSTRAP_CONFIG`` or
    ``~/ray_bootstrap_config.yaml``); [] where there is none (a fixed cluster, local Ray)."""
    import yaml

    file = os.path.expanduser(path or os.environ.get("RAY_BOOTSTRAP_CONFIG", AUTOSCALER_CONFIG))
    if not os.path.exists(file):
        return []
    with open(file) as f:
        config = yaml.safe_load(f) or {}
    head = config.get("head_node_type")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        count = int(spec.get("max_workers", 0)) - int(spec.get("min_workers", 0))
        if count > 0:  # min_workers are already up, so in ray.cluster_resources()
            res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
            out.append((name, count, res))
    return out


def _pin(key: str) -> str | None:
    """The custom resource that pins an actor to a GPU class (none for GPUs of unknown kind:
    Ray takes GPUs as num_gpus, never as a custom resource)."""
    return None if key == "GPU" else key


def _gpu_class_of(resources: dict[str, float]) -> tuple[str | None, float]:
    """A node's GPU class: a ``restage_gpu_<N>gb`` resource (cluster.yaml declares them), else
    Ray's own ``accelerator_type:X`` with a known memory size."""
    for key in resources:
        m = re.fullmatch(r"restage_gpu_(\d+)gb", key)
        if m:
            return key, float(m.group(1))
    for key in resources:
        name = key.split(":", 1)[1] if key.startswith("accelerator_type:") else None
        if name in ACCELERATOR_GIB:
            return key, float(ACCELERATOR_GIB[name])
    return None, 0.0


def gpu_memory(
    config: RestageConfig, resources: dict[str, float], here: LocalGpus | None = None
) -> tuple[float, str]:
    """GiB per GPU: from config, this machine's first GPU (``here``, else read), Ray's
    accelerator type, or assumed."""
    if config.ray.gpu_memory_gb is not None:
        return config.ray.gpu_memory_gb, "GPU memory from ray.gpu_memory_gb"
    here = here or local_gpus()
    if here.gib is not None:
        return here.gib, f"GPU memory of {here.name}"
    for key in resources:
        if key.startswith("accelerator_type:"):
            name = key.split(":", 1)[1]
            if name in ACCELERATOR_GIB:
                return float(ACCELERATOR_GIB[name]), f"GPU memory of accelerator type {name}"
    return ASSUMED_GIB, f"GPU memory unknown, assumed {ASSUMED_GIB:g} GiB (set ray.gpu_memory_gb)"


@dataclass
class Pool:
    """One actor pool (a model stage, the train workers or a Serve deployment)."""

    name: str
    roles: tuple[str, ...]
    actors: tuple[int, int | None]  # min, max (None: as many as the cluster grants)
    needs: list[RoleNeed]
    gpu_fraction: float = 0.0  # per actor, after planning
    cpus: float = 0.0
    batch: dict[str, int] = field(default_factory=dict)  # role -> batch size in force
    node_type: str = ""  # the GPU class it is routed to, in a mixed cluster
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor

    @property
    def gpu_gib(self) -> float:
        return sum(n.gpu_gib for n in self.needs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["needs"] = [n.to_dict() for n in self.needs]
        d["gpu_gib"] = round(self.gpu_gib, 2)
        return d


@dataclass
class Plan:
    job: str
    mode: str
    cluster: Cluster
    pools: list[Pool]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # non-empty: the job cannot run
    fused: bool = False  # the model stages run in one pool (ray.fuse_cpu_stages)

    @property
    def runnable(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "mode": self.mode,
            "fused": self.fused,
            "runnable": self.runnable,
            "cluster": asdict(self.cluster),
            "pools": [p.to_dict() for p in self.pools],
            "notes": self.notes,
            "problems": self.problems,
        }

    def apply(self, config: RestageConfig) -> RestageConfig:
        """``config`` with the plan's GPU fractions and batch sizes (what the job runs with)."""
        if self.job == "train":  # the workers the cluster holds, not more (they would wait)
            pool = self.pools[0]
            train = config.train.model_copy(
                update={"num_workers": pool.actors[1], "resources": pool.resources}
            )
            return config.model_copy(update={"train": train})
        update: dict[str, Any] = {}
        for pool in self.pools:
            for need in pool.needs:
                spec = config.role(need.role)
                changes: dict[str, Any] = {"resources": pool.resources}
                if self.mode != "streaming":
                    share = pool.gpu_fraction * need.gpu_gib / pool.gpu_gib if pool.gpu_gib else 0
                    changes |= {"num_gpus": _round_up(share), "batch_size": pool.batch[need.role]}
                update[need.role] = spec.model_copy(update=changes)
        return config.model_copy(update=update)


def _round_up(x: float, step: float = 0.01) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 4)


# --------------------------------------------------------------------------- pools per job


def job_pools(job: str, config: RestageConfig) -> list[Pool]:
    """The actor pools ``job`` runs, in pipeline order."""
    if job == "augment":
        from pipelines.augment import model_stages

        stages = [(cls.name, roles) for cls, roles in model_stages(config)]
    elif job == "generate":
        from pipelines.generate import model_stages

        stages = [(cls.name, roles) for cls, roles in model_stages(config)]
    elif job == "evaluate":
        from pipelines.evaluate import model_stages

        stages = [(cls.name, roles) for cls, roles in model_stages(config)]
    elif job == "index":
        from pipelines.index import model_stages

        stages = [(cls.name, roles) for cls, roles in model_stages(config)]
    elif job == "stage":
        from pipelines.stage import model_stages

        stages = [(cls.name, roles) for cls, roles in model_stages(config)]
    elif job == "personalize":
        from pipelines.personalize import model_stages

        pools = [
            _pool(cls.name, r, _actors(config, r[0]), config) for cls, r in model_stages(config)
        ]
        for pool in pools:
            pool.needs = [
                encoder_train_need(config) if n.role == "encoder" else n for n in pool.needs
            ]
        return pools
    elif job == "personalize-evaluate":  # pipelines/personalize_evaluate.py's encoder pool
        stages = [("evaluate", ("encoder",))]
    elif job == "train":
        t = config.train
        need = train_need(config)
        pool = Pool("train", ("generator",), (1, t.num_workers), [need])
        pool.gpu_fraction, pool.cpus = float(t.gpus_per_worker), t.cpus_per_worker
        pool.resources = dict(t.resources)
        pool.batch = {"train": t.batch_size}
        return [pool]
    elif job == "prompts":
        stages = [("llm", ("llm",))]
    elif job == "serve":
        s = config.serve
        ranker = ("clip", "dino") + (("segmenter",) if config.generate.segment else ())
        pools = [
            _pool("Generator", ("generator",), (max(1, s.min_replicas), s.max_replicas), config),
            _pool("Ranker", ranker, (s.ranker_replicas, s.ranker_replicas), config),
        ]
        if s.stage_index:  # POST /v1/stage
            stager = ("inpainter", "segmenter", "clip")
            pools.append(_pool("Stager", stager, (s.stager_replicas, s.stager_replicas), config))
        return pools
    else:
        raise ConfigError(f"unknown job {job!r} for a plan: use one of {', '.join(JOBS)}")
    return [_pool(name, roles, _actors(config, roles[0]), config) for name, roles in stages]


def _actors(config: RestageConfig, role: str) -> tuple[int, int | None]:
    spec = config.role(role)
    return spec.min_actors, spec.max_actors


def _pool(
    name: str, roles: tuple[str, ...], actors: tuple[int, int | None], config: RestageConfig
) -> Pool:
    pool = Pool(name, roles, actors, [role_need(config, r) for r in roles])
    for r in roles:  # the configured custom resources, as map_stage reserves them
        for key, amount in config.role(r).resources.items():
            pool.resources.setdefault(key, amount)
    pool.gpu_fraction = sum(config.role(r).num_gpus for r in roles)
    pool.cpus = config.role(roles[0]).num_cpus
    pool.batch = {r: config.role(r).batch_size for r in roles}
    return pool


# --------------------------------------------------------------------------- planning


def _fits(fractions: list[float], gpus: float) -> bool:
    """First-fit-decreasing of per-actor GPU fractions into ``gpus`` whole GPUs (Ray places a
    fractional request on one GPU; a whole-GPU request takes whole GPUs)."""
    whole = sum(math.ceil(f - 1e-9) for f in fractions if f >= 1)
    bins = [1.0] * max(0, int(gpus) - whole)
    if whole > int(gpus):
        return False
    for f in sorted((f for f in fractions if 0 < f < 1), reverse=True):
        for i, free in enumerate(bins):
            if f <= free + 1e-9:
                bins[i] = free - f
                break
        else:
            return False
    return True


def _min_fractions(pools: list[Pool]) -> list[float]:
    return [p.gpu_fraction for p in pools for _ in range(p.actors[0])]


def fuses(config: RestageConfig, stages: list[tuple[str, ...]]) -> bool:
    """Whether model stages (the roles of each, in pipeline order) run fused, in one actor
    pool (``ray.fuse_cpu_stages``): two or more of them, and none reserving a GPU."""
    return (
        config.ray.fuse_cpu_stages
        and len(stages) > 1
        and all(config.role(r).num_gpus == 0 for roles in stages for r in roles)
    )


def fused_actors(pools: list[tuple[int, int | None]]) -> tuple[int, int | None]:
    """(min, max) actors of a fused pool, from its stages' own pools: the largest of each
    (None: uncapped)."""
    most = [n for _, n in pools]
    return max(n for n, _ in pools), None if None in most else max(n for n in most if n)


def build_plan(job: str, config: RestageConfig, cluster: Cluster) -> Plan:
    """The plan ``job`` runs with on ``cluster`` (``problems`` says why it cannot)."""
    pools = job_pools(job, config)
    fused = (
        job in FUSING_JOBS
        and config.ray.placement != "stage"
        and fuses(config, [p.roles for p in pools])
    )
    if fused:  # one pool: its actors run the stages one after the other
        cpus = max(p.cpus for p in pools) * fused_actors([p.actors for p in pools])[0]
    else:
        cpus = sum(p.cpus * p.actors[0] for p in pools)
    problems = []
    if cpus > cluster.cpus:
        problems.append(
            f"the pools' minimum actors reserve {cpus:g} CPUs and the cluster has "
            f"{cluster.cpus:g}: lower "
            + ("train.cpus_per_worker" if job == "train" else "<role>.num_cpus or min_actors")
            + ", or add CPU nodes"
        )
    plan = _route(job, config, cluster, pools) if cluster.classes else None
    plan = plan or _place(job, config, cluster, pools)
    plan.problems = problems + plan.problems + _unplaceable(job, plan)
    if fused:
        plan.fused = True
        low, most = fused_actors([p.actors for p in pools])
        plan.notes.append(
            f"no model stage needs a GPU: the {len(pools)} stages run fused, in one pool of "
            f"{actors_range(low, most)} actors, each loading every stage's models "
            "(ray.fuse_cpu_stages=false: a pool per stage)"
        )
    return plan


def _unplaceable(job: str, plan: Plan) -> list[str]:
    """The pools whose actor asks for more than any one node has: Ray would wait for such an
    actor (a Ray Train worker group) forever. Only where the cluster's nodes are known."""
    if not plan.cluster.nodes:
        return []
    problems = []
    for p in plan.pools:
        ask = {"CPU": p.cpus, "GPU": p.gpu_fraction, **p.resources}
        ask = {k: v for k, v in ask.items() if v > 0}
        if any(all(node.get(k, 0.0) >= v for k, v in ask.items()) for node in plan.cluster.nodes):
            continue
        largest = max(plan.cluster.nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
        knobs = (
            "train.cpus_per_worker or train.gpus_per_worker"
            if job == "train"
            else f"{p.roles[0]}.num_cpus or {p.roles[0]}.num_gpus"
        )
        problems.append(
            f"{p.name} actors ask for {_resources_text(ask)} each and no node has that "
            f"(the largest: {_resources_text(largest)}): lower {knobs}, or add larger nodes"
        )
    return problems


def _resources_text(res: dict[str, float]) -> str:
    shown = {k: v for k, v in res.items() if k in ("CPU", "GPU") or k.startswith("restage_")}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "nothing"


@dataclass
class Step:
    """One plan of a job that runs several in turn, with the config it runs with."""

    title: str
    config: RestageConfig
    plan: Plan


def job_steps(
    job: str, config: RestageConfig, cluster: Cluster, adapters: bool = False
) -> list[Step]:
    """The plans ``job`` runs one after the other. Only personalize with ``--adapters``
    (``adapters``) runs more than one: generate once per ``personalize.generated`` guidance
    value (its generated positives, each with its own preflight), then its own pool."""
    steps = []
    if job == "personalize" and adapters and config.personalize.generated.images_per_product:
        from pipelines.personalize import generation_config

        for guidance, images in config.personalize.generated.shares():
            cfg = generation_config(config, guidance, images)
            title = f"generated positives at guidance {guidance:g}: {images} images per product"
            steps.append(Step(title, cfg, build_plan("generate", cfg, cluster)))
    steps.append(Step(job, config, build_plan(job, config, cluster)))
    return steps


def _route(job: str, config: RestageConfig, cluster: Cluster, pools: list[Pool]) -> Plan:
    """A mixed cluster: each GPU pool goes to the smallest GPUs that hold it (heavy roles never
    land on small cards), or to the class its configured resources pin it to, pinned there by
    the class's resource; each class is then placed on its own. Under ``ray.gpu_routing``
    'spread', a job whose pools all fit the smallest GPUs is placed on every GPU instead, as
    if all were the smallest, and nothing is pinned."""
    by_class: dict[str, list[Pool]] = {c.name: [] for c in cluster.classes}
    problems = []
    homes: dict[int, GpuClass] = {}  # by id(pool)
    for p in pools:
        if not p.gpu_fraction and not p.gpu_gib:
            continue
        need = p.gpu_gib if job == "train" else _at_batch_one(p)
        pinned = next((c for c in cluster.classes if c.resource in p.resources), None)
        fitting = [c for c in cluster.classes if need <= c.gpu_gib * USABLE]
        home = pinned if pinned in fitting else None if pinned else next(iter(fitting), None)
        if home is None:
            biggest = pinned or cluster.classes[-1]
            problems.append(
                f"{p.name} ({'+'.join(p.roles)}) needs ~{need:.1f} GiB and the "
                f"{'GPUs its resources pin it to' if pinned else 'largest GPUs'} "
                f"({biggest.name}) hold {biggest.gpu_gib * USABLE:.1f} GiB usable: "
                + ("unpin it or " if pinned else "add larger GPUs or ")
                + "lower the role's batch size or resolution"
            )
            continue
        homes[id(p)] = home
    routing = config.ray.gpu_routing or ("smallest" if cluster.autoscaling else "spread")
    smallest = cluster.classes[0]
    if (
        routing == "spread"
        and not problems
        and all(
            h is smallest and h.resource not in p.resources
            for p in pools
            if (h := homes.get(id(p)))
        )
    ):
        alike = copy.copy(cluster)
        alike.gpu_gib, alike.classes = smallest.gpu_gib, []
        plan = _place(job, config, alike, pools)
        plan.cluster = cluster
        plan.notes.append(
            f"every GPU pool fits the smallest GPUs ({smallest.name}): none is pinned, they run "
            f"on all {cluster.gpus:g} GPUs (ray.gpu_routing=spread)"
        )
        return plan
    for p in pools:
        if id(p) in homes:
            home = homes[id(p)]
            p.node_type = home.name
            if home.resource:
                p.resources = {**p.resources, home.resource: p.resources.get(home.resource, 0.001)}
            by_class[home.name].append(p)
    rank = {m: i for i, m in enumerate(MODES)}
    merged = Plan(job, "streaming", cluster, pools, problems=problems)
    for c in cluster.classes:
        if not by_class[c.name]:
            continue
        sub = _place(
            job, config, Cluster(c.gpus, c.gpu_gib, cluster.cpus, c.name), by_class[c.name]
        )
        for routed, placed in zip(by_class[c.name], sub.pools, strict=True):  # sub has copies
            merged.pools[merged.pools.index(routed)] = placed
        if rank[sub.mode] > rank[merged.mode]:
            merged.mode = sub.mode
        merged.notes += [f"{c.name}: {n}" for n in sub.notes]
        merged.problems += [f"{c.name}: {n}" for n in sub.problems]
    return merged


def _place(job: str, config: RestageConfig, cluster: Cluster, pools: list[Pool]) -> Plan:
    """Place ``pools`` on ``cluster``'s GPUs, all alike."""
    plan = Plan(job, "streaming", cluster, pools)
    forced = config.ray.placement
    usable = cluster.gpu_gib * USABLE
    gpu_pools = [p for p in pools if p.gpu_fraction > 0 or p.gpu_gib > 0]
    if forced == "stage" and job not in STAGED_JOBS:
        plan.problems.append(
            f"ray.placement=stage: only {', '.join(STAGED_JOBS)} run stage by stage; unset it"
        )
        return plan
    if forced == "stage" and not gpu_pools:
        plan.mode = "stage"
        return plan
    if not gpu_pools:  # CPU only: train still sizes its workers
        return _plan_train(plan, usable) if job == "train" else plan
    if cluster.gpus <= 0:
        for p in gpu_pools:
            plan.problems.append(
                f"{p.name} ({'+'.join(p.roles)}) needs a GPU ({p.gpu_fraction:g} per actor, "
                f"~{p.gpu_gib:.1f} GiB) and the cluster has none: add GPU nodes, or run "
                "`--profile tiny` / set the role's device=cpu and num_gpus=0"
            )
        return plan

    if job == "train":
        return _plan_train(plan, usable)

    # Streaming: the configured fractions fit, and give each pool the memory it needs.
    short = [
        f"{p.name} needs ~{p.gpu_gib:.1f} GiB but num_gpus={p.gpu_fraction:g} gives "
        f"{p.gpu_fraction * usable:.1f} GiB usable"
        for p in gpu_pools
        if p.gpu_fraction * usable < p.gpu_gib
    ]
    if forced in (None, "streaming") and not short and _fits(_min_fractions(pools), cluster.gpus):
        return plan
    if forced == "stage":
        return _stage(plan, gpu_pools, usable)
    if forced == "streaming":
        plan.problems.append(
            "ray.placement=streaming but the configured fractions do not fit: "
            + ("; ".join(short) or f"they need more than {cluster.gpus:g} GPUs")
        )
        return plan
    plan.notes += [f"configured fractions not used: {s}" for s in short]

    too_big = [p for p in gpu_pools if _at_batch_one(p) > usable]
    for p in too_big:
        plan.problems.append(
            f"{p.name} ({'+'.join(p.roles)}) needs ~{_at_batch_one(p):.1f} GiB even at batch "
            f"size 1 and one GPU holds {usable:.1f} GiB usable ({cluster.source}): use GPUs "
            "with more memory, or a smaller model/resolution for that role"
        )
    if too_big:
        return plan

    packed = copy.deepcopy(plan)
    if forced in (None, "packed") and _pack(packed, usable):
        packed.mode = "packed"
        return packed
    if forced == "packed":
        plan.problems.append(
            f"ray.placement=packed but the pools need more than {cluster.gpus:g} GPU(s) of "
            f"{cluster.gpu_gib:g} GiB even at batch size 1"
        )
        return plan
    if job not in STAGED_JOBS:
        plan.problems.append(
            f"the {len(gpu_pools)} pools do not fit {cluster.gpus:g} GPU(s) of "
            f"{cluster.gpu_gib:g} GiB together: more or larger GPUs, or smaller batch sizes"
        )
        return plan
    plan.notes.append(
        f"the {len(gpu_pools)} model pools need {sum(p.gpu_gib for p in gpu_pools):.1f} GiB "
        f"together and {cluster.gpus:g} GPU(s) of {cluster.gpu_gib:g} GiB do not hold them at "
        "once: each model stage runs alone, its rows kept under <out>/_stages/"
    )
    return _stage(plan, gpu_pools, usable)


def _stage(plan: Plan, gpu_pools: list[Pool], usable: float) -> Plan:
    """Stage by stage: each pool alone on the GPUs, its fraction from memory."""
    plan.mode = "stage"
    for p in gpu_pools:
        _derive(p, usable, p.batch)
    return plan


def _at_batch_one(pool: Pool) -> float:
    return sum(n.at_batch(1).gpu_gib for n in pool.needs)


def _derive(pool: Pool, usable: float, batch: dict[str, int]) -> None:
    """Set the pool's batch sizes, and its GPU fraction from the memory they need."""
    pool.needs = [n.at_batch(batch[n.role]) for n in pool.needs]
    pool.batch = dict(batch)
    pool.gpu_fraction = min(1.0, _round_up(pool.gpu_gib / usable)) if pool.gpu_gib else 0.0


def _pack(plan: Plan, usable: float) -> bool:
    """Fractions from memory; halve the largest batch until the pools fit, or give up."""
    pools = [p for p in plan.pools if p.gpu_gib > 0]
    for p in pools:
        _derive(p, usable, p.batch)
    while not _fits(_min_fractions(pools), plan.cluster.gpus):
        # The role whose activations take the most memory across pools gives way first.
        best = None
        for p in pools:
            for n in p.needs:
                b = p.batch[n.role]
                gain = n.gpu_gib - n.at_batch(b // 2).gpu_gib if b > 1 else 0.0
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, n.role)
        if best is None:
            return False
        role = best[1]
        for p in pools:
            if role in p.batch:
                _derive(p, usable, {**p.batch, role: p.batch[role] // 2})
        plan.notes.append(f"{role}.batch_size halved to fit: {pools_batch(pools, role)}")
    return True


def pools_batch(pools: list[Pool], role: str) -> int:
    return next(p.batch[role] for p in pools if role in p.batch)


def _plan_train(plan: Plan, usable: float) -> Plan:
    pool = plan.pools[0]
    need = pool.needs[0]
    per_worker = pool.gpu_fraction
    if per_worker and need.gpu_gib > usable * max(per_worker, 1):
        plan.problems.append(
            f"a LoRA training worker needs ~{need.gpu_gib:.1f} GiB and one GPU holds "
            f"{usable:.1f} GiB usable: lower train.batch_size, train.products_per_step or "
            "train.resolution, keep "
            "train.gradient_checkpointing=true, or use larger GPUs"
        )
    # The workers the cluster holds, by GPUs and by CPUs (Ray Train waits for a whole group:
    # more would never start). Too few CPUs for even one is build_plan's problem already.
    holds = max(1, int(plan.cluster.cpus // pool.cpus))  # train.cpus_per_worker > 0
    if per_worker:
        by_gpus = int(plan.cluster.gpus // per_worker)
        if by_gpus < 1:
            plan.problems.append(
                f"train.gpus_per_worker={per_worker:g} and the cluster has "
                f"{plan.cluster.gpus:g} GPUs: lower train.gpus_per_worker or add GPUs"
            )
            return plan
        holds = min(holds, by_gpus)
    what = f"{per_worker:g} GPU and {pool.cpus:g} CPUs" if per_worker else f"{pool.cpus:g} CPUs"
    if pool.actors[1] is None:
        plan.notes.append(f"train.num_workers: {holds}, the workers of {what} the cluster holds")
        pool.actors = (1, holds)
    elif holds < pool.actors[1]:
        plan.notes.append(
            f"train.num_workers={pool.actors[1]} capped at {holds}: the cluster holds {holds} "
            f"worker(s) of {what}"
        )
        pool.actors = (1, holds)
    return plan


# --------------------------------------------------------------------------- preflight


def preflight(config: RestageConfig, job: str) -> tuple[RestageConfig, Plan]:
    """Check ``job`` against its Ray cluster and its checkpoints before any work; raise
    ``PlanError`` if it cannot run. A local Ray is planned for without starting it, so a job
    that cannot run ends in seconds. -> the config to run with (the plan's fractions
    applied) and the plan."""
    import logging

    import ray

    from ray_app.checkpoints import check
    from ray_app.runtime import init_ray

    if ray.is_initialized() or config.ray.address or os.environ.get("RAY_ADDRESS"):
        init_ray(config)  # joins the cluster (or keeps the Ray already running)
        cluster = Cluster.from_ray(config)
    else:
        cluster = Cluster.local(config)
    plan = build_plan(job, config, cluster)
    roles = [("generator" if n.role == "train" else n.role) for p in plan.pools for n in p.needs]
    plan.problems += check(config, roles)
    if not plan.runnable:
        raise PlanError(render(plan))
    log = logging.getLogger("restage")
    log.info("placement: %s mode on %s", plan.mode, describe_cluster(plan.cluster))
    for note in plan.notes:
        log.info("placement: %s", note)
    return plan.apply(config), plan


def _source_ref(source: str, sources: list[str]) -> str:
    """``estimated [2]``: the kind of figure, and a footnote number for its full source."""
    if source not in sources:
        sources.append(source)
    return f"{source.split(':')[0].split(' (')[0]} [{sources.index(source) + 1}]"


def describe_cluster(c: Cluster) -> str:
    gpus = f"{c.gpus:g} GPU(s) of {c.gpu_gib:g} GiB" if c.gpus else "no GPUs"
    if c.classes:
        gpus = " + ".join(f"{k.gpus:g} GPU(s) of {k.gpu_gib:g} GiB ({k.name})" for k in c.classes)
    return f"{gpus}, {c.cpus:g} CPUs"


def render(plan: Plan) -> str:
    """The plan as a table and notes (what `restage plan` prints)."""
    from ray_app.report import format_table

    lines = [
        f"restage {plan.job}: {plan.mode} mode{', stages fused' if plan.fused else ''} on "
        f"{describe_cluster(plan.cluster)}"
        f" ({plan.cluster.source})"
    ]
    rows, sources = [], []
    for p in plan.pools:
        for i, n in enumerate(p.needs):
            rows.append(
                [
                    p.name if i == 0 else "",
                    n.role,
                    actors_range(*p.actors) if i == 0 else "",
                    f"{p.gpu_fraction:g}" if i == 0 else "",
                    f"{n.gpu_gib:.1f}",
                    p.batch.get(n.role, ""),
                    f"{p.cpus:g}" if i == 0 else "",
                    p.node_type if i == 0 else "",
                    _source_ref(n.source, sources),
                ]
            )
    headers = ["pool", "role", "actors", "GPU/actor", "GiB", "batch", "CPU", "node", "figures"]
    lines.append(format_table(headers, rows))
    lines += [f"[{i}] {src}" for i, src in enumerate(sources, 1)]
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"cannot run: {p}" for p in plan.problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------- cost estimate


@dataclass
class StageCost:
    pool: str
    items: float  # per product
    unit: str
    seconds_per_item: float
    source: str

    @property
    def seconds(self) -> float:
        return self.items * self.seconds_per_item


class Items(NamedTuple):
    """What a pool does per product: ``count`` items of ``unit``, each worth ``role_items``
    of its role's own item (a role's seconds are per image; a training step is many)."""

    count: float
    unit: str
    role_items: float = 1.0


# A training step passes each of its images forward and back through the frozen encoder
# (gradients of the activations, not of the base weights): about two forward passes.
ENCODER_TRAIN_PASSES = 2.0


def items_per_product(
    job: str, config: RestageConfig, photos: int, products: int = 1
) -> dict[str, Items]:
    """Items each pool processes per product, from the config (``photos`` inputs each;
    ``products`` in the run, for personalize-evaluate, whose work per product grows with
    the test set)."""
    if job == "augment":
        a = config.augment
        views = photos * len(a.views.frame_indices) if a.views.enabled else 0
        contexts = (photos + views) * a.contexts.per_image if a.contexts.enabled else 0
        # As pipelines/augment.py sizes them: the ratio's share of every positive, oversampled;
        # counterfactuals are inpainted, in-class negatives generated; none of a kind that is off.
        negatives = (
            math.ceil((photos + views + contexts) / a.negatives.ratio * a.negatives.oversample)
            if a.negatives.enabled or a.counterfactuals.enabled
            else 0
        )
        counterfactuals = round(negatives * a.counterfactual_share)
        return {
            "caption": Items(photos, "image"),
            "views": Items(photos if a.views.enabled else 0, "clip"),
            "segment": Items(photos + views, "image"),
            "inpaint": Items(contexts + counterfactuals, "image"),
            "negatives": Items(negatives - counterfactuals, "image"),
            "resegment": Items(contexts + negatives, "image"),
            "score": Items(contexts + negatives, "image"),
        }
    if job == "generate":
        n = config.generate.prompts_per_product * config.generate.images_per_prompt
        return {
            "generate": Items(n, "image"),
            "segment": Items(n, "image"),
            "score": Items(n, "image"),
        }
    if job == "train":
        return {"train": Items(config.train.steps, "step")}
    if job == "personalize":
        # actors/encoder_trainer.py: every image of a step goes through the encoder with
        # gradients.
        p = config.personalize
        return {"train": Items(p.steps, "step", p.images_per_step * ENCODER_TRAIN_PASSES)}
    if job == "personalize-evaluate":
        # pipelines/personalize_evaluate.py: every product's encoder embeds its references and
        # the whole test pool (every product's val and test images; with groups, its group's:
        # then ``products`` is a group's), and the pretrained encoder embeds the test set once
        # (its share per product: the photos).
        refs = min(config.personalize.evaluate.references, photos)
        pool = products * (photos - refs)
        return {"evaluate": Items(refs + pool + photos, "image")}
    if job == "evaluate":
        # One run of generate's images (prompts x images per product) and the photos; each
        # further run adds its images to every pool.
        n = config.generate.prompts_per_product * config.generate.images_per_prompt
        pools = {"score": Items(n + photos, "image"), "inception": Items(n + photos, "image")}
        if config.evaluate.segment:
            pools["segment"] = Items(n + photos, "image")
        return pools
    if job == "index":
        return {"segment": Items(photos, "image"), "embed": Items(photos, "image")}
    if job == "stage":
        # one photo segmented and embedded; top_k scenes removed (+ gaps), composited,
        # re-segmented and scored
        s = config.stage
        paints = s.top_k * (2 if s.refine_gaps else 1)
        return {
            "segment": Items(1, "image"),
            "retrieve": Items(1, "image"),
            "compose": Items(paints, "image"),
            "score": Items(s.top_k, "image"),
        }
    raise ConfigError(
        f"no cost model for {job!r}: use augment, train, generate, evaluate, index, stage, "
        "personalize or personalize-evaluate"
    )


def _bench_seconds(job: str, pool: str) -> tuple[float, str] | None:
    """Seconds per role item (an image; for personalize, an image's pass of a step) of a pool
    measured by a bench run of the tiny profile, if any: ``bench/augment.py``'s Ray stages,
    or ``bench/personalize.py``'s training steps."""
    import json

    from ray_app.resources import RESULTS

    path = RESULTS / f"{job}_tiny_cpu.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    source = f"measured on CPU: bench/results/{path.name}"
    if job == "personalize" and pool == "train" and "train" in result:
        from ray_app.config import PersonalizeConfig

        images = PersonalizeConfig.model_validate(result["personalize"]).images_per_step
        return result["train"]["seconds_per_step"] / (images * ENCODER_TRAIN_PASSES), source
    for stage in result.get("ray", {}).get("stages", []):
        if stage["stage"] == pool and stage.get("items_in"):
            return stage["seconds"] / stage["items_in"], source
    return None


def _home(pool: Pool, cluster: Cluster, devices: float) -> float:
    """The devices a pool may use: its GPU class's in a mixed cluster, else all of them."""
    return next((c.gpus for c in cluster.classes if c.name == pool.node_type), devices)


def _parallel(pool: Pool, cluster: Cluster, devices: float) -> float:
    """How many of the devices one pool can keep busy: an actor runs one call at a time on one
    device (a GPU, or its CPU slot), so a pool of at most ``max_actors`` actors uses at most
    that many, however many GPUs the cluster has; in a mixed cluster, at most its GPU
    class's. A pool without a GPU on a GPU cluster is bounded by its actors and the CPUs."""
    most = math.inf if pool.actors[1] is None else float(pool.actors[1])
    if cluster.gpus > 0 and not (pool.gpu_fraction > 0 or pool.gpu_gib > 0):
        return min(most, max(1.0, cluster.cpus / max(pool.cpus, 1e-9)))
    return min(_home(pool, cluster, devices), most)


def estimate(plan: Plan, config: RestageConfig, products: int, photos: int = 4) -> dict[str, Any]:
    """GPU-hours and wall hours for ``products`` products under ``plan``, with every figure's
    source. Wall time: the pools run at once (streaming, packed) and keep every device busy
    at best, unless a pool's actors cannot: a pool of at most A actors works through its
    items on at most A devices, so the slowest such pool can set the pace. Stage by stage,
    the pools run one after the other, each on at most its actors' devices."""
    items = items_per_product(plan.job, config, photos, products)
    on_gpus = plan.cluster.gpus > 0
    devices = plan.cluster.gpus if on_gpus else max(1.0, plan.cluster.cpus)
    costs, parallel, used = [], [], []
    for pool in plan.pools:
        if pool.name not in items:
            continue
        n, unit, role_items = items[pool.name]
        hit = _bench_seconds(plan.job, pool.name) if config.profile == "tiny" else None
        if hit:
            per_role_item, source = hit
        else:
            per_role_item = sum(need.seconds_per_item for need in pool.needs)
            source = "; ".join(dict.fromkeys(n_.source for n_ in pool.needs))
        sec = role_items * per_role_item
        if role_items != 1:
            source += f" (x {role_items:g} per {unit})"
        costs.append(StageCost(pool.name, n, unit, sec, source))
        parallel.append(_parallel(pool, plan.cluster, devices))
        used.append(pool)
    per_product = sum(c.seconds for c in costs)
    # wall seconds per product of each pool on its own devices, and of the whole on all: in a
    # mixed cluster, of each GPU class's pools on that class (the others' GPUs cannot help)
    pool_wall = [c.seconds / max(k, 1e-9) for c, k in zip(costs, parallel, strict=True)]
    by_home: dict[str, float] = {}
    for pool, c in zip(used, costs, strict=True):
        by_home[pool.node_type] = by_home.get(pool.node_type, 0.0) + c.seconds
    homes = {p.node_type: _home(p, plan.cluster, devices) for p in used}
    whole = max([sec / homes[h] for h, sec in by_home.items()], default=0.0)
    wall = sum(pool_wall) if plan.mode == "stage" else max([whole, *pool_wall])
    bottleneck = None
    if costs:
        bottleneck = costs[max(range(len(costs)), key=lambda i: pool_wall[i])].pool
    kind = "GPU" if on_gpus else "CPU"
    capped = [
        f"{c.pool} runs at most {pool.actors[1]} actor(s) and the cluster has "
        f"{homes[pool.node_type]:g} {kind}s {'of ' + pool.node_type + ' ' if pool.node_type else ''}"
        f"for it: raise {_actors_knob(plan.job, pool)}"
        for pool, c, k, w in zip(used, costs, parallel, pool_wall, strict=True)
        # more actors would let all its devices work on it (an uncapped pool has them all)
        if pool.actors[1] is not None and k < homes[pool.node_type] and w > whole
    ]
    return {
        "products": products,
        "photos_per_product": photos,
        "seconds_per_product": round(per_product, 3),
        "gpu_hours": round(per_product * products / 3600, 1) if on_gpus else 0.0,
        "wall_hours": round(wall * products / 3600, 2),
        "bottleneck": bottleneck,
        "stages": [
            {**asdict(c), "seconds": round(c.seconds, 3), "parallel": k}
            for c, k in zip(costs, parallel, strict=True)
        ],
        "capped": capped,
        "assumes": f"{photos} photos per product; the pools "
        + ("one after the other" if plan.mode == "stage" else "at once")
        + f" on {devices:g} {kind}(s)"
        + (", each GPU class's pools on that class's" if any(p.node_type for p in used) else "")
        + ", each pool on at most as many as its actors, every one busy; seconds per item "
        "from the sources listed (estimated figures are not measured)",
    }


def actors_range(least: int, most: int | None) -> str:
    """An actor pool's size as tables print it: ``1-8``, or ``1+`` without a cap."""
    return f"{least}+" if most is None else f"{least}-{most}"


def _actors_knob(job: str, pool: Pool) -> str:
    """The setting that sizes ``pool`` (a pool's actors come from its first role's)."""
    return "train.num_workers" if job == "train" else f"{pool.roles[0]}.max_actors"


def total_estimate(steps: list[Step], estimates: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost of steps that run one after the other: their hours add up."""
    per_step = [
        {"step": s.title, "seconds_per_product": e["seconds_per_product"]}
        for s, e in zip(steps, estimates, strict=True)
    ]
    return {
        "products": estimates[0]["products"],
        "seconds_per_product": round(sum(e["seconds_per_product"] for e in estimates), 3),
        "gpu_hours": round(sum(e["gpu_hours"] for e in estimates), 1),
        "wall_hours": round(sum(e["wall_hours"] for e in estimates), 2),
        "bottleneck": max(per_step, key=lambda s: s["seconds_per_product"])["step"],
        "steps": per_step,
    }


def render_estimate(est: dict[str, Any]) -> str:
    from ray_app.report import format_table

    sources: list[str] = []
    rows = [
        [s["pool"], f"{s['items']:g} {s['unit']}s", f"{s['seconds_per_item']:.3g}",
         f"{s['seconds']:.1f}", _source_ref(s["source"], sources)]
        for s in est["stages"]
    ]  # fmt: skip
    return "\n".join(
        [
            f"cost of {est['products']:,} products: {est['gpu_hours']:,} GPU-hours, "
            f"{est['wall_hours']:,} hours of wall time; bottleneck: {est['bottleneck']}",
            format_table(["pool", "per product", "s/item", "s/product", "source"], rows),
            *(f"[{i}] {src}" for i, src in enumerate(sources, 1)),
            *(f"capped: {c}" for c in est.get("capped", ())),
            f"assumes: {est['assumes']}",
        ]
    )
