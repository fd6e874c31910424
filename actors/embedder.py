"""Sentence-embedding actor for question deduplication: loads the model once per run."""

from __future__ import annotations

import numpy as np

__all__ = ["Embedder"]


class Embedder:
    """Wraps a sentence-transformers model (default all-MiniLM-L6-v2, 384-d).

    Args:
        path: sentence-transformers folder or hub id.
        batch_size: texts per forward pass.
    """

    def __init__(self, path: str, *, batch_size: int = 256):
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(path, device="cpu")
        self._batch_size = batch_size

    def ready(self) -> int:
        """The embedding dimension."""
        return int(self._model.get_sentence_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        out = self._model.encode(
            list(texts), batch_size=self._batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return out.astype(np.float32, copy=False)
