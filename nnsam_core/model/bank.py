"""The embedding bank: each slice's embedding, computed once by the frozen encoder and kept (float16) in memory."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch

from ..encoders import EMBEDDING_CHANNELS, FrozenEncoder


class EmbeddingBank:
    """Embeddings of whole slices by key. ``load_slices(keys)`` returns the nnU-Net-normalised slices (a list of
    (H, W) arrays) for keys not yet held."""

    def __init__(self, encoder: FrozenEncoder, load_slices: Callable[[list[int]], list[np.ndarray]],
                 batch_size: int = 8, max_entries: int = 100_000):
        self.encoder = encoder
        self.load_slices = load_slices
        self.batch_size = batch_size
        self.max_entries = max_entries
        self._store: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self.encoder_calls = 0  # slices passed through the encoder (the speed benchmark counts them)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> list[int]:
        return list(self._store)

    def warm(self, keys: Sequence[int]) -> None:
        """Compute missing embeddings in batches (slices of equal size batched together)."""
        missing = [k for k in dict.fromkeys(int(k) for k in keys) if k not in self._store]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            slices = self.load_slices(chunk)
            by_shape: dict[tuple, list[int]] = {}
            for i, s in enumerate(slices):
                by_shape.setdefault(tuple(s.shape), []).append(i)
            for indices in by_shape.values():
                batch = torch.from_numpy(np.stack([np.asarray(slices[i], dtype=np.float32) for i in indices]))[:, None]
                embeddings = self.encode(batch).to("cpu", torch.float16)
                for i, emb in zip(indices, embeddings):
                    self._store[chunk[i]] = emb
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """Run the frozen encoder on (B, 1, H, W) slices now, counting the calls; nothing is stored."""
        self.encoder_calls += slices.shape[0]
        return self.encoder(slices)

    def get(self, keys: Sequence[int], device: torch.device) -> torch.Tensor:
        """Embeddings of ``keys`` (0: padding, zeros) on ``device``, float32."""
        keys = [int(k) for k in keys]
        self.warm([k for k in keys if k > 0])
        out = []
        for k in keys:
            if k > 0:
                self._store.move_to_end(k)
                out.append(self._store[k])
            else:
                out.append(torch.zeros_like(next(iter(self._store.values()))) if self._store else
                           torch.zeros((EMBEDDING_CHANNELS, 64, 64), dtype=torch.float16))
        return torch.stack(out).to(device=device, dtype=torch.float32, non_blocking=True)

    def drop(self, keys: Sequence[int]) -> None:
        for k in keys:
            self._store.pop(int(k), None)

    def channel_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over every held embedding (for ``embedding_norm='standardise'``)."""
        stacked = torch.stack(list(self._store.values())).float()  # (N, C, h, w)
        mean = stacked.mean(dim=(0, 2, 3))
        std = stacked.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return mean, std
