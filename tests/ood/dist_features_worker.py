"""Run by tests/ood/test_distributed_features.py, under torchrun or alone: one feature pass and one
evaluate_ood (msp, knn) of a fixed model; an evaluate_ood with logit scores only (its own logit pass),
one with model scores (odin, iodin, mahalanobis) and gradnorm; and evaluate_model (the evaluation of
eval.py) of a tiny image model with test-time augmentation. Each process saves what it got, and how
many samples its model ran per step, to ``<out>/rank<r>.pt``."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from lossbench import LinearHead
from lossbench.experiments.evaluate_run import evaluate_model
from lossbench.framework.data import DataBundle, ImageSpec
from ood import FeaturePasses, collect_features, evaluate_ood

#: Sizes not divisible by the two ranks (nor by the batch size).
N_TRAIN, N_TEST, N_OOD, BATCH = 45, 37, 23, 8


class Model(nn.Module):
    """features = tanh(x A^T) (float64 in, cast to float32 by the pass), logits = a lossbench head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8).double()
        self.head = LinearHead(8, 3, nn.CrossEntropyLoss()).double()

    seen = 0  # samples run through the body (the share of the work this process did)

    def features(self, x):
        self.seen += x.shape[0]
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head.logits(self.features(x))


def loaders():
    g = torch.Generator().manual_seed(1)

    def make(n, shift):
        y = torch.arange(n) % 3
        x = shift + nn.functional.one_hot(y, 6).double() + torch.randn(n, 6, generator=g, dtype=torch.float64)
        return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)

    return make(N_TRAIN, 0.0), make(N_TEST, 0.0), make(N_OOD, 1.5)


class ImageModel(nn.Module):
    """A tiny model of 1 x 4 x 4 images (float32), for the test-time augmentation pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Linear(16, 8)
        self.head = LinearHead(8, 3, nn.CrossEntropyLoss())

    seen = 0

    def features(self, x):
        self.seen += x.shape[0]
        return torch.tanh(self.body(x.flatten(1)))

    def forward(self, x):
        return self.head.logits(self.features(x))


def image_bundle() -> DataBundle:
    g = torch.Generator().manual_seed(3)

    def make(n):
        y = torch.arange(n) % 3
        x = torch.randn(n, 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float()
        return TensorDataset(x, y)

    return DataBundle("tiny", make(N_TRAIN), make(29), make(N_TEST), 3, ["a", "b", "c"],
                      ImageSpec(1, 4, (0.5,), (0.5,)))


def counted(model, fn):
    """``fn()`` and the number of samples ``model`` ran meanwhile."""
    before = model.seen
    return fn(), model.seen - before


def scores_of(res):
    return {s: {k: (torch.as_tensor(v["id"]), torch.as_tensor(v["ood"])) for k, v in sets.items()}
            for s, sets in res["scores"].items()}


def pass_outcomes():
    """shared_pass on its own: a nested result (tensors of several dtypes, a dict, the first batch's
    value, None), errors raised in some ranks' shares, an empty data set."""
    from ood.distributed import shared_pass
    from ood.scores.feature_base import ScoreNotApplicable

    loader = DataLoader(TensorDataset(torch.arange(N_TEST)), batch_size=BATCH)

    def rows(part):
        v = torch.cat([b[0] for b in part])
        return v.double() / 7, {"i": v.int(), "odd": v % 2 == 1}, int(next(iter(part))[0][0]), None

    def failing(bad):
        def fn(part):
            for (v,) in part:
                hit = [int(i) for i in v if int(i) in bad]
                if hit:
                    raise ScoreNotApplicable(f"sample {hit[0]}")
            return torch.zeros(len(part.dataset))
        return fn

    out = {"rows": shared_pass(rows, loader)}
    for bad in ((30,), (3, 30)):
        try:
            shared_pass(failing(bad), loader)
            out[bad] = None
        except ScoreNotApplicable as err:
            out[bad] = str(err)
    out["empty"] = shared_pass(lambda part: torch.full((2,), float(len(part.dataset))),
                               DataLoader(TensorDataset(torch.zeros(0)), batch_size=BATCH))
    return out


def main(out: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = Model().eval()
    train, test, ood = loaders()
    passes = FeaturePasses(model)
    d = passes.get(test, "test")
    seen = model.seen
    direct = collect_features(model, ood, "ood")
    res = evaluate_ood(model, train, test, {"far": ood}, scores=("msp", "knn"), score_kwargs={"knn": {"k": 5}})
    assert not res.get("skipped"), res.get("skipped")
    auroc = {s: res["results"][s]["far"]["auroc"] for s in ("msp", "knn")}
    logit_res, logit_seen = counted(model, lambda: evaluate_ood(model, train, test, {"far": ood},
                                                              scores=("msp", "energy")))
    model_res, model_seen = counted(model, lambda: evaluate_ood(
        model, train, test, {"far": ood}, scores=("odin", "iodin", "gradnorm", "mahalanobis"),
        score_kwargs={"odin": {"temperature": 10.0, "eps": 0.05}, "iodin": {"eps": 0.05},
                      "mahalanobis": {"eps": 0.01}}))
    assert not model_res["skipped"], model_res["skipped"]
    image = ImageModel().eval()
    run, run_seen = counted(image, lambda: evaluate_model(image, image_bundle(), ood_sets=["gaussian"],
                                                           scores=["msp", "odin"], batch_size=BATCH, n_noise=23,
                                                           tta=2))
    torch.save({"features": d.features, "logits": d.logits, "labels": d.labels, "ood_features": direct.features,
                "auroc": auroc, "seen": seen, "world": dist.get_world_size() if dist.is_initialized() else 1,
                "logit_scores": scores_of(logit_res), "logit_seen": logit_seen,
                "model_scores": scores_of(model_res), "model_seen": model_seen,
                "model_auroc": {s: r["far"]["auroc"] for s, r in model_res["results"].items()},
                "run_test": run["test"], "run_scores": scores_of(run["ood"]), "run_seen": run_seen,
                "run_temperature": run["calibration"]["temperature"], "pass": pass_outcomes()},
               os.path.join(out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
