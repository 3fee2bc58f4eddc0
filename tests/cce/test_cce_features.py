"""Leading dims, shift, explicit row blocks and the sorted-vocabulary filter, against
F.cross_entropy on materialised logits (float64: loss and every gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lossbench.cce import api, ext, linear_cross_entropy
from lossbench.cce import autograd as cce_autograd

IMPLS = ["torch"] + (["ext"] if ext.load() is not None else [])


def leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def make(lead, D=6, V=41, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    C = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, tuple(lead), generator=g)
    if t.numel() > 3:
        t.view(-1)[2] = -100
    return E, C, b, t


def shifted_reference(E, C, b, t, shift, reduction, cw=None, ls=0.0):
    """apple's meaning: logits[..., :-k, :] against targets[..., k:]; 'none' at target t."""
    z = F.linear(E, C, b)
    T = t.shape[-1]
    zs, ts = z[..., :T - shift, :], t[..., shift:]
    loss = F.cross_entropy(zs.reshape(-1, z.shape[-1]), ts.reshape(-1), weight=cw,
                           reduction=reduction, label_smoothing=ls)
    if reduction != "none":
        return loss
    full = torch.zeros(t.shape, dtype=loss.dtype)
    full[..., shift:] = loss.reshape(ts.shape)
    return full


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead", [(), (5,), (3, 4), (2, 3, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leading_dims(impl, lead, reduction):
    E, C, b, t = make(lead)
    E, C, b = leaves(E, C, b)
    out = linear_cross_entropy(E, C, t, b, reduction=reduction, impl=impl, chunk_size=8,
                               rows_per_block=4)
    ref = F.cross_entropy(F.linear(E, C, b).reshape(-1, 41), t.reshape(-1), reduction=reduction)
    if reduction == "none":
        ref = ref.reshape(lead)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn(out.shape, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(out, [E, C, b], go),
                    torch.autograd.grad(ref, [E, C, b], go)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [1, 2, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_shift_matches_shifted_cross_entropy(impl, shift, reduction, weighted):
    E, C, b, t = make((3, 7))
    E, C, b = leaves(E, C, b)
    cw = torch.rand(41, dtype=torch.float64) + 0.5 if weighted else None
    k = int(shift)
    out = linear_cross_entropy(E, C, t, b, shift=shift, reduction=reduction, impl=impl,
                               class_weight=cw, chunk_size=8, rows_per_block=5)
    ref = shifted_reference(E, C, b, t, k, reduction, cw)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn(out.shape, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(out, [E, C, b], go),
                    torch.autograd.grad(ref, [E, C, b], go)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_longer_than_sequence_ignores_everything(impl):
    E, C, b, t = make((2, 3))
    out = linear_cross_entropy(E, C, t, b, shift=5, reduction="sum", impl=impl)
    assert float(out) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_explicit_rows_per_block(impl, rows, monkeypatch):
    E, C, b, t = make((23,))
    E, C, b = leaves(E, C, b)
    seen = []
    real = api._run
    monkeypatch.setattr(cce_autograd, "_run", lambda *a: seen.append(a[14]) or real(*a))
    out = linear_cross_entropy(E, C, t, b, rows_per_block=rows, impl=impl, reduction="none")
    ref = F.cross_entropy(F.linear(E, C, b), t, reduction="none")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn(23, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(out, [E, C, b], go),
                    torch.autograd.grad(ref, [E, C, b], go)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    assert seen and all(r == min(rows, 23) for r in seen)


def test_default_block_respects_budget_only_below_min_rows():
    cpu = torch.device("cpu")
    assert api.block_rows(8192, 32768, cpu) * 32768 <= api.ROW_BLOCK_ELEMENTS["cpu"]
    assert api.block_rows(8192, 131072, cpu) == api.MIN_BLOCK_ROWS["cpu"]  # documented excess


# ---- sorted vocabulary ----------------------------------------------------------------------

def zipf_case(N=96, D=32, V=2048, seed=0, dtype=torch.float64):
    """Zipf targets, a classifier whose softmax puts most mass on a few frequent classes; class
    ids are a random permutation of frequency rank (so that unsorted tiles mix both kinds)."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(V, generator=g)  # class id -> frequency rank
    freq = (rank.double() + 1) ** -1.1
    t = torch.multinomial(freq / freq.sum(), N, replacement=True, generator=g)
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u /= u.norm()
    R = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    R -= (R @ u)[:, None] * u
    C = 3.0 * torch.log(freq / freq.max())[:, None] * u[None, :] + 3.0 * R
    E = (1.0 + 0.1 * torch.randn(N, 1, generator=g, dtype=torch.float64)) * u + 1.5 * R[t]
    E = E + 0.1 * torch.randn(N, D, generator=g, dtype=torch.float64)
    return E.to(dtype), C.to(dtype), t


@pytest.mark.parametrize("impl", IMPLS)
def test_sorted_vocabulary_skips_more_and_stays_within_bound(impl):
    E, C, t = zipf_case()
    E, C = leaves(E, C)
    eps = 1e-7
    kw = dict(reduction="mean", impl=impl, chunk_size=64, rows_per_block=16, filter_eps=eps)
    exact = torch.autograd.grad(linear_cross_entropy(E, C, t, impl=impl, filter_eps=None), [E, C])
    skip = {}
    for sort in (False, True):
        st = {}
        g = torch.autograd.grad(linear_cross_entropy(E, C, t, sort_vocab=sort, stats=st, **kw),
                                [E, C])
        skip[sort] = st["tiles_skipped"] / st["tiles_total"]
        with torch.no_grad():
            p = torch.softmax(E @ C.t(), dim=1)
            gi = 1.0 / len(t)
            small = (p < eps).double()
            bound_e = eps * gi * (small @ C.norm(dim=1))
            bound_c = eps * (small.t() @ (gi * E.norm(dim=1)))
            err_e = (g[0] - exact[0]).norm(dim=1)
            err_c = (g[1] - exact[1]).norm(dim=1)
        assert bool((err_e <= bound_e * (1 + 1e-9) + 1e-15).all())
        assert bool((err_c <= bound_c * (1 + 1e-9) + 1e-15).all())
    assert skip[True] >= 0.3 and skip[True] >= skip[False] + 0.2, skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sorted_filter_low_precision_close_to_exact(impl, dtype):
    E, C, t = zipf_case(dtype=dtype)
    E, C = leaves(E, C)
    st = {}
    eps = 1e-6 if dtype == torch.float32 else "auto"  # fp32's auto (3.7e-9) skips nothing here
    out = linear_cross_entropy(E, C, t, impl=impl, stats=st, chunk_size=64, rows_per_block=16,
                               filter_eps=eps)
    got = torch.autograd.grad(out, [E, C])
    up = leaves(E.double(), C.double())
    want = torch.autograd.grad(F.cross_entropy(up[0] @ up[1].t(), t), up)
    assert st["tiles_skipped"] > 0
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-3)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, **tol)


def test_ext_and_torch_agree_on_sorted_tiles():
    if "ext" not in IMPLS:
        pytest.skip("extension not available here")
    E, C, t = zipf_case()
    b = torch.randn(C.shape[0], dtype=torch.float64)
    order = api._mean_logit_order(E, C, b, 256)
    g = torch.full((len(t),), 1.0 / len(t), dtype=torch.float64)
    args = (E, C, b, t, None, g, None, None, order, 0.0, 0.0, 1e-7, 64, 16, True, True, True,
            False)
    ref = api._run("torch", *args)
    got = api._run("ext", *args)
    assert ref[5] > 0 and got[5] == ref[5]
    for x, y in zip(got[:5], ref[:5]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)
