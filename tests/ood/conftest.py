"""Small models that follow the lossbench model protocol, for the OOD tests."""

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from lossbench import LinearHead


class TimmClassifier(nn.Module):
    """features = timm backbone (num_classes=0); logits = a lossbench LinearHead."""

    def __init__(self, num_classes: int = 4, arch: str = "test_resnet"):
        super().__init__()
        self.backbone = timm.create_model(arch, num_classes=0, pretrained=False)
        self.head = LinearHead(self.backbone.num_features, num_classes, nn.CrossEntropyLoss())
        self.calls = 0

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        self.calls += 1
        return self.head.logits(self.features(x))


class LinearFeatureModel(nn.Module):
    """features(x) = x A^T (no timm backbone); logits = features W^T + b: gradients in closed form."""

    def __init__(self, in_dim: int, feat_dim: int, num_classes: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(feat_dim, in_dim, generator=g, dtype=torch.float64))
        self.fc = nn.Linear(feat_dim, num_classes).double()

    def features(self, x):
        return x @ self.A.T

    def forward(self, x):
        return self.fc(self.features(x))


def loader(x, y=None, batch_size=16):
    y = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def resnet_model():
    torch.manual_seed(0)
    return TimmClassifier(num_classes=4).eval()
