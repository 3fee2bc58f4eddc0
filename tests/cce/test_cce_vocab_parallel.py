"""Vocab-parallel cut cross-entropy over two gloo ranks (torchrun, CPU) equals the unsharded loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lossbench.cce import linear_cross_entropy

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_ranks_match_unsharded_cross_entropy():
    env = dict(os.environ)
    root = str(HERE.parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           str(HERE / "vocab_parallel_worker.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("0 failure(s)") == 2, out.stdout[-3000:]


def test_process_group_needs_initialised_distributed():
    E, C, t = torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises(ValueError, match="process_group"):
        linear_cross_entropy(E, C, t, process_group=object())
