"""The stager: `restage stage` for one product on line (the body of ``POST /v1/stage``).

The replica loads the search index once and the stage job's own model stages
(pipelines/stage.py: segmenter, clip + the index, inpainter, clip + segmenter), and runs a
product through them in order: an uploaded photo is decoded with the jobs' rules
(``images.*``: size limits, decompression bombs, formats), cut out without a model when it
is a packshot (plain background or alpha), else by the segmenter; then retrieval,
composition and scoring exactly as in the job. The answer holds the best ``keep`` staged
images with their scene, similarity, placement and scores.
"""

from __future__ import annotations

import time
from typing import Any

from pipelines._product_rows import pack, unpack
from pipelines.stage import Compose, Retrieve, Score, SegmentProducts, StageProduct, cut_out
from ray_app.config import RestageConfig
from ray_app.images import load_images
from ray_app.records import ProductRecord

UPLOAD = "upload"  # the uri an uploaded photo gets in the product's record


class StageInputError(ValueError):
    """The uploaded photo cannot be staged (not an image, too large, no product in it)."""


class StagerReplica:
    """The body of the ``Stager`` Serve deployment (plain Python, testable without Serve)."""

    def __init__(self, config: RestageConfig, index_uri: str):
        self.config = config
        segment, retrieve = SegmentProducts(config), Retrieve(config, index_uri)
        # one CLIP and one segmenter in the replica: scoring shares those of its other stages
        score = Score(config, clip=retrieve.model, segmenter=segment.model)
        self.stages = [segment, retrieve, Compose(config), score]

    def decode(self, product_id: str, data: bytes, category: str | None) -> StageProduct:
        """The uploaded photo decoded with the jobs' rules and cut out when it can be
        without a model. Raises ``StageInputError`` naming what is wrong."""
        img = self.config.images
        loaded, failed = load_images(
            [UPLOAD],
            max_megapixels=img.max_megapixels,
            max_side=img.max_side,
            min_side=img.min_side,
            read=lambda _: data,
        )
        if failed:
            raise StageInputError(failed[0][1])
        state = StageProduct(ProductRecord(product_id, (UPLOAD,), category), root="")
        cut_out(state, loaded, self.config.stage.segment)
        return state

    def stage(
        self, product_id: str, data: bytes, category: str | None, keep: int
    ) -> dict[str, Any]:
        """-> ``images``: the best ``keep`` staged images (PNG bytes) with their scene,
        similarity, placement and scores, best first; ``timings`` in ms per stage."""
        start = time.perf_counter()
        state = self.decode(product_id, data, category)
        timings = {"decode_ms": (time.perf_counter() - start) * 1000}
        for stage in self.stages:
            begin = time.perf_counter()
            (state,) = unpack(stage(pack([state])))
            timings[f"{stage.name}_ms"] = (time.perf_counter() - begin) * 1000
            if state.failed:
                raise StageInputError(state.failed)
        ranked = sorted(
            (s for s in state.scenes if s.rank is not None and s.image is not None),
            key=lambda s: s.rank,
        )
        images = [
            {
                "data": s.image,
                "scene_image_id": s.scene_image_id,
                "scene_product_id": s.scene_product_id,
                "similarity": s.similarity,
                "placement": [s.placement.x0, s.placement.y0, s.placement.x1, s.placement.y1],
                "score": s.score,
                "scores": s.scores,
                "rank": s.rank,
            }
            for s in ranked[:keep]
        ]
        return {"images": images, "mask_method": state.mask_method, "timings": timings}


def serve_deployment(config: RestageConfig):
    """The Ray Serve ``Stager`` deployment: the resources of the roles it loads."""
    from ray import serve

    roles = ("inpainter", "segmenter", "clip")
    options = {
        "num_gpus": sum(config.role(r).num_gpus for r in roles),
        "num_cpus": config.inpainter.num_cpus,
        "resources": {k: v for r in roles for k, v in config.role(r).resources.items()},
    }

    @serve.deployment(
        name="Stager",
        num_replicas=config.serve.stager_replicas,
        ray_actor_options=options,
        max_ongoing_requests=1,  # one staging at a time: its models are not shared
    )
    class Stager:
        def __init__(self, config: RestageConfig, index_uri: str):
            self.replica = StagerReplica(config, index_uri)

        def stage(
            self, product_id: str, data: bytes, category: str | None, keep: int
        ) -> dict[str, Any]:
            """-> the replica's answer, or ``{"error": reason}`` for an unstageable photo
            (a 422, not a failure of the replica)."""
            try:
                return self.replica.stage(product_id, data, category, keep)
            except StageInputError as exc:
                return {"error": str(exc)}

    return Stager
