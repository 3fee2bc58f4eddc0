"""Feature passes under torchrun: two gloo ranks on the CPU share the loader out and gather the
result, which equals the single-process pass exactly, in the original order."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "dist_features_worker.py"


def _run(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    done = subprocess.run(cmd + [str(WORKER), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_two_ranks_gather_the_single_process_features(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _run([sys.executable], tmp_path / "one")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path / "two")
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    assert one["world"] == 1 and one["features"].shape == (37, 8) and one["ood_features"].shape == (23, 8)
    assert one["seen"] == 37
    for r in (0, 1):
        got = torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False)
        assert got["world"] == 2
        assert got["seen"] == (16, 21)[r]  # 5 batches of 8 (the last of 5): 2 on rank 0, 3 on rank 1
        for key in ("features", "logits", "labels", "ood_features"):
            assert got[key].dtype == one[key].dtype, key
            assert torch.equal(got[key], one[key]), (r, key)  # exact, in the original order
        assert got["auroc"] == one["auroc"]


def test_rank_share_splits_whole_batches_without_duplicates(monkeypatch):
    """The split itself, with the process group faked: contiguous runs of the loader's batches, every
    sample once, an empty share when there are fewer batches than ranks; other loaders run whole."""
    from torch.utils.data import DataLoader, TensorDataset

    import ood.distributed as od

    ds = TensorDataset(torch.arange(37.0).unsqueeze(1))

    def shares(n_ranks, loader):
        out = []
        for r in range(n_ranks):
            monkeypatch.setattr(od, "world", lambda r=r: (r, n_ranks))
            s = od.rank_share(loader)
            out.append(None if s is None else [b[0].flatten().tolist() for b in s])
        return out

    single = [b[0].flatten().tolist() for b in DataLoader(ds, batch_size=8)]
    two = shares(2, DataLoader(ds, batch_size=8))
    assert two[0] + two[1] == single and len(two[0]) == 2  # 5 batches: 2 + 3, the same batches
    seven = shares(7, DataLoader(ds, batch_size=8))
    assert sum(seven, []) == single and sum(1 for s in seven if not s) == 2
    assert shares(2, DataLoader(ds, batch_size=8, shuffle=True)) == [None, None]
    assert shares(2, DataLoader(ds, batch_size=8, drop_last=True)) == [None, None]
    assert shares(1, DataLoader(ds, batch_size=8)) == [None]


def test_gather_keeps_shapes_and_label_dtypes(tmp_path):
    """The gather in a one-rank gloo group: rows, trailing shapes and the labels' own dtype come back;
    no rows anywhere is ``None``."""
    import torch.distributed as dist

    from ood.distributed import gather_feature_data

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        f, z = torch.randn(5, 4), torch.randn(5, 3)
        for y in (torch.arange(5, dtype=torch.int32), torch.rand(5, dtype=torch.float64), torch.ones(5).bool()):
            got = gather_feature_data(f, z, y)
            assert torch.equal(got[0], f) and torch.equal(got[1], z)
            assert got[2].dtype == y.dtype and torch.equal(got[2], y)
        assert gather_feature_data(f, z, None)[2] is None
        assert gather_feature_data(None, None, None) is None
    finally:
        dist.destroy_process_group()
