import torch

import lossbench
from lossbench.registry import HEAD, get_loss_entry

NUM_CLASSES = 5
IN_FEATURES = 8


def build(name: str, **kw):
    """A registered loss as a head (logit losses wrapped in LinearHead), in training mode."""
    return lossbench.build_head(name, num_classes=NUM_CLASSES, in_features=IN_FEATURES, **kw)


def is_head(name: str) -> bool:
    return get_loss_entry(name).kind == HEAD


def inputs(name: str, n: int = 10, seed: int = 0):
    """(input, target) for a registered loss: features for a head, logits for a logit loss."""
    gen = torch.Generator().manual_seed(seed)
    width = IN_FEATURES if is_head(name) else NUM_CLASSES
    x = torch.randn(n, width, generator=gen)
    y = torch.arange(n) % NUM_CLASSES
    return x, y
