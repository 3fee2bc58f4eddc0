"""A user's own score overrides the public method the documentation names (``score_logits``,
``score_features``); the base class's input checks still run around it."""

import pytest
import torch

from ood.scores.base import LogitScore
from ood.scores.feature_base import FeatureScore


class Margin(LogitScore):
    name = "margin_test"

    def score_logits(self, logits):
        assert logits.dtype == torch.float64  # the checked, float64 logits
        top = logits.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]


class Norm(FeatureScore):
    name = "norm_test"

    def fit_features(self, train_features, train_logits, train_labels, classifier, **kw):
        self._check_train(train_features, train_logits)
        self.fitted_ = True
        return self

    def score_features(self, features, logits):
        return features.norm(dim=1)


def test_public_score_logits_is_the_formula_and_inputs_are_checked():
    """Regression: overriding the public name left ``_score_logits`` abstract (TypeError on construction)."""
    s = Margin()
    out = s.score_logits(torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.5]], dtype=torch.float32))
    assert out.dtype == torch.float64 and out.tolist() == pytest.approx([2.0, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        s.score_logits(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="logits"):
        s.score_logits(torch.ones(3))


def test_public_score_features_is_the_formula_and_inputs_are_checked():
    s = Norm().fit_features(torch.randn(5, 3), torch.randn(5, 2), None, None)
    out = s.score_features(torch.tensor([[3.0, 4.0, 0.0]]), torch.zeros(1, 2))
    assert out.tolist() == pytest.approx([5.0])
    with pytest.raises(ValueError, match="width 3"):
        s.score_features(torch.randn(2, 4), torch.randn(2, 2))


def test_a_subclass_defining_both_names_keeps_its_own_public_method():
    class Both(LogitScore):
        def _score_logits(self, logits):
            return logits[:, 0]

        def score_logits(self, logits):
            return torch.zeros(logits.shape[0], dtype=torch.float64)

    assert Both().score_logits(torch.ones(2, 3)).tolist() == [0.0, 0.0]
    assert Both()._score_logits(torch.ones(2, 3)).tolist() == [1.0, 1.0]
