import argparse

import pytest

from lossbench.framework.builders import build_optimizer
from lossbench.framework.checkpoint import CheckpointError, check_resumable
from lossbench.framework.config import LEGACY_CONFIG, build_parser, config_keys, parse_args, to_dict
from lossbench.framework.models import create_model

NEW_KEYS = sorted(LEGACY_CONFIG)


def test_new_keys_are_options_with_defaults():
    args = build_parser().parse_args([])
    assert set(NEW_KEYS) <= set(config_keys(build_parser()))
    for k in NEW_KEYS:
        assert hasattr(args, k)


@pytest.mark.parametrize("path", ["configs/cifar10_resnet18.yaml", "configs/cifar10_resnet18_short.yaml",
                                  "configs/cifar10_subset_cpu.yaml"])
def test_recipe_configs_parse_with_relative_paths(path):
    a = parse_args(["-c", path])
    assert a.data.startswith("imagefolder:../shared/datasets/") and a.augment == "cifar"
    assert a.test_folder is None or a.test_folder.startswith("../shared/datasets/")
    assert a.opt == "sgd" and a.lr == 0.1 and a.momentum == 0.9 and a.nesterov and a.weight_decay == 5e-4
    assert a.batch_size == 128


def test_reference_recipe_values():
    a = parse_args(["-c", "configs/cifar10_resnet18.yaml"])
    assert a.epochs == 100 and a.small_stem and a.model == "resnet18" and a.loss == "ce"
    assert parse_args(["-c", "configs/cifar10_resnet18_short.yaml"]).epochs == 30


@pytest.mark.parametrize("flag,expected", [([], True), (["--no-nesterov"], False)])
def test_sgd_nesterov_option(flag, expected):
    a = parse_args(["--opt", "sgd", "--lr", "0.1"] + flag)
    opt = build_optimizer(a, create_model("test_resnet", 3, "ce", in_chans=1))
    assert all(g["nesterov"] is expected and g["momentum"] == 0.9 for g in opt.param_groups)


def test_runs_saved_before_the_new_options_still_resume():
    now = to_dict(parse_args(["-c", "configs/demo.yaml"]))
    old = {k: v for k, v in now.items() if k not in NEW_KEYS}
    check_resumable(old, now, "old", "hint")  # digits: augment resolves to none, as old runs did
    rgb_now = to_dict(parse_args(["--data", "imagefolder:x"]))
    rgb_old = {k: v for k, v in rgb_now.items() if k not in NEW_KEYS}
    with pytest.raises(CheckpointError, match="augment: 'none' -> 'cifar'"):
        check_resumable(rgb_old, rgb_now, "old", "hint")
    check_resumable(rgb_old, to_dict(parse_args(["--data", "imagefolder:x", "--augment", "none"])), "old", "h")
    moved = dict(rgb_now, decode_once=False, cache_dir="elsewhere", device_augment="off")
    check_resumable(rgb_now, moved, "run", "hint")  # how it runs, not what it computes
