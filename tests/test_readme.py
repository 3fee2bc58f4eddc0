"""Every Python block of the README runs unchanged (the names it leaves to the reader are bound here)."""

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _namespace():
    """What the README's snippets assume the reader has: data, a backbone, a model, loaders."""
    from lossbench.framework.models import create_model

    g = torch.Generator().manual_seed(0)
    model = create_model("test_resnet", 6, "ce", {}, in_chans=1).eval()
    x = torch.randn(24, 1, 32, 32, generator=g)
    y = torch.arange(24) % 6

    def make_loader(inputs, labels):
        return DataLoader(TensorDataset(inputs, labels), batch_size=8)

    return {
        "logits": torch.randn(16, 100, generator=g), "target": torch.randint(0, 100, (16,), generator=g),
        "features": torch.randn(16, 32, generator=g), "weight": torch.randn(100, 32, generator=g),
        "bias": torch.randn(100, generator=g),
        "backbone": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 512)),
        "loader": make_loader(torch.randn(8, 4, generator=g), torch.randint(0, 100, (8,), generator=g)),
        "model": model, "train_loader": make_loader(x, y), "id_loader": make_loader(x[:12], y[:12]),
        "ood_loader": make_loader(torch.rand(12, 1, 32, 32, generator=g), torch.zeros(12, dtype=torch.long)),
    }


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), _namespace())
