"""Bad input to lossbench.linear_cross_entropy raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

from lossbench.cce import linear_cross_entropy


def inputs(N=4, D=3, V=5):
    return torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,)), torch.randn(V)


def call(**over):
    E, C, t, b = inputs()
    args = dict(features=E, weight=C, target=t, bias=b)
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return linear_cross_entropy(args["features"], args["weight"], args["target"], args["bias"],
                                **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(weight=torch.randn(5, 4)), ValueError, "weight"),
    (dict(features=torch.randn(4)), ValueError, "features"),
    (dict(target=torch.tensor([0, 1, 5, 2])), ValueError, "target"),
    (dict(target=torch.tensor([0, 1, -1, 2])), ValueError, "target"),
    (dict(target=torch.zeros(4)), TypeError, "target"),
    (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target"),
    (dict(features=torch.randn(4, 3), target=torch.zeros(4, 1, dtype=torch.long)), ValueError,
     "target must have shape"),
    (dict(shift=-1), ValueError, "shift"),
    (dict(rows_per_block=0), ValueError, "rows_per_block"),
    (dict(rows_per_block=1.5), TypeError, "rows_per_block"),
    (dict(sort_vocab="yes"), TypeError, "sort_vocab"),
    (dict(accum_c_fp32=1), TypeError, "accum_c_fp32"),
    (dict(stats=[]), TypeError, "stats"),
    (dict(bias=torch.tensor([0.0, float("inf"), 0.0, 0.0, 0.0])), ValueError, "bias"),
    (dict(bias=torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0])), ValueError, "bias"),
    (dict(bias=torch.randn(6)), ValueError, "bias"),
    (dict(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(weight=torch.randn(5, 3, device="meta")), ValueError, "weight is on meta"),
    (dict(target=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "target"),
    (dict(features=torch.full((4, 3), float("nan"))), ValueError, "features"),
    (dict(weight=torch.full((5, 3), float("inf"))), ValueError, "weight"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=-3), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), TypeError, "chunk_size"),
    (dict(impl="triton"), ValueError, "impl"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(filter_eps="tiny"), ValueError, "filter_eps"),
    (dict(filter_eps=-1.0), ValueError, "filter_eps"),
    (dict(class_weight=torch.ones(4)), ValueError, "class_weight"),
    (dict(class_weight=torch.ones(5, dtype=torch.long)), TypeError, "class_weight"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_input_raises_naming_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


def test_ignore_index_rows_may_hold_any_value():
    E, C, _, b = inputs()
    t = torch.tensor([0, 7, 2, 7])
    out = linear_cross_entropy(E, C, t, b, ignore_index=7, impl="torch")
    ref = torch.nn.functional.cross_entropy(E @ C.t() + b, t, ignore_index=7)
    torch.testing.assert_close(out, ref)


def test_vocab_parallel_label_smoothing_and_its_softcap_refusal(tmp_path):
    """One-rank process group: label smoothing (with class weights) equals F.cross_entropy's, loss and
    gradients; with soft-capping it is a clear error, not a number (the two-rank run is the slow test)."""
    import torch.distributed as dist

    from lossbench import linear_cross_entropy

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(3)
        e, c, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (5, 3), (5,)))
        w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
        t = torch.tensor([0, 1, 2, 3, -100, 4])
        for impl in ("torch", "auto"):
            for reduction in ("mean", "sum", "none"):
                ours = [x.clone().requires_grad_() for x in (e, c, b)]
                ref = [x.clone().requires_grad_() for x in (e, c, b)]
                out = linear_cross_entropy(*ours[:2], t, ours[2], class_weight=w, label_smoothing=0.2,
                                           reduction=reduction, process_group=dist.group.WORLD, impl=impl)
                want = torch.nn.functional.cross_entropy(ref[0] @ ref[1].T + ref[2], t, weight=w,
                                                         label_smoothing=0.2, reduction=reduction)
                torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
                scale = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
                for x, y in zip(torch.autograd.grad((out * scale).sum(), ours),
                                torch.autograd.grad((want * scale).sum(), ref)):
                    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
        with pytest.raises(ValueError, match="label_smoothing=0.1 with softcap=2.0 cannot be combined with process_group"):
            linear_cross_entropy(e, c, t, label_smoothing=0.1, softcap=2.0, process_group=dist.group.WORLD)
        ref = torch.nn.functional.cross_entropy(e @ c.T, t)
        torch.testing.assert_close(linear_cross_entropy(e, c, t, process_group=dist.group.WORLD), ref)
    finally:
        dist.destroy_process_group()
