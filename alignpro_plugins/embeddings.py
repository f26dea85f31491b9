"""Sentence similarity with a small encoder (mean pooling), used by the intent guard."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from alignpro_plugins.models import resolve_model


class Embedder:
    def __init__(
        self, model: str = "all-minilm-l6-v2", *, device: str = "cpu", max_length: int = 256
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.max_length = max_length
        self._lock = threading.Lock()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with self._lock:
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of a[i] and b[i]."""
        ea, eb = self.embed(a), self.embed(b)
        return (ea * eb).sum(-1).tolist()
