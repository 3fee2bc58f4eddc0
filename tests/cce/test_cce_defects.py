"""Regression tests for defects of the first cut cross-entropy (each failed on the old code).

Reference: F.cross_entropy on materialised logits, float64 unless the test is about precision.
"""

from __future__ import annotations

import builtins
import io
import os

import pytest
import torch
import torch.nn.functional as F

from lossbench.cce import api, ext, linear_cross_entropy
from lossbench.cce import autograd as cce_autograd
from lossbench.validation import skip_value_checks

IMPLS = ["torch"] + (["ext"] if ext.load() is not None else [])


def make(N=23, D=7, V=101, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(N, D, generator=g, dtype=torch.float64)
    C = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = -100

    def conv(x):
        return None if x is None else x.to(dtype).requires_grad_()

    return conv(E), conv(C), conv(b), t


def ref_loss(E, C, b, t, **kw):
    return F.cross_entropy(F.linear(E, C, b), t, **kw)


# ---- 1. double backward ---------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["mean", "sum", "none", "lse"])
def test_double_backward_matches_cross_entropy(impl, mode):
    """d/dE of loss + 100 ||d loss / dE||^2 (create_graph=True), all three inputs."""
    E, C, b, t = make()
    cw = torch.rand(101, dtype=torch.float64) + 0.5

    def total(fn_loss):
        loss = fn_loss()
        if isinstance(loss, tuple):
            loss = loss[0].sum() + 0.1 * loss[1].square().sum()
        elif loss.dim():
            loss = (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)).sum()
        gE, gC, gb = torch.autograd.grad(loss, [E, C, b], create_graph=True)
        pen = loss + 100 * (gE.square().sum() + gC.square().sum() + gb.square().sum())
        return torch.autograd.grad(pen, [E, C, b])

    red = "mean" if mode == "lse" else mode

    def ours():
        return linear_cross_entropy(E, C, t, b, class_weight=cw, reduction=red, impl=impl,
                                    return_lse=mode == "lse", softcap=3.0, chunk_size=16)

    def ref():
        z = F.linear(E, C, b)
        z = 3.0 * torch.tanh(z / 3.0)
        loss = F.cross_entropy(z, t, weight=cw, reduction=red)
        return (loss, torch.logsumexp(z, 1)) if mode == "lse" else loss

    for got, want in zip(total(ours), total(ref)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradgradcheck(impl):
    E, C, b, t = make(N=5, D=4, V=13)
    fn = lambda E, C, b: linear_cross_entropy(E, C, t, b, impl=impl, label_smoothing=0.1)  # noqa
    assert torch.autograd.gradgradcheck(fn, (E, C, b), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---- 2. fp16 with loss scaling --------------------------------------------------------------

def _scaled_grads(fn, E, C, t, scale):
    Eh, Ch = E.detach().half().requires_grad_(), C.detach().half().requires_grad_()
    (fn(Eh, Ch, t) * scale).backward()
    return Eh.grad.double() / scale, Ch.grad.double() / scale


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_grad_scaling_no_early_underflow(impl):
    """GradScaler-style scale 2^12: the scale is applied before rounding to fp16."""
    g = torch.Generator().manual_seed(3)
    N, D, V = 256, 32, 2048
    E = torch.randn(N, D, generator=g, dtype=torch.float64)
    C = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.6
    t = torch.randint(0, V, (N,), generator=g)
    Er, Cr = E.half().double().requires_grad_(), C.half().double().requires_grad_()
    ref_loss(Er, Cr, None, t).backward()  # exact gradient of the fp16-rounded inputs
    scale = 2.0 ** 12
    mat = _scaled_grads(lambda a, c, y: F.cross_entropy(a @ c.t(), y), E, C, t, scale)
    ours = _scaled_grads(lambda a, c, y: linear_cross_entropy(a, c, y, impl=impl), E, C, t, scale)
    small = Cr.grad.abs() < 6e-5  # below fp16's normal range before scaling
    assert int(small.sum()) > 10_000

    def stats(got, want, mask):
        rel = ((got - want).abs() / want.abs().clamp_min(1e-30))[mask]
        return float(rel.median()), float(((got == 0) & (want != 0))[mask].double().mean())

    med_m, zero_m = stats(mat[1], Cr.grad, small)
    med_o, zero_o = stats(ours[1], Cr.grad, small)
    assert zero_o <= zero_m + 1e-12
    assert med_o <= max(1.5 * med_m, 1e-3)
    med_e, _ = stats(ours[0], Er.grad, torch.ones_like(Er.grad, dtype=torch.bool))
    assert med_e <= 1e-3


# ---- 3. out-of-range targets with the value checks off --------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [101, 10_000_000, -1, -7])
@pytest.mark.parametrize("grad", [False, True])
def test_out_of_range_target_raises_even_without_checks(impl, bad, grad):
    E, C, b, t = make()
    t[5] = bad
    with skip_value_checks(), pytest.raises((ValueError, RuntimeError), match="target"):
        out = linear_cross_entropy(E, C, t, b, impl=impl)
        if grad:
            out.backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_target_is_never_counted(impl):
    """With the checks on it is a clear error too (the 'mean' denominator is never touched)."""
    E, C, b, t = make()
    t[5] = -1
    with pytest.raises(ValueError, match="target values must lie in"):
        linear_cross_entropy(E, C, t, b, impl=impl)


# ---- 4. same behaviour on every impl, and torch's --------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_integer_target_dtypes(impl, dtype):
    E, C, b, t = make(V=50)
    t = t.clamp_min(0).to(dtype)
    out = linear_cross_entropy(E, C, t, b, impl=impl, ignore_index=3)
    ref = ref_loss(E, C, b, t.long(), ignore_index=3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(impl, dtype):
    E, C, b, t = make()
    Et = E.detach().to(dtype).t().contiguous().t().requires_grad_()  # column-major
    Cs = torch.cat([C.detach(), C.detach()], 1).to(dtype)[:, ::2].requires_grad_()  # stride 2
    assert not Et.is_contiguous() and not Cs.is_contiguous()
    out = linear_cross_entropy(Et, Cs, t, None, impl=impl)
    up = [x.detach().double().requires_grad_() for x in (Et, Cs)]
    ref = ref_loss(up[0], up[1], None, t)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out.double(), ref, **tol)
    got = torch.autograd.grad(out, [Et, Cs])
    want = torch.autograd.grad(ref, up)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, **tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_minus_inf_bias_masks_classes(impl, reduction):
    E, C, b, t = make()
    mask = torch.zeros(101, dtype=torch.bool)
    mask[90:] = True
    t = torch.where(mask[t.clamp_min(0)], torch.zeros_like(t), t)
    bm = torch.where(mask, torch.full_like(b, float("-inf")), b).detach().requires_grad_()
    out = linear_cross_entropy(E, C, t, bm, impl=impl, reduction=reduction)
    ref = ref_loss(E, C, bm, t, reduction=reduction)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.ones_like(out)
    for x, y in zip(torch.autograd.grad(out, [E, C, bm], go),
                    torch.autograd.grad(ref, [E, C, bm], go)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["zeros", "cancel"])
def test_mean_with_class_weights_summing_to_zero(impl, kind):
    E, C, b, _ = make(N=6, V=4)
    t = torch.tensor([0, 1, 0, 1, 2, 3])
    cw = torch.zeros(4, dtype=torch.float64)
    if kind == "cancel":
        cw = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    out = linear_cross_entropy(E, C, t, b, class_weight=cw, impl=impl)
    ref = ref_loss(E, C, b, t, weight=cw)
    torch.testing.assert_close(out, ref, equal_nan=True)  # nan for zeros, +-inf for cancel
    for g in torch.autograd.grad(out, [E, C, b]):
        assert not bool(torch.isfinite(g).all())  # never a finite number from a 0 denominator


@pytest.mark.parametrize("impl", IMPLS)
def test_inf_upstream_gradient_on_ignored_row_stays_finite(impl):
    E, C, b, t = make()
    out = linear_cross_entropy(E, C, t, b, impl=impl, reduction="none")
    ref = ref_loss(E, C, b, t, reduction="none")
    go = torch.ones(23, dtype=torch.float64)
    go[1] = float("inf")  # row 1 is ignored
    got = torch.autograd.grad(out, [E, C, b], go)
    want = torch.autograd.grad(ref, [E, C, b], go)
    for x, y in zip(got, want):
        assert bool(torch.isfinite(x).all())
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_filter_bound_with_negative_class_weights(impl):
    """The documented bound holds with |w| (negative weights flip the sign of g_i w_y)."""
    g = torch.Generator().manual_seed(0)
    N, D, V, eps = 30, 16, 200, 1e-6
    E = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    C = (torch.randn(V, D, generator=g, dtype=torch.float64) * 5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    cw = torch.randn(V, generator=g, dtype=torch.float64)  # about half negative
    kw = dict(class_weight=cw, reduction="sum", impl=impl, chunk_size=8, rows_per_block=3)
    exact = torch.autograd.grad(linear_cross_entropy(E, C, t, filter_eps=None, **kw), [E, C])
    filt = torch.autograd.grad(linear_cross_entropy(E, C, t, filter_eps=eps, **kw), [E, C])
    with torch.no_grad():
        p = torch.softmax(E @ C.t(), dim=1)
        coef = cw[t].abs()
        small = (p < eps).double()
        bound_e = eps * coef * (small @ C.norm(dim=1))
        bound_c = eps * (small.t() @ (coef * E.norm(dim=1)))
        err_e = (filt[0] - exact[0]).norm(dim=1)
        err_c = (filt[1] - exact[1]).norm(dim=1)
    assert bool((err_e > 0).any()), "nothing was filtered: the test is vacuous"
    assert bool((err_e <= bound_e * (1 + 1e-9) + 1e-15).all())
    assert bool((err_c <= bound_c * (1 + 1e-9) + 1e-15).all())


def test_documented_bound_uses_absolute_weights():
    assert "|w_{y_i}|" in api.__doc__


# ---- 5. bf16/fp16 inputs stay in their dtype -------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_not_copied_to_float32(impl, dtype, monkeypatch):
    E, C, b, t = make(dtype=dtype)
    seen = []
    real = api._run
    monkeypatch.setattr(cce_autograd, "_run", lambda impl_, *a: seen.append((a[0], a[1])) or real(impl_, *a))
    linear_cross_entropy(E, C, t, b, impl=impl).backward()
    # the caller's storage, in its dtype: no float32 copy of E or C
    assert seen and all(e.dtype == dtype and e.data_ptr() == E.data_ptr() and c is C
                        for e, c in seen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("accum", [False, True])
def test_low_precision_dc_accumulation(impl, accum):
    """bf16 dC over 8 row blocks: float32 accumulation is as good as a single rounding."""
    E, C, b, t = make(N=48, D=16, V=300, dtype=torch.bfloat16)
    up = [x.detach().double().requires_grad_() for x in (E, C, b)]
    ref = torch.autograd.grad(ref_loss(*up, t, reduction="sum"), up)
    out = linear_cross_entropy(E, C, t, b, impl=impl, reduction="sum", rows_per_block=6,
                               accum_c_fp32=accum)
    got = torch.autograd.grad(out, [E, C, b])
    assert [x.dtype for x in got] == [torch.bfloat16] * 3
    err = ((got[1].double() - ref[1]).abs() / ref[1].abs().clamp_min(1e-3)).median()
    assert float(err) <= (2 ** -8 if accum else 2 ** -6)


# ---- 6. threads: the user's setting, whatever the machine's load ------------------------------

def _fake_loadavg(monkeypatch, text: str) -> None:
    """Make ``/proc/loadavg`` (and ``os.getloadavg``) report ``text``: e.g. 64 runnable tasks."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if str(file) == "/proc/loadavg":
            return io.StringIO(text)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    fields = [float(x) for x in text.split()[:3]]
    monkeypatch.setattr(os, "getloadavg", lambda: tuple(fields))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # eager gradients / backward recompute
@pytest.mark.parametrize("loadavg", ["64.00 64.00 64.00 65/900 4321\n",
                                     "0.00 0.00 0.00 1/900 4321\n"])
@pytest.mark.parametrize("user_threads", [2, 3])
def test_kernel_threads_follow_torch_setting_whatever_the_load(impl, reduction, loadavg,
                                                               user_threads, monkeypatch):
    """Regression: the passes used to shrink their thread count to the CPUs that /proc/loadavg
    showed free (one transient runnable task dropped a 2-core run to one thread); the count
    must be the user's ``torch.get_num_threads()``, nothing else."""
    E, C, b, t = make()
    _fake_loadavg(monkeypatch, loadavg)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen = []
    real = cce_autograd._run
    monkeypatch.setattr(cce_autograd, "_run",
                        lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    old = torch.get_num_threads()
    torch.set_num_threads(user_threads)
    try:
        linear_cross_entropy(E, C, t, b, impl=impl, reduction=reduction).sum().backward()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    assert seen and seen == [user_threads] * len(seen)
    assert after == user_threads


def test_extension_shares_torchs_openmp_runtime():
    """The kernels' OpenMP teams take their size from torch's ``set_num_threads`` only if the
    extension binds to the OpenMP runtime torch loaded (one runtime in the process)."""
    if ext.load() is None:
        pytest.skip("extension not built")
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    import subprocess
    import sys

    # a fresh process: torch and the extension only (scikit-learn, loaded by other tests in this
    # process, brings its own libgomp, which is not the extension's doing)
    code = ("import os, torch\nfrom lossbench.cce import ext\nassert ext.load() is not None\n"
            "paths = {l.split()[-1] for l in open('/proc/self/maps') if '/' in l}\n"
            "print(sorted(p for p in paths if os.path.basename(p).startswith(('libgomp', 'libiomp', 'libomp'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    runtimes = eval(out.stdout.strip().splitlines()[-1])
    assert len(runtimes) <= 1, runtimes
