"""Seeds derived from (run seed, product_id, stage, index): a re-run reproduces its outputs,
and no two (product, stage, index) triples share a random stream."""

from __future__ import annotations

import hashlib

# Seeds travel in JSON (HTTP responses, manifests read by any client): JavaScript numbers
# hold integers exactly only below 2**53, so every seed is drawn below it.
SEED_BITS = 53


def derive_seed(product_id: str, stage: str, index: int = 0, run_seed: int = 0) -> int:
    """A 53-bit seed, stable across processes and Python versions (no ``hash()``)."""
    key = f"{run_seed}\x1f{product_id}\x1f{stage}\x1f{index}".encode()
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return digest >> (64 - SEED_BITS)
