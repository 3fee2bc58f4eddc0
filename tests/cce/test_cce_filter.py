"""Gradient filtering changes the gradient by less than its documented bound (lossbench.cce.api)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lossbench.cce import api, ext, linear_cross_entropy

IMPLS = ["torch"] + (["ext"] if ext.load() is not None else [])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    monkeypatch.setattr(api, "block_rows", lambda n, v, device: max(1, min(n, 3)))


def peaked(device, N=30, D=16, V=200, seed=0):
    """Large logits (std ~ 20): most softmax entries are far below 1e-6; random targets."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(N, D, generator=g, dtype=torch.float64)
    C = torch.randn(V, D, generator=g, dtype=torch.float64) * 5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[4] = -100
    return [x.to(device).requires_grad_() for x in (E, C, b)] + [t.to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_filtering_within_documented_bound(device, impl, reduction):
    if device == "cuda" and impl == "ext" and not ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    eps = 1e-6
    E, C, b, t = peaked(device)
    exact = linear_cross_entropy(E, C, t, b, reduction=reduction, filter_eps=None, impl=impl,
                                 chunk_size=8)
    g_exact = torch.autograd.grad(exact, [E, C, b])
    loss = linear_cross_entropy(E, C, t, b, reduction=reduction, filter_eps=eps, impl=impl,
                                chunk_size=8)
    g_filt = torch.autograd.grad(loss, [E, C, b])
    torch.testing.assert_close(loss, exact, rtol=0, atol=0)  # the loss is never filtered
    assert not torch.equal(g_filt[0], g_exact[0]), "no tile was skipped: the test is vacuous"
    torch.testing.assert_close(g_filt[2], g_exact[2], rtol=1e-12, atol=1e-15)  # bias stays exact

    # Bound from the module docstring, with the sum over the entries that may be dropped
    # (p_ij < eps); g_i = 1/#valid ('mean') or 1 ('sum') on valid rows, no class weights.
    with torch.no_grad():
        p = torch.softmax(F.linear(E, C, b), dim=1)
        valid = (t != -100).double()
        gi = valid / valid.sum() if reduction == "mean" else valid
        small = (p < eps).double()
        bound_e = eps * gi * (small @ C.norm(dim=1))
        bound_c = eps * (small.t() @ (gi * E.norm(dim=1)))
        err_e = (g_filt[0] - g_exact[0]).norm(dim=1)
        err_c = (g_filt[1] - g_exact[1]).norm(dim=1)
    assert bool((err_e <= bound_e * (1 + 1e-9) + 1e-15).all())
    assert bool((err_c <= bound_c * (1 + 1e-9) + 1e-15).all())


@pytest.mark.parametrize("device", DEVICES)
def test_ext_and_torch_skip_the_same_tiles(device):
    if "ext" not in IMPLS or (device == "cuda" and not ext.has_cuda_kernels()):
        pytest.skip("extension not available here")
    E, C, b, t = [x.detach() for x in peaked(device)]
    tgt = torch.where(t == -100, torch.full_like(t, -1), t)
    g = (tgt >= 0).double()
    args = (E, C, b, tgt, None, g, None, None, None, 0.0, 0.0, 1e-6, 8, 3, True, True, True, False)
    ref = api._run("torch", *args)
    got = api._run("ext", *args)
    assert ref[5] > 0 and got[5] == ref[5]
    assert got[6] == ref[6] == 0
    for x, y in zip(got[:5], ref[:5]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype,expected", [
    (torch.bfloat16, 2.44e-4), (torch.float16, 3.05e-5), (torch.float32, 3.73e-9)])
def test_auto_threshold_is_eps_over_32(dtype, expected):
    assert api._filter_threshold("auto", dtype) == pytest.approx(expected, rel=2e-3)
    assert api._filter_threshold(None, dtype) < 0


def test_label_smoothing_disables_filtering():
    E, C, b, t = peaked("cpu")
    a = linear_cross_entropy(E, C, t, b, label_smoothing=0.1, filter_eps=1e-3, impl="torch")
    r = linear_cross_entropy(E, C, t, b, label_smoothing=0.1, filter_eps=None, impl="torch")
    ga, gr = torch.autograd.grad(a, [E, C]), torch.autograd.grad(r, [E, C])
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.skipif("ext" not in IMPLS, reason="extension not built")
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_sorted_blocks_match_the_exact_gradients(softcap, weighted):
    """CPU ext, sorted vocabulary, many row blocks that skip most tiles: the gathered kept tiles
    with class weights, soft-capping and a bias give torch's gradients of ``F.cross_entropy`` on
    the materialised (soft-capped) logits (float64: the automatic threshold leaves a change far
    below 1e-12)."""
    E, C, _, t = peaked("cpu", N=40, V=300)
    # a class prior shared by every row (spread over 300 nats, classes in random order): the
    # sorted order puts the classes no row needs into whole tiles at the end
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    b = (-torch.linspace(0, 300, 300, dtype=torch.float64)[perm]).requires_grad_()
    cw = (torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
          if weighted else None)
    z = F.linear(E, C, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    exact = F.cross_entropy(z, t, weight=cw, ignore_index=-100)
    g_exact = torch.autograd.grad(exact, [E, C, b])
    stats: dict = {}
    loss = linear_cross_entropy(E, C, t, b, class_weight=cw, softcap=softcap, chunk_size=16, impl="ext",
                                stats=stats)  # filter 'auto', sorted
    g = torch.autograd.grad(loss, [E, C, b])
    # most tiles are skipped, so the gathered products carry the gradients
    assert stats["tiles_skipped"] > 0.5 * stats["tiles_total"]
    torch.testing.assert_close(loss, exact, rtol=1e-12, atol=1e-12)
    for got, want in zip(g, g_exact):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
