"""Run by tests/cce/test_cce_vocab_parallel.py under torchrun: each rank holds a shard of the
classifier; loss, lse and every gradient must equal F.cross_entropy on the full logits."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lossbench.cce import ext, linear_cross_entropy


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    lead, D, V = (3, 9), 6, 37
    E = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    C = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    t = torch.randint(0, V, lead, generator=g)
    t[0, 2] = -100
    sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    impls = ["torch"] + (["ext"] if ext.load() is not None else [])
    failures = []
    for impl in impls:
        for reduction in ("mean", "sum", "none"):
            for weighted, softcap, shift, lse, ls in ((False, None, 0, False, 0.0), (True, None, 0, True, 0.0),
                                                      (True, 2.5, 1, False, 0.0), (False, None, 2, True, 0.0),
                                                      (True, None, 1, True, 0.1), (False, None, 0, False, 0.3)):
                Er, Cr, br = (x.clone().requires_grad_() for x in (E, C, b))
                Es = E.clone().requires_grad_()
                Cs = C[lo:hi].clone().requires_grad_()
                bs = b[lo:hi].clone().requires_grad_()
                w = cw if weighted else None
                out = linear_cross_entropy(
                    Es, Cs, t, bs, class_weight=w[lo:hi] if weighted else None,
                    reduction=reduction, softcap=softcap, shift=shift, return_lse=lse, label_smoothing=ls,
                    process_group=dist.group.WORLD, impl=impl, chunk_size=4, rows_per_block=5)
                z = F.linear(Er, Cr, br)
                if softcap is not None:
                    z = softcap * torch.tanh(z / softcap)
                T = lead[-1]
                ts = torch.cat([t[..., shift:], torch.full((lead[0], shift), -100)], -1)
                ref = F.cross_entropy(z.reshape(-1, V), ts.reshape(-1), weight=w,
                                      reduction=reduction, label_smoothing=ls)
                if reduction == "none":
                    ref = torch.roll(ref.reshape(lead), shift, -1)
                loss, lse_out = (out if lse else (out, None))
                total = (loss * torch.linspace(0.5, 1.5, loss.numel(),
                                               dtype=torch.float64).reshape(loss.shape)).sum()
                ref_total = (ref * torch.linspace(0.5, 1.5, ref.numel(),
                                                  dtype=torch.float64).reshape(ref.shape)).sum()
                if lse:
                    ref_lse = torch.logsumexp(z, -1)
                    total = total + 0.1 * lse_out.square().sum()
                    ref_total = ref_total + 0.1 * ref_lse.square().sum()
                got = torch.autograd.grad(total, [Es, Cs, bs])
                want = torch.autograd.grad(ref_total, [Er, Cr, br])
                want = [want[0], want[1][lo:hi], want[2][lo:hi]]
                tag = f"{impl} {reduction} w={weighted} cap={softcap} shift={shift} lse={lse} ls={ls}"
                try:
                    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
                    if lse:
                        torch.testing.assert_close(lse_out, ref_lse, rtol=1e-10, atol=1e-12)
                    for x, y in zip(got, want):
                        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
                except AssertionError as exc:
                    failures.append(f"{tag}: {str(exc)[:300]}")
    try:  # soft-capping breaks the linearity the sharded smoothing term uses: a clear error
        linear_cross_entropy(E, C[lo:hi], t, label_smoothing=0.1, softcap=2.5, process_group=dist.group.WORLD)
        failures.append("label_smoothing with softcap and process_group was not refused")
    except ValueError as exc:
        if "softcap" not in str(exc) or "label_smoothing" not in str(exc):
            failures.append(f"unclear error: {exc}")
    print(f"rank {rank}: {len(failures)} failure(s)")
    for f in failures:
        print(f"rank {rank}: {f}")
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
