"""Every registered loss: finite loss and gradients at extreme logits (+-1e4) and under bf16 autocast."""

import pytest
import torch

import lossbench
from loss_zoo_helpers import IN_FEATURES, NUM_CLASSES, build, inputs, is_head


@pytest.mark.parametrize("name", lossbench.list_losses())
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_finite_at_extreme_logits(name, scale):
    torch.manual_seed(0)
    if is_head(name):
        head = build(name)
        x, y = inputs(name)
        # features large enough that the linear heads' logits reach ~1e4
        x = (x * abs(scale) / x.norm(dim=1, keepdim=True) * 3).requires_grad_()
        loss = head(x, y)
        params = [p for p in head.parameters() if p.requires_grad]
    else:
        loss_fn = lossbench.create_loss(name, num_classes=NUM_CLASSES)
        x, y = inputs(name)
        x = (torch.sign(x) * abs(scale) + x).requires_grad_()
        loss = loss_fn(x, y)
        params = []
    assert torch.isfinite(loss).all(), loss
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for p in params:
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", lossbench.list_losses())
def test_finite_under_bf16_autocast(name):
    torch.manual_seed(0)
    head = build(name)
    gen = torch.Generator().manual_seed(1)
    feats = (torch.randn(16, IN_FEATURES, generator=gen) * 10).requires_grad_()
    y = torch.arange(16) % NUM_CLASSES
    torch.manual_seed(2)  # same noise for the stochastic losses in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(feats, y)
        logits = head.logits(feats)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert logits.shape == (16, NUM_CLASSES) and torch.isfinite(logits).all()
    loss.backward()
    assert torch.isfinite(feats.grad).all()
    for p in head.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all()
    torch.manual_seed(2)
    ref = head(feats.detach(), y)  # the float32 value
    torch.testing.assert_close(loss.float(), ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name", lossbench.list_losses())
def test_every_step_hook_and_eval_logits(name):
    head = build(name)
    for step in (0, 1, 10_000):
        head.on_step(step)
    x, _ = inputs(name) if is_head(name) else (torch.randn(4, IN_FEATURES), None)
    head.eval()
    out1, out2 = head.logits(x), head.logits(x)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # inference is deterministic
