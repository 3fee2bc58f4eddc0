import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossbench
from lossbench import NBCSoftmaxHead
from lossbench.losses.nbc_softmax import nbc_loss, nbc_loss_from_centres


def _naive_nbc(z, y, num_classes, tau):
    """Written from the paper / official code: mean centres of the classes present, cosine with the
    diagonal set to 0, (1/(K m)) sum_k log sum_l exp(tau S_kl)."""
    classes = sorted(set(y.tolist()))
    centres = [z[y == k].mean(0) for k in classes]
    m = len(centres)
    total = 0.0
    for k in range(m):
        row = 0.0
        for l in range(m):
            s = 0.0 if k == l else float(centres[k] @ centres[l] / (centres[k].norm() * centres[l].norm()))
            row += math.exp(tau * s)
        total += math.log(row)
    return torch.tensor(total / (num_classes * m), dtype=torch.float64)


def _data(n=12, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def test_four_orthogonal_centres_give_log4_over_4():
    z = torch.eye(4, dtype=torch.float64).repeat(2, 1) * 3
    y = torch.arange(4).repeat(2)
    torch.testing.assert_close(nbc_loss(z, y, num_classes=4, tau=0.2), torch.tensor(math.log(4) / 4, dtype=torch.float64))


def test_single_class_batch_gives_zero():
    z, _ = _data()
    y = torch.full((12,), 2)
    torch.testing.assert_close(nbc_loss(z, y, 4), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.2, 0.3, 1.0])
@pytest.mark.parametrize("c", [3, 6])
def test_matches_naive_float64(tau, c):
    z, y = _data(n=20, c=c)
    torch.testing.assert_close(nbc_loss(z, y, c + 2, tau), _naive_nbc(z, y, c + 2, tau))


def test_head_loss_is_mix_of_ce_and_nbc():
    z, y = _data()
    head = NBCSoftmaxHead(5, 4, r=0.3, tau=0.25).double()
    ce = F.cross_entropy(head.fc(z), y)
    torch.testing.assert_close(head(z, y), 0.7 * ce + 0.3 * _naive_nbc(z, y, 4, 0.25))
    torch.testing.assert_close(head.logits(z), head.fc(z))


def test_zero_norm_centre_is_finite():
    z, y = _data()
    z[y == 1] = 0.0
    zr = z.clone().requires_grad_()
    loss = nbc_loss(zr, y, 4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zr.grad).all()
    # a zero centre has similarity 0 with every other centre
    centres = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float64)
    tau, c45 = 0.2, 1 / math.sqrt(2)
    expected = (math.log(3) + 2 * math.log(2 + math.exp(tau * c45))) / (5 * 3)
    torch.testing.assert_close(nbc_loss_from_centres(centres, 5, tau), torch.tensor(expected, dtype=torch.float64))


def test_gradcheck():
    z, y = _data(n=8, d=3, c=3)
    assert gradcheck(lambda t: nbc_loss(t, y, 3, 0.5), (z.requires_grad_(),))
    head = NBCSoftmaxHead(3, 3).double()
    assert gradcheck(lambda t: head(t, y), (z,))


def test_centre_function_rejects_nothing_for_empty():
    assert float(nbc_loss_from_centres(torch.zeros(0, 3), 4)) == 0.0


def test_create_by_name_defaults():
    head = lossbench.create_loss("nbc_softmax", num_classes=4, in_features=5)
    assert isinstance(head, NBCSoftmaxHead) and head.r == 0.5 and head.tau == 0.2


def _worker(rank, world, init_file, z, y, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = z.chunk(world)[rank].clone().requires_grad_()
        loss = nbc_loss(local, y.chunk(world)[rank], 4, 0.3)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(out_dir, f"r{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_gather_uses_global_centres(tmp_path):
    """Two gloo ranks, each half the batch: same L_NBC as one process on the whole batch, and each
    rank's gradient is world_size x the full-batch gradient of its rows (DDP's mean restores it)."""
    z, y = _data(n=16, d=3, c=4, seed=1)
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), z, y, str(tmp_path)),
                       nprocs=world, start_method="spawn")
    full = z.clone().requires_grad_()
    ref = nbc_loss(full, y, 4, 0.3)
    ref.backward()
    for rank in range(world):
        res = torch.load(tmp_path / f"r{rank}.pt")
        torch.testing.assert_close(res["loss"], ref.detach())
        torch.testing.assert_close(res["grad"], world * full.grad.chunk(world)[rank])
