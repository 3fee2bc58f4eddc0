"""Bad input raises ValueError/TypeError naming the argument, for every registered loss."""

import pytest
import torch

import lossbench
from loss_zoo_helpers import IN_FEATURES, NUM_CLASSES, build, inputs, is_head

NAMES = lossbench.list_losses()
EXPECTED = {"ce", "zloss", "noisy_softmax", "gumbel_softmax", "nbc_softmax", "wcdas", "svm_l1", "svm_l2",
            "multimargin_ww", "multimargin_cs"}


def test_every_method_is_registered():
    assert EXPECTED <= set(NAMES)


def _module_and_input(name):
    x, y = inputs(name)
    if is_head(name):
        return build(name), x, y, "features"
    return lossbench.create_loss(name, num_classes=NUM_CLASSES, in_features=IN_FEATURES), x, y, "logits"


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_batch(name):
    mod, x, y, _ = _module_and_input(name)
    with pytest.raises(ValueError, match=r"target.*batch size"):
        mod(x, y[:-1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [NUM_CLASSES, -1, 10**6])
def test_target_out_of_range(name, bad):
    mod, x, y, _ = _module_and_input(name)
    y = y.clone()
    y[3] = bad
    with pytest.raises(ValueError, match=rf"target values must lie in \[0, {NUM_CLASSES}\)"):
        mod(x, y)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_target(name, dtype):
    mod, x, y, _ = _module_and_input(name)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        mod(x, y.to(dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(name, value):
    mod, x, y, arg = _module_and_input(name)
    x = x.clone()
    x[2, 1] = value
    with pytest.raises(ValueError, match=rf"{arg} contains 1 NaN/inf"):
        mod(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_shape(name):
    mod, x, y, arg = _module_and_input(name)
    with pytest.raises(ValueError, match=rf"{arg} must be 2-D"):
        mod(x[0], y)
    with pytest.raises(TypeError, match=rf"{arg} must be a floating-point tensor"):
        mod(x.long(), y)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_feature_width(name):
    head = build(name)  # logit losses are wrapped in LinearHead
    x, y = inputs(name) if is_head(name) else (torch.randn(10, IN_FEATURES), torch.arange(10) % NUM_CLASSES)
    wide = torch.cat([x, x], dim=1)
    with pytest.raises(ValueError, match=rf"features must have width in_features={IN_FEATURES}"):
        head(wide, y)
    with pytest.raises(ValueError, match=rf"features must have width in_features={IN_FEATURES}"):
        head.logits(wide)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown loss name 'no_such_loss'.*expected one of"):
        lossbench.create_loss("no_such_loss", num_classes=3)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyper_parameter(name):
    from lossbench.errors import UserInputError

    with pytest.raises(TypeError, match=r"unknown hyper-parameter 'not_a_param' for loss") as caught:
        lossbench.create_loss(name, num_classes=NUM_CLASSES, in_features=IN_FEATURES, not_a_param=1)
    assert isinstance(caught.value, UserInputError)  # scripts print it as one error: line


def test_unknown_score_hyper_parameter_for_every_score():
    import ood
    from lossbench.errors import UserInputError

    for name in ood.list_scores():
        with pytest.raises(TypeError, match=rf"unknown hyper-parameter 'not_a_param' for OOD score '{name}'") as caught:
            ood.create_score(name, not_a_param=1)
        assert isinstance(caught.value, UserInputError)


@pytest.mark.parametrize("name", NAMES)
def test_ignore_index_only_where_supported(name):
    mod, x, y, _ = _module_and_input(name)
    y = y.clone()
    y[0] = -100
    if name in ("ce", "cce"):  # -100 is their default ignore_index: allowed, that sample is left out
        torch.testing.assert_close(mod(x, y), mod(x[1:], y[1:]))
    else:
        with pytest.raises(ValueError, match="target values must lie in"):
            mod(x, y)
