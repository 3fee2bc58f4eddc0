"""Data-parallel training: torchrun with 2 CPU processes (gloo) equals one process on the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lossbench.framework.distributed import GlobalBatchSampler

ROOT = Path(__file__).resolve().parents[2]
# test_nfnet has no BatchNorm: per-rank batch statistics would make CPU DDP differ (SyncBatchNorm is GPU-only).
ARGS = ["train.py", "-c", "configs/demo.yaml", "--model", "test_nfnet", "--img-size", "16", "--epochs", "2",
        "--batch-size", "32", "--max-train-samples", "128", "--no-progress"]


def test_ranks_cover_the_single_process_batches():
    single = list(GlobalBatchSampler(103, 8, seed=5))
    ranks = [list(GlobalBatchSampler(103, 8, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 12
    for k, batch in enumerate(single):
        assert ranks[0][k] + ranks[1][k] == batch
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(10, 5, seed=0, world_size=2)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(torchrun + ARGS + ["--output", str(tmp_path), "--name", "ddp"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("epoch 2/2") == 1  # only rank 0 logs
    out = subprocess.run([sys.executable] + ARGS + ["--output", str(tmp_path), "--name", "one"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    # stated tolerance: float32 summation order differs between one process and two ranks
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert abs(a["log"][-1]["train_loss"] - b["log"][-1]["train_loss"]) < 1e-5


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.slow
def test_eval_under_torchrun_matches_one_process(tmp_path):
    """eval.py under torchrun: the ranks share the feature passes out; rank 0 writes the same metrics as one
    process (sizes 128 training / digits test / OOD sets split over 2 ranks, whole batches each)."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = [sys.executable] + ARGS[:ARGS.index("--epochs")] + ["--epochs", "1"] + ARGS[ARGS.index("--epochs") + 2:]
    out = subprocess.run(train + ["--output", str(tmp_path), "--name", "run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    ev = ["eval.py", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--scores", "msp,energy,knn",
          "--ood", "heldout,gaussian", "--no-feature-cache", "--no-progress", "--batch-size", "48"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        out = subprocess.run(launcher + ev + ["--out", str(tmp_path / name)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count("wrote metrics.json") == 1  # only rank 0 writes and reports
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    for key in ("test", "calibration", "ood_sets"):
        assert one[key] == two[key], key
    assert one["ood"]["results"] == two["ood"]["results"] and set(one["ood"]["results"]) == {"msp", "energy", "knn"}
