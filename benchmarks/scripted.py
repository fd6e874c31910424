"""Scripted stand-ins for the engine and embedder actors (benchmark-only code, never used by the pipeline).

:class:`ScriptedEngine` has the API of ``actors.engine.GenerationEngine`` (``ready``, ``generate``, ``metrics``) and
answers instantly with deterministic, varied text derived from each row's seed, so every node passes the filters
and siblings never collide. :class:`ScriptedEmbedder` has the API of ``actors.embedder.Embedder`` and returns random
unit vectors seeded by a hash of each text, so the dedup bookkeeping (embedding transfer, kept-question memory,
similarity pass) still runs. With both, ``pipeline.generate.generate`` measures only Ray Data, routing, filters,
dedup and Parquet: the orchestration cost per node.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

__all__ = ["ScriptedEmbedder", "ScriptedEngine"]

_WORDS = (
    "river mountain theory protein market orbit language circuit garden history algebra climate poem bridge "
    "vaccine engine melody glacier census harbor enzyme ledger canyon violin comet tariff fossil compiler lens"
).split()


class ScriptedEngine:
    """Instant fake engine: ``generate`` returns one 8-12 word sentence per prompt, chosen by the seed."""

    def __init__(self, model: str = "scripted", *, engine_kwargs: dict | None = None, env: dict | None = None):
        self.calls = 0
        self.prompts = 0

    def ready(self) -> float:
        return 0.0

    def generate(self, prompts: list[str], seeds: list[int], *, max_tokens: int, stop: list[str], sampling: dict):
        texts = []
        for s in seeds:
            rng = random.Random(int(s))
            words = rng.choices(_WORDS, k=rng.randint(8, 12))
            texts.append(f"Why does {' '.join(words)} matter number {int(s)}?")
        self.calls += 1
        self.prompts += len(prompts)
        return {
            "text": texts,
            "n_tokens": [len(t) // 4 for t in texts],  # ~4 characters per token
            "finish_reason": ["stop"] * len(texts),
            "prompt_tokens": [len(p) // 4 for p in prompts],
        }

    def metrics(self) -> dict[str, float]:
        return {"calls": self.calls, "start_seconds": 0.0, "vllm:request_success": float(self.prompts)}


class ScriptedEmbedder:
    """Fake sentence embedder: a random unit vector per text, seeded by a hash of the text (same text, same vector)."""

    def __init__(self, dim: int = 384):
        self._dim = dim

    def ready(self) -> int:
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        seeds = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        for i, s in enumerate(seeds):
            out[i] = np.random.default_rng(s).standard_normal(self._dim, dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
