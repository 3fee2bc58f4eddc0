"""OpenOOD's protocol: OOD groups, the validation OOD set and the grid search that never sees test sets."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ood import create_score, evaluate_ood, resolve_classifier, collect_features
from ood.search import check_groups, grid_of, grid_points, group_means, search_score

from conftest import loader
from test_feature_pass import _ce_model, _data, _loaders


def _val_ood():
    g = torch.Generator().manual_seed(7)
    return loader(torch.randn(36, 6, generator=g) * 1.5 + 1.0)


def test_grid_points_are_the_product_first_key_fastest_as_openood():
    pts = grid_points({"a": (1, 2), "b": ("x", "y", "z")})
    # OpenOOD's recursive_generator: the last parameter's loop is the outer one
    assert pts == [{"a": a, "b": b} for b in ("x", "y", "z") for a in (1, 2)]
    assert all(list(p) == ["a", "b"] for p in pts)
    with pytest.raises(ValueError, match=r"grid\['a'\]"):
        grid_points({"a": ()})
    assert grid_of("react") == {"percentile": (85, 90, 95, 99)}
    assert grid_of("react", {"percentile": 90}) == {}
    assert set(grid_of("odin")) == {"temperature", "eps"}


def test_search_tie_between_two_grid_points_keeps_openoods_first():
    """ODIN's grid: (T=10, eps=0.0014) and (T=1, eps=0.0028) tie for the best AUROC. OpenOOD visits
    every temperature at eps=0.0014 first, so (10, 0.0014) comes first and wins its strict ``>``."""
    best = {(10.0, 0.0014), (1.0, 0.0028)}
    s_in, s_out = np.array([2.0, 3.0, 4.0]), np.array([1.0, 2.5, 0.0])  # AUROC 8/9
    worse = np.array([3.0, 5.0, 0.0])  # AUROC 4/9

    def evaluate_point(score):
        return s_in, (s_out if (score.temperature, score.eps) in best else worse)

    rec = search_score("odin", {}, evaluate_point)
    assert rec["chosen"] == {"temperature": 10.0, "eps": 0.0014}
    assert [t["params"]["eps"] for t in rec["grid"][:4]] == [0.0014] * 4
    assert sum(t["val_auroc"] == rec["val_auroc"] for t in rec["grid"]) == 2


def test_search_keeps_the_best_validation_auroc_by_brute_force():
    fit, id_l, val, oods = _loaders()
    vood = _val_ood()
    model = _ce_model()
    out = evaluate_ood(model, fit, id_l, oods, scores=("react", "msp"), val_loader=val, val_ood_loader=vood,
                       search=True)
    train, val_d, vood_d = (collect_features(model, x) for x in (fit, val, vood))
    clf = resolve_classifier(model, train)
    aurocs = []
    for p in (85, 90, 95, 99):
        s = create_score("react", percentile=p).fit_data(train, clf, val_d)
        a = s.score_features(val_d.features.double(), val_d.logits.double()).numpy()
        b = s.score_features(vood_d.features.double(), vood_d.logits.double()).numpy()
        aurocs.append(roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b]))
    rec = out["search"]["react"]
    assert [t["params"]["percentile"] for t in rec["grid"]] == [85, 90, 95, 99]
    np.testing.assert_allclose([t["val_auroc"] for t in rec["grid"]], aurocs, rtol=0, atol=1e-12)
    assert rec["chosen"] == {"percentile": (85, 90, 95, 99)[int(np.argmax(aurocs))]}
    assert out["info"]["react"]["percentile"] == rec["chosen"]["percentile"]
    assert out["info"]["react"]["searched"] == rec["chosen"]
    assert "msp" not in out["search"]  # no grid: nothing searched


def test_search_does_not_change_when_a_test_set_is_replaced_by_noise():
    fit, id_l, val, oods = _loaders()
    vood = _val_ood()
    scores = ("react", "gen", "scale", "knn", "odin")
    model = _ce_model()
    a = evaluate_ood(model, fit, id_l, oods, scores=scores, val_loader=val, val_ood_loader=vood, search=True,
                     score_kwargs={"odin": {"input_std": (1.0,) * 6}})
    g = torch.Generator().manual_seed(123)
    noise = {k: loader(torch.randn(len(v.dataset), 6, generator=g) * 9.0) for k, v in oods.items()}
    xi, yi = _data(60, seed=11)
    b = evaluate_ood(model, fit, loader(xi, yi), noise, scores=scores, val_loader=val, val_ood_loader=vood,
                     search=True, score_kwargs={"odin": {"input_std": (1.0,) * 6}})
    assert a["search"] == b["search"] and set(a["search"]) >= {"react", "gen", "scale", "odin"}
    assert a["skipped"] == b["skipped"]
    assert a["results"] != b["results"]  # the test metrics did change


def test_search_ties_keep_the_first_point_and_fixed_parameters_are_not_searched():
    fit, id_l, val, oods = _loaders()
    out = evaluate_ood(_ce_model(), fit, id_l, oods, scores=("gen",), val_loader=val, val_ood_loader=_val_ood(),
                       search=True)
    rec = out["search"]["gen"]
    # 3 classes: every M >= 3 gives the same score, so for the chosen gamma the first M (10) wins the tie
    assert rec["chosen"]["M"] == 10
    best = max(t["val_auroc"] for t in rec["grid"])
    first = next(t for t in rec["grid"] if t["val_auroc"] == best)
    assert rec["chosen"] == first["params"]
    out = evaluate_ood(_ce_model(), fit, id_l, oods, scores=("gen",), score_kwargs={"gen": {"gamma": 0.5}},
                       val_loader=val, val_ood_loader=_val_ood(), search=True)
    assert all(t["params"].keys() == {"M"} for t in out["search"]["gen"]["grid"])
    assert out["info"]["gen"]["gamma"] == 0.5


def test_grid_points_that_cannot_run_are_recorded_and_a_score_with_none_is_skipped():
    fit, id_l, val, oods = _loaders()
    out = evaluate_ood(_ce_model(), fit, id_l, oods, scores=("vim", "msp"), val_loader=val,
                       val_ood_loader=_val_ood(), search=True)
    assert "vim" in out["skipped"] and "grid" in out["skipped"]["vim"] and "vim" not in out["results"]
    assert "msp" in out["results"]


def test_search_needs_validation_data_and_a_separate_validation_ood_set():
    fit, id_l, val, oods = _loaders()
    with pytest.raises(ValueError, match="val_ood_loader"):
        evaluate_ood(_ce_model(), fit, id_l, oods, scores=("react",), val_loader=val, search=True)
    with pytest.raises(ValueError, match="must not be a test set"):
        evaluate_ood(_ce_model(), fit, id_l, oods, scores=("react",), val_loader=val, val_ood_loader=oods["far"],
                     search=True)


def test_groups_give_the_mean_of_their_sets_and_bad_groups_are_errors():
    fit, id_l, val, oods = _loaders()
    out = evaluate_ood(_ce_model(), fit, id_l, oods, scores=("msp", "energy"), ood_groups={"near": ["noise"], "both": ["far"]})
    assert out["groups"] == {"near": ["noise"], "both": ["far"]}
    for s in ("msp", "energy"):
        assert out["group_means"][s]["near"]["auroc"] == out["results"][s]["noise"]["auroc"]
    results = {"m": {"a": {"auroc": 0.5, "fpr95": 0.2}, "b": {"auroc": 0.9, "fpr95": 0.4}}}
    gm = group_means(results, {"g": ["a", "b"]})
    assert gm["m"]["g"]["auroc"] == pytest.approx(0.7) and gm["m"]["g"]["fpr95"] == pytest.approx(0.3)
    assert gm["m"]["g"]["n_sets"] == 2
    with pytest.raises(ValueError, match="not an OOD set"):
        check_groups({"near": ["x"]}, ["a"])
    with pytest.raises(ValueError, match="two groups"):
        check_groups({"near": ["a"], "far": ["a"]}, ["a"])
    with pytest.raises(ValueError, match="non-empty list"):
        check_groups({"near": []}, ["a"])
