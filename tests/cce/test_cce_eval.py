"""Chunked evaluation reductions vs their definitions on materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lossbench.cce import linear_logsumexp, linear_max_softmax, linear_topk, reductions


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    monkeypatch.setattr(reductions, "block_rows", lambda n, v, device: max(1, min(n, 4)))


def data(dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(0)
    E = torch.randn(11, 9, generator=g).to(dtype)
    C = torch.randn(53, 9, generator=g).to(dtype)
    b = torch.randn(53, generator=g).to(dtype) if bias else None
    return E, C, b


def test_small_row_blocks_reach_the_reductions():
    """The autouse fixture takes effect: 11 rows are reduced in blocks of 4."""
    E, C, b = data()
    assert [(r0, Z.shape[0]) for r0, Z in reductions._blocks(E, C, b, None, 1.0)] == \
        [(0, 4), (4, 4), (8, 3)]


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logsumexp_is_energy_score(softcap, temperature):
    E, C, b = data(torch.float64)
    z = F.linear(E, C, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    want = temperature * torch.logsumexp(z / temperature, dim=1)
    got = linear_logsumexp(E, C, b, softcap=softcap, temperature=temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_max_softmax(bias):
    E, C, b = data(bias=bias)
    want = torch.softmax(F.linear(E, C, b), dim=1).amax(dim=1)
    torch.testing.assert_close(linear_max_softmax(E, C, b), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("largest", [True, False])
def test_topk(largest):
    E, C, b = data(torch.float64)
    v, i = torch.topk(F.linear(E, C, b), 5, dim=1, largest=largest)
    gv, gi = linear_topk(E, C, 5, b, largest=largest)
    torch.testing.assert_close(gv, v)
    torch.testing.assert_close(gi, i)


def test_bf16_is_computed_in_float32():
    E, C, b = data(torch.bfloat16)
    got = linear_logsumexp(E, C, b)
    assert got.dtype == torch.float32
    want = torch.logsumexp(F.linear(E.float(), C.float(), b.float()), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eval_bad_input():
    E, C, b = data()
    with pytest.raises(ValueError, match="weight"):
        linear_logsumexp(E, C[:, :4].contiguous(), b)
    with pytest.raises(ValueError, match="k must"):
        linear_topk(E, C, 54, b)
    with pytest.raises(ValueError, match="temperature"):
        linear_max_softmax(E, C, b, temperature=0.0)
