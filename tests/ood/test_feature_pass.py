"""The feature-score interface: one (features, logits) pass per loader, classifiers, skips."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import lossbench
from lossbench import LinearHead
from ood import (Classifier, FeatureScore, ScoreNotApplicable, collect_features, create_score,
                 evaluate_ood, list_scores, resolve_classifier)
from ood.registry import get_score_class

from conftest import loader

FEATURE_SCORES = [n for n in list_scores() if get_score_class(n).needs == "features"]


class HeadModel(nn.Module):
    """features = ReLU(x A^T); logits = a lossbench head; counts backbone passes."""

    def __init__(self, head: nn.Module, in_dim: int = 6, feat_dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(in_dim, feat_dim)
        self.head = head
        self.passes = 0

    def features(self, x):
        self.passes += 1
        return torch.relu(self.body(x))

    def forward(self, x):
        return self.head.logits(self.features(x))


def _data(n=120, in_dim=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(c).repeat(n // c)
    x = 2.0 * nn.functional.one_hot(y, in_dim).float() + torch.randn(n, in_dim, generator=g)
    return x, y


def _ce_model(c=3):
    """A linear head fitted (least squares to 5 x one-hot) so that every class is predicted."""
    model = HeadModel(LinearHead(8, c, nn.CrossEntropyLoss()))
    x, y = _data(c=c)
    with torch.no_grad():
        h = torch.cat([model.features(x), torch.ones(len(x), 1)], 1)
        sol = torch.linalg.lstsq(h, 5.0 * nn.functional.one_hot(y, c).float()).solution
        model.head.fc.weight.copy_(sol[:-1].T)
        model.head.fc.bias.copy_(sol[-1])
    model.passes = 0
    return model


def _loaders(c=3):
    x, y = _data(c=c)
    xi, yi = _data(60, c=c, seed=1)
    xv, yv = _data(30, c=c, seed=2)
    oods = {"noise": loader(torch.randn(40, 6)), "far": loader(torch.randn(30, 6) + 6.0)}
    return loader(x, y), loader(xi, yi), loader(xv, yv), oods


def test_every_feature_score_has_grid_of_its_own_parameters():
    import inspect
    assert len(FEATURE_SCORES) >= 14
    for n in FEATURE_SCORES + ["gen"]:
        cls = get_score_class(n)
        params = set(inspect.signature(cls.__init__).parameters)
        assert isinstance(cls.GRID, dict)
        assert set(cls.GRID) <= params, (n, cls.GRID)
        assert cls.__doc__ and len(cls.__doc__) > 200, n


def test_collect_features_one_backbone_pass_with_head():
    model = _ce_model()
    fit, _, _, _ = _loaders()
    data = collect_features(model, fit)
    assert model.passes == len(fit)
    assert data.features.shape == (120, 8) and data.logits.shape == (120, 3) and data.labels.shape == (120,)
    torch.testing.assert_close(data.logits, model.head.logits(data.features))


def test_evaluator_second_score_does_no_extra_forward_pass():
    fit, id_l, val, oods = _loaders()
    model = _ce_model()
    evaluate_ood(model, fit, id_l, oods, scores=("knn",), score_kwargs={"knn": {"k": 5}})
    one = model.passes
    assert one == len(fit) + len(id_l) + sum(len(l) for l in oods.values())
    model.passes = 0
    out = evaluate_ood(model, fit, id_l, oods, scores=("knn", "vim", "msp", "energy", "gen", "rmds", "she"),
                       score_kwargs={"knn": {"k": 5}, "vim": {"dim": 4}})
    assert model.passes == one  # six more scores, not one more forward pass
    assert out["feature_passes"] == 2 + len(oods)
    assert out["skipped"] == {}
    # the same numbers as each score run on its own over the model
    knn = create_score("knn", k=5).fit(model, fit)
    np.testing.assert_allclose(out["scores"]["knn"]["far"]["ood"], knn.score(model, oods["far"]).numpy())
    vim = create_score("vim", dim=4).fit(model, fit)
    np.testing.assert_allclose(out["scores"]["vim"]["noise"]["id"], vim.score(model, id_l).numpy())
    json.dumps(out["results"]), json.dumps(out["info"])


def test_validation_pass_only_once_and_only_when_used():
    fit, id_l, val, oods = _loaders()
    model = _ce_model()
    out = evaluate_ood(model, fit, id_l, oods, scores=("react", "kl_matching", "knn"), val_loader=val,
                       score_kwargs={"knn": {"k": 5}})
    assert model.passes == len(fit) + len(val) + len(id_l) + sum(len(l) for l in oods.values())
    assert out["info"]["react"]["threshold_from"] == "val"
    assert out["info"]["kl_matching"]["reference_from"] == "val"
    model.passes = 0
    evaluate_ood(model, fit, id_l, oods, scores=("knn",), val_loader=val, score_kwargs={"knn": {"k": 5}})
    assert model.passes == len(fit) + len(id_l) + sum(len(l) for l in oods.values())


def test_linear_classifier_resolution():
    fit, *_ = _loaders()
    for head, linear in [(LinearHead(8, 3, nn.CrossEntropyLoss()), True),
                         (lossbench.create_loss("cce", in_features=8, num_classes=3), True),
                         (lossbench.create_loss("cce", in_features=8, num_classes=3, softcap=0.5), False),
                         (lossbench.create_loss("noisy_softmax", in_features=8, num_classes=3), True),
                         (lossbench.create_loss("wcdas", in_features=8, num_classes=3), False)]:
        model = HeadModel(head)
        data = collect_features(model, fit)
        clf = resolve_classifier(model, data)
        assert clf.linear is linear, type(head).__name__
        if linear:
            torch.testing.assert_close(clf.logits(data.features), data.logits.double(), rtol=1e-5, atol=1e-5)
        else:
            assert type(head).__name__ in clf.reason
        # the head's own function is always available (ReAct, ASH, SCALE use it)
        torch.testing.assert_close(Classifier.logits(clf, data.features), data.logits.double(), rtol=1e-5, atol=1e-5)


def test_nonlinear_head_skips_linear_scores_with_reason_and_runs_the_rest():
    fit, id_l, _, oods = _loaders()
    model = HeadModel(lossbench.create_loss("wcdas", in_features=8, num_classes=3))
    need_linear = ("vim", "dice", "gradnorm", "fdbd")
    out = evaluate_ood(model, fit, id_l, oods, scores=need_linear + ("react", "ash_s", "knn", "msp"),
                       score_kwargs={"knn": {"k": 5}, "vim": {"dim": 4}})
    assert set(out["skipped"]) == set(need_linear)
    for n in need_linear:
        assert "WCDASHead" in out["skipped"][n] and "linear" in out["skipped"][n]
        assert out["info"][n]["skipped"] == out["skipped"][n]
        assert n not in out["results"]
    assert set(out["results"]) == {"react", "ash_s", "knn", "msp"}
    # ReAct through the WCDAS head's own logits
    data = collect_features(model, id_l)
    react = create_score("react").fit(model, fit)
    expected = torch.logsumexp(model.head.logits(data.features.clamp(max=react.threshold_)).double(), 1)
    np.testing.assert_allclose(out["scores"]["react"]["far"]["id"], expected.detach().numpy(), rtol=1e-6)


def test_direct_fit_raises_clear_errors():
    model = HeadModel(lossbench.create_loss("wcdas", in_features=8, num_classes=3))
    fit, *_ = _loaders()
    with pytest.raises(ScoreNotApplicable, match="WCDASHead"):
        create_score("vim").fit(model, fit)
    with pytest.raises(ScoreNotApplicable, match="labels"):
        create_score("mds").fit_features(torch.randn(10, 3), torch.randn(10, 2), None, None)
    with pytest.raises(ScoreNotApplicable, match="classifier"):
        create_score("react").fit_features(torch.randn(10, 3), torch.randn(10, 2), None, None)
    with pytest.raises(RuntimeError, match="not fitted"):
        create_score("knn").score_features(torch.randn(4, 3), torch.randn(4, 2))
    knn = create_score("knn", k=2).fit_features(torch.randn(10, 3), torch.randn(10, 2), None, None)
    with pytest.raises(ValueError, match="width 3"):
        knn.score_features(torch.randn(4, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="same N"):
        knn.score_features(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        knn.score_features(torch.full((4, 3), float("nan")), torch.randn(4, 2))
    with pytest.raises(ValueError, match="k must"):
        create_score("knn", k=0)
    assert isinstance(knn, FeatureScore)


def test_small_data_skips_instead_of_crashing():
    fit, id_l, _, oods = _loaders()
    out = evaluate_ood(_ce_model(), fit, id_l, oods, scores=("knn", "nnguide", "msp"))
    assert "knn" in out["results"]  # k = 50 <= 120 training samples
    assert "nnguide" in out["results"]  # the bank is enlarged to K = 100 of the 120 training samples
    assert out["info"]["nnguide"]["bank_size"] == 100
    assert "msp" in out["results"]
    out = evaluate_ood(_ce_model(), fit, id_l, oods, scores=("nnguide",), score_kwargs={"nnguide": {"K": 200}})
    assert "nnguide" in out["skipped"] and "K=200" in out["skipped"]["nnguide"]


def test_model_without_head_uses_its_fc_checked_against_its_logits():
    from conftest import LinearFeatureModel

    model = LinearFeatureModel(in_dim=6, feat_dim=5, num_classes=3)
    x, y = _data()
    data = collect_features(model, loader(x.double(), y))
    torch.testing.assert_close(data.logits, model(x.double()).float())
    clf = resolve_classifier(model, data)
    assert clf.linear and clf.source == "LinearFeatureModel.fc"

    class Scaled(LinearFeatureModel):  # logits are not fc(features): the fc must not be trusted
        def forward(self, x):
            return 2.0 * super().forward(x)

    odd = Scaled(in_dim=6, feat_dim=5, num_classes=3)
    clf = resolve_classifier(odd, collect_features(odd, loader(x.double(), y)))
    assert not clf.linear and "not W h + b" in clf.reason
    with pytest.raises(ScoreNotApplicable, match="classifier"):  # no head function either
        create_score("react").fit(odd, loader(x.double(), y))


def test_every_registered_score_runs_or_is_skipped_with_a_reason(resnet_model):
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32), torch.arange(24) % 4
    fit, id_l = loader(x, y, batch_size=8), loader(torch.randn(12, 3, 32, 32), torch.arange(12) % 4, batch_size=8)
    oods = {"noise": loader(torch.rand(10, 3, 32, 32), batch_size=8)}
    kw = {"knn": {"k": 3}, "nnguide": {"K": 1, "alpha": 0.2}, "odin": {"eps": 0.0}, "vim": {"dim": 8},
          "mahalanobis": {"layers": "penultimate"}}
    out = evaluate_ood(resnet_model, fit, id_l, oods, scores=list_scores(), score_kwargs=kw)
    assert set(out["results"]) | set(out["skipped"]) == set(list_scores())
    assert set(out["results"]) & set(out["skipped"]) == set()
    for n, reason in out["skipped"].items():  # an untrained head: SHE may have no correct class
        assert reason and out["info"][n]["skipped"] == reason
    assert {"knn", "vim", "react", "ash_b", "dice", "gradnorm", "fdbd", "relation", "msp"} <= set(out["results"])
    for per in out["results"].values():
        assert 0.0 <= per["noise"]["auroc"] <= 1.0
    json.dumps(out["info"]), json.dumps(out["skipped"])
