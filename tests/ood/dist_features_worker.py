"""Run by tests/ood/test_distributed_features.py, under torchrun or alone: one feature pass and one
evaluate_ood (msp, knn) of a fixed model; each process saves what it got to ``<out>/rank<r>.pt``."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from lossbench import LinearHead
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
    torch.save({"features": d.features, "logits": d.logits, "labels": d.labels, "ood_features": direct.features,
                "auroc": auroc, "seen": seen, "world": dist.get_world_size() if dist.is_initialized() else 1},
               os.path.join(out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
