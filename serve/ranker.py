"""The ranker deployment: orders a request's images by the same score as `restage
generate`: its metrics (CLIP-T, CLIP-I, DINO and their segmented variants against the
product's real images, and personal_fidelity where ``scoring.encoders`` has the product's
encoder) made one score by ``generate.ranking`` (ray_app/ranking.py). No
threshold: a request gets every image it asked for, ranked."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from actors.personal_fidelity import personal_encoders
from actors.scorer import ReferenceEmbeddings, Scorer, ScoringOptions, references
from ray_app.adapter_meta import AdapterMeta
from ray_app.config import RestageConfig
from ray_app.kinds import Metric
from ray_app.ranking import build as build_ranking
from ray_app.ranking import rank_and_keep

# The reference embeddings of this many products stay cached per replica (a few KiB each
# with the real checkpoints: 4 embeddings per real image).
REFERENCE_CACHE = 1024


class RankerReplica:
    """The body of the ``Ranker`` Serve deployment (plain Python, testable without Serve)."""

    def __init__(self, config: RestageConfig):
        g, segment = config.generate, config.generate.segment
        self.ranking = build_ranking(g, config.scoring)
        self.scorer = Scorer(
            config.model_spec("clip"),
            config.model_spec("dino"),
            ScoringOptions(g.weights, config.scoring.ranges, self.ranking),
            segmenter=config.model_spec("segmenter") if segment else None,
            segmentation=config.serve.ranker_segmentation if segment else None,
            personal=personal_encoders(config.scoring, config.personalize, config.model_spec),
        )
        self._references: OrderedDict[tuple[str, str], ReferenceEmbeddings] = OrderedDict()
        self.reference_loads = 0

    def references(self, meta: AdapterMeta) -> ReferenceEmbeddings:
        """The product's real images, embedded once and cached (LRU). Keyed by the adapter's
        weights too, so that a retrained product is embedded afresh."""
        key = (meta.product_id, meta.weights_sha256)
        if key in self._references:
            self._references.move_to_end(key)
            return self._references[key]
        images, masks = references(meta)
        if not images:
            raise ValueError(f"product {meta.product_id!r} has no real image in its training set")
        embedded = self.scorer.embed_references(images, masks, meta.product_id)
        self._references[key] = embedded
        self.reference_loads += 1
        while len(self._references) > REFERENCE_CACHE:
            self._references.popitem(last=False)
        return embedded

    def rank(self, meta: AdapterMeta, images: list[bytes], prompt: str) -> dict[str, list[Any]]:
        """-> ``ranks`` (1 = best, None when unscorable), ``scores`` and ``metrics`` per
        image, and the ``ranking`` that made the scores."""
        out = self.scorer.score(images, [prompt] * len(images), self.references(meta))
        ranks, _ = rank_and_keep(
            out["score"], [f"{i:03d}" for i in range(len(images))], len(images), -math.inf
        )

        def value(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {
            "ranks": ranks,
            "scores": [value(s) for s in out["score"]],
            "metrics": [{m.value: value(out[m][i]) for m in Metric} for i in range(len(images))],
            "ranking": self.ranking.name,
        }


def serve_deployment(config: RestageConfig):
    """The Ray Serve ranker deployment class (GPUs of the roles it loads)."""
    from ray import serve

    roles = [*config.scoring.roles()] + (["segmenter"] if config.generate.segment else [])
    gpus = sum(config.role(r).num_gpus for r in roles)

    @serve.deployment(
        name="Ranker",
        num_replicas=config.serve.ranker_replicas,
        ray_actor_options={
            "num_gpus": gpus,
            "num_cpus": config.clip.num_cpus,
            "resources": {k: v for r in roles for k, v in config.role(r).resources.items()},
        },
        max_ongoing_requests=config.serve.max_ongoing_requests,
    )
    class RankerDeployment:
        def __init__(self, config: RestageConfig):
            self.replica = RankerReplica(config)

        def rank(
            self, product_id: str, meta: AdapterMeta, images: list[bytes], prompt: str
        ) -> dict:
            return self.replica.rank(meta, images, prompt)

    return RankerDeployment
