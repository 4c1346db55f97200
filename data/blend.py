"""Blending sources by weight: global sample i -> (source, that source's sample number).

Weights are normalised (megatron-core's semantics). The global sample stream is periodic with period
``PERIOD`` = 65,536 samples: in every period source d gets exactly ``n_d`` samples, the Sainte-Laguë
apportionment of the period to the weights (|n_d - w_d * PERIOD| <= 1), in the order of their ideal times
``(k + 0.5) / w_d`` (ties by source order). So every prefix of the stream, and every global batch, draws each
source in proportion up to about one sample, and the mapping is O(1) arithmetic: nothing is stored per sample,
a run can go on forever, resume anywhere and at any data-parallel size, and ``counts(n)`` (samples drawn from
each source among the first n) is closed form, which gives the tokens consumed per source for free.
megatron-core's BlendedDataset uses a greedy rule over a stored index instead; both keep each source within
about one sample of its share.
"""
from __future__ import annotations

import numpy as np

PERIOD = 1 << 16


def blend_pattern(weights: list[float], period: int = PERIOD) -> np.ndarray:
    """Source id of each position in one period (int32 [period])."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or w.size == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"blend weights must be finite, >= 0 and sum to > 0, got {list(weights)}")
    w = w / w.sum()
    ids, times = [], []
    for d, wd in enumerate(w):
        if wd > 0:
            k = np.arange(int(np.ceil(period * wd)) + 2, dtype=np.float64)
            ids.append(np.full(k.size, d, np.int32))
            times.append((k + 0.5) / wd)
    ids, times = np.concatenate(ids), np.concatenate(times)
    return ids[np.lexsort((ids, times))[:period]]


class Blend:
    """``locate(i) -> (source ids, per-source sample numbers)`` and ``counts(n)`` for normalised ``weights``."""

    def __init__(self, weights: list[float], names: list[str] | None = None, period: int = PERIOD):
        self.period = period
        self.pattern = blend_pattern(weights, period)
        n = len(weights)
        self.per_period = np.bincount(self.pattern, minlength=n).astype(np.int64)
        names = names or [str(i) for i in range(n)]
        for d, (wd, nd) in enumerate(zip(weights, self.per_period)):
            if wd > 0 and nd == 0:
                raise ValueError(f"data source {names[d]}: weight {wd} is below 1/{period} of the total weight "
                                 f"({sum(weights)}); it would never be sampled")
        rank = np.zeros(period, np.int64)  # position of each slot among its source's slots in the period
        for d in range(n):
            slots = np.flatnonzero(self.pattern == d)
            rank[slots] = np.arange(slots.size)
        self.rank = rank

    def locate(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        block, pos = np.divmod(np.asarray(i, np.int64), self.period)
        d = self.pattern[pos]
        return d, block * self.per_period[d] + self.rank[pos]

    def counts(self, n: int) -> np.ndarray:
        """Samples drawn from each source among the first ``n`` global samples."""
        block, rem = divmod(int(n), self.period)
        return block * self.per_period + np.bincount(self.pattern[:rem], minlength=self.per_period.size)


class BlendedSamples:
    """The global sample stream of several ``SourceSamples`` mixed by weight (see the module docstring)."""

    def __init__(self, sources: list, weights: list[float]):
        if len(sources) != len(weights) or not sources:
            raise ValueError("need one weight per source and at least one source")
        if len({s.seq_len for s in sources}) != 1:
            raise ValueError("all sources of a blend must use the same seq_len")
        self.sources, self.weights = sources, [float(w) for w in weights]
        self.names = [s.name for s in sources]
        self.seq_len = sources[0].seq_len
        self.blend = Blend(self.weights, self.names)

    def windows(self, i: np.ndarray, segments: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Token windows [len(i), seq_len + 1] of global samples ``i`` (with ``segments``: and each token's document
        index within its window, ``SourceSamples.windows``)."""
        d, j = self.blend.locate(i)
        out = np.empty((len(d), self.seq_len + 1), np.int64)
        seg = np.empty((len(d), self.seq_len + 1), np.int32) if segments else None
        for src in np.unique(d):
            rows = np.flatnonzero(d == src)
            if segments:
                out[rows], seg[rows] = self.sources[src].windows(j[rows], segments=True)
            else:
                out[rows] = self.sources[src].windows(j[rows])
        return out if seg is None else (out, seg)

    def counts(self, n: int) -> np.ndarray:
        return self.blend.counts(n)

    def identity(self) -> dict:
        """What a checkpointed position refers to: resuming with other sources or weights is an error."""
        return {"sources": self.names, "weights": self.weights, "seq_len": self.seq_len,
                "seed": self.sources[0].seed, "samples_per_epoch": [s.samples_per_epoch for s in self.sources]}
