"""The global gradient norm's arithmetic (muonclip/grad_norm.py): the same row norms summed in float64 whether a
tensor is whole (one process) or split by rows (ZeRO-1's slices of the embedding and the head)."""
from __future__ import annotations

import pytest
import torch

from muonclip.grad_norm import sum_of_squares


def test_a_tensor_split_by_rows_sums_to_its_whole_norm_and_to_float64():
    g = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0)) * 1e-3
    g[torch.rand(4096, generator=torch.Generator().manual_seed(1)) < 0.5] = 0  # rare tokens' rows stay zero
    exact = float(g.double().square().sum())
    whole = float(sum_of_squares(g))
    halves = float(sum_of_squares(g[:2049]) + sum_of_squares(g[2049:]))  # dp2's torch.chunk-like rows, uneven
    assert whole == pytest.approx(halves, rel=1e-15, abs=0)  # the same row norms, summed in float64
    assert whole == pytest.approx(exact, rel=1e-6, abs=0)  # float32 rows of 1,024 elements
    assert sum_of_squares(g).dtype == torch.float64


def test_vectors_scalars_stacks_and_non_finite_values():
    assert float(sum_of_squares(torch.tensor(3.0))) == 9.0
    assert float(sum_of_squares(torch.tensor([3.0, 4.0]))) == 25.0
    stack = torch.arange(24, dtype=torch.float32).view(2, 3, 4)  # an expert stack: rows of its last dim
    assert float(sum_of_squares(stack)) == pytest.approx(float(stack.double().square().sum()), rel=1e-7)
    assert float(sum_of_squares(torch.tensor([1.0, float("inf")]))) == float("inf")
    assert torch.isnan(sum_of_squares(torch.tensor([[1.0, float("nan")]])))
