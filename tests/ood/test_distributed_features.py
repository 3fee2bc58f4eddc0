"""Evaluation passes under torchrun: two gloo ranks on the CPU share each loader out and gather the
result, which equals the single-process pass exactly, in the original order: the feature pass, the
logit pass of the logit scores, the model scores' passes (ODIN, i-ODIN, Mahalanobis) and the
test-time-augmentation pass of evaluate_model. Without a process group no collective is called."""

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
        for key in ("logit_scores", "model_scores", "run_scores"):  # per sample, exact, on both ranks
            assert set(got[key]) == set(one[key]), key
            for score, sets in one[key].items():
                for name, (s_in, s_out) in sets.items():
                    g_in, g_out = got[key][score][name]
                    assert torch.equal(g_in, s_in) and torch.equal(g_out, s_out), (r, key, score, name)
        assert got["model_auroc"] == one["model_auroc"]
        assert got["run_test"] == one["run_test"] and "acc_tta" in one["run_test"]  # accuracy, with TTA
        assert got["run_temperature"] == one["run_temperature"]
        p, q = got["pass"], one["pass"]
        assert torch.equal(p["rows"][0], q["rows"][0]) and p["rows"][0].dtype == torch.float64
        assert all(torch.equal(p["rows"][1][k], q["rows"][1][k]) and p["rows"][1][k].dtype == q["rows"][1][k].dtype
                   for k in ("i", "odd"))
        assert p["rows"][2:] == q["rows"][2:] == (0, None)  # the loader's first batch (rank 0's), None
        assert p[(30,)] == q[(30,)] == "sample 30"  # raised on rank 1 only, on both as one process
        assert p[(3, 30)] == q[(3, 30)] == "sample 3"  # the first failing rank's, as one process meets it
        assert torch.equal(p["empty"], q["empty"])
    for key in ("logit_seen", "model_seen", "run_seen"):  # every sample run once, on one rank
        seen = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False)[key] for r in (0, 1)]
        assert sum(seen) == one[key] and min(seen) > 0, (key, seen, one[key])


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


def test_no_process_group_no_collective(monkeypatch):
    """Without a process group, the evaluation (logit, model and feature scores; evaluate_model with its
    TTA pass) calls no collective at all."""
    import torch.distributed as dist

    import dist_features_worker as w
    from ood import evaluate_ood

    def refuse(*a, **k):
        raise AssertionError("a collective was called without a process group")

    for name in ("all_gather", "all_gather_object", "all_reduce", "broadcast", "barrier", "get_world_size",
                 "get_rank", "get_backend"):
        monkeypatch.setattr(dist, name, refuse)
    model = w.Model().eval()
    train, test, ood = w.loaders()
    res = evaluate_ood(model, train, test, {"far": ood}, scores=("msp", "energy", "odin", "gradnorm", "mahalanobis"),
                       score_kwargs={"mahalanobis": {"eps": 0.01}})
    assert not res["skipped"] and set(res["results"]) == {"msp", "energy", "odin", "gradnorm", "mahalanobis"}
    assert set(evaluate_ood(model, train, test, {"far": ood}, scores=("msp",))["results"]) == {"msp"}
    image = w.ImageModel().eval()
    run = w.evaluate_model(image, w.image_bundle(), ood_sets=["gaussian"], scores=["msp", "odin"], batch_size=8,
                           n_noise=23, tta=1)
    assert "acc_tta" in run["test"]
