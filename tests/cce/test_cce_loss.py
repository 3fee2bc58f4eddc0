"""Cut cross-entropy vs F.cross_entropy on materialised logits and F.linear_cross_entropy.

Every available implementation (pure torch; the compiled extension on CPU and, where a GPU is
present, on CUDA) is compared in float64 (tight), float32 (tight) and bf16/fp16 inputs (float32
accumulation inside; tolerance stated below) on loss and the gradients of features, weight, bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lossbench.cce import api, ext, linear_cross_entropy
from lossbench.cce import autograd as cce_autograd

HAS_CUDA = torch.cuda.is_available()
CPU_IMPLS = ["torch"] + (["ext"] if ext.load() is not None else [])
CASES = [("cpu", impl) for impl in CPU_IMPLS]
if HAS_CUDA:
    CASES += [("cuda", "torch")] + ([("cuda", "ext")] if ext.has_cuda_kernels() else [])

# (N, D, V, chunk_size): N = 1, odd D, V not a multiple of the chunk, several row blocks.
SHAPES = [(1, 8, 37, 16), (23, 7, 101, 32), (40, 16, 300, 128)]


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    """Blocks of a few rows so every test crosses several row blocks."""
    monkeypatch.setattr(api, "block_rows", lambda n, v, device: max(1, min(n, 6)))


def make(N, D, V, dtype=torch.float64, device="cpu", bias=True, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(N, D, generator=g, dtype=torch.float64)
    C = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore and N > 2:
        t[1] = -100
        t[N - 1] = -100

    def conv(x):
        return None if x is None else x.to(device=device, dtype=dtype).requires_grad_()

    return conv(E), conv(C), conv(b), t.to(device)


def reference(E, C, b, t, *, softcap=None, class_weight=None, **kw):
    z = F.linear(E, C, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, t, weight=class_weight, **kw)


def grads(out, params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    live = [p for p in params if p is not None]
    return list(torch.autograd.grad(out, live, go))


def assert_all_close(a, b, **tol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_cross_entropy_float64(device, impl, shape, reduction, label_smoothing, weighted):
    N, D, V, chunk = shape
    E, C, b, t = make(N, D, V, device=device, bias=shape[0] != 23)
    cw = (torch.rand(V, dtype=torch.float64) + 0.5).to(device) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref = reference(E, C, b, t, class_weight=cw, **kw)
    out = linear_cross_entropy(E, C, t, b, class_weight=cw, chunk_size=chunk, impl=impl, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads(out, [E, C, b]), grads(ref, [E, C, b]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_float32_tight(device, impl, reduction, softcap):
    E, C, b, t = make(40, 16, 300, dtype=torch.float32, device=device)
    ref = reference(E, C, b, t, softcap=softcap, reduction=reduction)
    out = linear_cross_entropy(E, C, t, b, softcap=softcap, chunk_size=64, impl=impl,
                               reduction=reduction)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert_all_close(grads(out, [E, C, b]), grads(ref, [E, C, b]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("softcap", [None, 1.7])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_float64(device, impl, softcap, reduction):
    E, C, b, t = make(23, 7, 101, device=device)
    ref = reference(E, C, b, t, softcap=softcap, reduction=reduction, label_smoothing=0.1)
    out = linear_cross_entropy(E, C, t, b, softcap=softcap, impl=impl, reduction=reduction,
                               label_smoothing=0.1, chunk_size=32)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads(out, [E, C, b]), grads(ref, [E, C, b]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_batch_matches_torch(device, impl, reduction, weighted):
    E, C, b, _ = make(5, 6, 40, device=device)
    t = torch.full((5,), -100, device=device)
    cw = (torch.rand(40, dtype=torch.float64) + 0.5).to(device) if weighted else None
    ref = reference(E, C, b, t, class_weight=cw, reduction=reduction)
    out = linear_cross_entropy(E, C, t, b, class_weight=cw, reduction=reduction, impl=impl)
    if reduction == "mean":
        assert torch.isnan(ref) and torch.isnan(out)  # torch: mean over zero elements is nan
        go = torch.ones((), dtype=torch.float64, device=device)
        got = torch.autograd.grad(out, [E, C, b], go)
        want = torch.autograd.grad(ref, [E, C, b], go)
    else:
        torch.testing.assert_close(out, ref)
        got, want = grads(out, [E, C, b]), grads(ref, [E, C, b])
    assert_all_close(got, want, rtol=0, atol=0)  # all zeros in torch


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("dtype,tol", [
    # Inputs rounded to bf16/fp16, computed in float32, outputs rounded back: the error is the
    # output rounding (bf16: 2^-8 relative, fp16: 2^-11) plus float32 round-off.
    (torch.bfloat16, dict(rtol=1e-2, atol=1e-3)),
    (torch.float16, dict(rtol=2e-3, atol=1e-4)),
])
def test_low_precision_inputs_accumulate_in_float32(device, impl, dtype, tol):
    E, C, b, t = make(40, 16, 300, dtype=dtype, device=device)
    up = [x.detach().float().requires_grad_() for x in (E, C, b)]
    ref = reference(*up, t)
    out = linear_cross_entropy(E, C, t, b, impl=impl, chunk_size=64)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **tol)
    got = grads(out, [E, C, b])
    assert [g.dtype for g in got] == [dtype] * 3
    assert_all_close([g.float() for g in got], grads(ref, up), **tol)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_lse_is_differentiable(device, impl, reduction):
    """Loss plus a log-partition penalty 1e-1 * lse^2 on the returned log-sum-exp."""
    E, C, b, t = make(23, 7, 101, device=device)
    loss, lse = linear_cross_entropy(E, C, t, b, return_lse=True, impl=impl, reduction=reduction,
                                     chunk_size=32)
    z = F.linear(E, C, b)
    ref_lse = torch.logsumexp(z, dim=1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    ref = F.cross_entropy(z, t, reduction=reduction)
    total = loss.sum() + 0.1 * lse.square().sum()
    ref_total = ref.sum() + 0.1 * ref_lse.square().sum()
    assert_all_close(torch.autograd.grad(total, [E, C, b]),
                     torch.autograd.grad(ref_total, [E, C, b]), rtol=1e-9, atol=1e-12)
    # lse alone (the loss output unused)
    _, lse2 = linear_cross_entropy(E, C, t, b, return_lse=True, impl=impl, chunk_size=32)
    ref_lse2 = torch.logsumexp(F.linear(E, C, b), dim=1)
    assert_all_close(torch.autograd.grad(lse2.sum(), [E, C, b]),
                     torch.autograd.grad(ref_lse2.sum(), [E, C, b]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,impl", CASES)
def test_second_backward_through_same_graph(device, impl):
    """Eager gradients are handed over once; retain_graph + a second backward recomputes them."""
    E, C, b, t = make(23, 7, 101, device=device)
    out = linear_cross_entropy(E, C, t, b, impl=impl)
    first = torch.autograd.grad(out * 3.0, [E, C, b], retain_graph=True)
    second = torch.autograd.grad(out * 3.0, [E, C, b])
    ref = torch.autograd.grad(reference(E, C, b, t) * 3.0, [E, C, b])
    assert_all_close(first, ref, rtol=1e-9, atol=1e-12)
    assert_all_close(second, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,impl", CASES)
def test_no_grad_inputs_and_partial_grads(device, impl, monkeypatch):
    E, C, b, t = make(23, 7, 101, device=device)
    calls = []
    real_run = api._run
    monkeypatch.setattr(cce_autograd, "_run", lambda *a: calls.append(a[-3:]) or real_run(*a))
    with torch.no_grad():
        out = linear_cross_entropy(E, C, t, b, impl=impl)
    assert calls == [(False, False, False)]  # no gradient work under no_grad
    torch.testing.assert_close(out, reference(E, C, b, t).detach())
    Ed = E.detach()
    out = linear_cross_entropy(Ed, C, t, None, impl=impl)
    (gc,) = torch.autograd.grad(out, [C])
    (want,) = torch.autograd.grad(reference(Ed, C, None, t), [C])
    torch.testing.assert_close(gc, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("mode", ["mean", "none", "lse"])
def test_gradcheck_float64(device, impl, mode):
    E, C, b, t = make(7, 5, 29, device=device)
    cw = (torch.rand(29, dtype=torch.float64) + 0.5).to(device)

    def fn(E, C, b):
        if mode == "lse":
            loss, lse = linear_cross_entropy(E, C, t, b, softcap=3.0, return_lse=True,
                                             impl=impl, chunk_size=8, class_weight=cw)
            return loss, lse
        return linear_cross_entropy(E, C, t, b, reduction=mode, label_smoothing=0.1,
                                    class_weight=cw, impl=impl, chunk_size=8, softcap=4.0)

    assert torch.autograd.gradcheck(fn, (E, C, b), eps=1e-6, atol=1e-7, rtol=1e-5)


LCE = getattr(F, "linear_cross_entropy", None)


@pytest.mark.skipif(LCE is None, reason="this torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,chunked", [(0.0, False), (0.2, False), (0.0, True)])
def test_matches_torch_linear_cross_entropy(device, impl, reduction, label_smoothing, chunked):
    E, C, b, t = make(40, 16, 300, device=device)
    cw = (torch.rand(300, dtype=torch.float64) + 0.5).to(device)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8) if chunked else None
    ref = LCE(E, C, t, linear_bias=b, weight=cw, reduction=reduction,
              label_smoothing=label_smoothing, options=options)
    out = linear_cross_entropy(E, C, t, b, class_weight=cw, reduction=reduction,
                               label_smoothing=label_smoothing, impl=impl, chunk_size=64)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads(out, [E, C, b]), grads(ref, [E, C, b]), rtol=1e-9, atol=1e-12)
