"""build_optimizer honours a head's declared settings, and timm's schedule keeps their lr ratios."""

import pytest

from lossbench.framework.builders import build_optimizer, build_scheduler
from lossbench.framework.config import parse_args
from lossbench.framework.models import create_model


def _model(loss):
    return create_model("test_resnet", 6, loss, {}, in_chans=1)


def test_plain_head_keeps_timm_default_grouping():
    args = parse_args(["--loss", "ce"])
    opt = build_optimizer(args, _model("ce"))
    assert all(g["lr"] == args.lr for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


def test_wcdas_groups_and_schedule():
    args = parse_args(["--loss", "wcdas", "--lr", "2e-3", "--epochs", "2", "--warmup-epochs", "0"])
    model = _model("wcdas")
    opt = build_optimizer(args, model)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len([p for p in model.parameters() if p.requires_grad])
    s_group = next(g for g in opt.param_groups if any(p is model.head.s_raw for p in g["params"]))
    assert s_group["lr"] == pytest.approx(1.0) and s_group["weight_decay"] == 0.0
    sched = build_scheduler(args, opt, steps_per_epoch=10)
    sched.step_update(10)  # half way through the cosine
    base = next(g for g in opt.param_groups if any(p is model.head.weight for p in g["params"]))
    # each group follows the cosine from its own peak down to the shared min_lr
    half = lambda peak: args.min_lr + 0.5 * (peak - args.min_lr)  # noqa: E731
    assert s_group["lr"] == pytest.approx(half(1.0)) and base["lr"] == pytest.approx(half(2e-3))
