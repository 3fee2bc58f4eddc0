import json

import numpy as np
import pytest
import torch

from ood import Energy, MSP, OODScore, evaluate_ood, ood_metrics
from ood.registry import SCORES, register_score
from lossbench.experiments.report import markdown_table, plot_histograms, plot_roc

from conftest import LinearFeatureModel, loader


class Counting(LinearFeatureModel):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


def _setup():
    torch.manual_seed(0)
    model = Counting(in_dim=6, feat_dim=5, num_classes=3)
    y = torch.arange(3).repeat(40)
    centres = 3.0 * torch.nn.functional.one_hot(y, 6).double()
    x_fit = centres + torch.randn(120, 6, dtype=torch.float64)
    with torch.no_grad():  # give the linear head the class structure
        model.fc.weight.copy_(torch.linalg.lstsq(model.features(x_fit), 5 * torch.nn.functional.one_hot(y, 3).double()).solution.T)
        model.fc.bias.zero_()
    y_id = torch.arange(3).repeat(20)
    x_id = 3.0 * torch.nn.functional.one_hot(y_id, 6).double() + torch.randn(60, 6, dtype=torch.float64)
    oods = {"noise": loader(torch.randn(40, 6, dtype=torch.float64) * 0.3),
            "far": loader(torch.randn(30, 6, dtype=torch.float64) + 12.0)}
    return model, loader(x_fit, y), loader(x_id, y_id), oods, x_id


def test_evaluate_structure_and_one_pass_for_logit_scores():
    model, fit, id_l, oods, x_id = _setup()
    Counting.calls = 0
    out = evaluate_ood(model, fit, id_l, oods, scores=("msp", "energy", "maxlogit"))
    n_batches = len(id_l) + sum(len(l) for l in oods.values())
    assert Counting.calls == n_batches  # one forward per batch for all three scores
    assert out["convention"] == "paper"
    assert set(out["results"]) == {"msp", "energy", "maxlogit"}
    for name, per in out["results"].items():
        assert set(per) == {"noise", "far"}
        for s, m in per.items():
            pair = out["scores"][name][s]
            assert set(pair) == {"id", "ood"}  # one shape of result for every score
            assert m == ood_metrics(pair["id"], pair["ood"])
    np.testing.assert_allclose(out["scores"]["energy"]["far"]["id"], Energy().score_logits(model(x_id).detach()).numpy())
    np.testing.assert_allclose(out["scores"]["msp"]["noise"]["id"], MSP().score_logits(model(x_id).detach()).numpy())


def test_every_score_and_both_mahalanobis_protocols(tmp_path):
    model, fit, id_l, oods, _ = _setup()
    out = evaluate_ood(model, fit, id_l, oods,
                       scores=("msp", "energy", "maxlogit", "odin", "mahalanobis"),
                       score_kwargs={"odin": {"eps": 0.001}}, convention="openood")
    assert out["convention"] == "openood"
    assert out["info"]["mahalanobis"]["protocol"] == "simple"
    assert out["results"]["mahalanobis"]["far"]["auroc"] > 0.95
    for per in out["results"].values():
        for m in per.values():
            assert m["convention"] == "openood" and 0.0 <= m["auroc"] <= 1.0

    paper = evaluate_ood(model, fit, id_l, oods, scores=("mahalanobis",),
                         score_kwargs={"mahalanobis": {"protocol": "paper", "eps_grid": (0.0, 0.01)}})
    res = paper["results"]["mahalanobis"]
    assert "optimistic" in res["far"]["protocol"]
    raw = paper["scores"]["mahalanobis"]
    assert set(raw) == {"noise", "far"} and set(raw["far"]) == {"id", "ood"}
    assert len(raw["far"]["id"]) == 60 - 15  # block min(1000, 30, 15)
    assert set(paper["info"]["mahalanobis"]["eps"]) == {"noise", "far"}

    text = markdown_table(out, "openood")
    assert "Convention `openood`" in text and "| odin |" in text
    assert "| score | noise | far | mean |" in text
    json.dumps(out["results"])  # metrics are JSON-serialisable
    plot_roc(out["scores"], str(tmp_path / "roc.png"))
    plot_histograms(paper, str(tmp_path / "hist.png"))
    for f in ("roc.png", "hist.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_protocol_with_val_loader():
    model, fit, id_l, oods, _ = _setup()
    val_x = 3.0 * torch.nn.functional.one_hot(torch.arange(3).repeat(10), 6).double() + torch.randn(30, 6, dtype=torch.float64)
    out = evaluate_ood(model, fit, id_l, oods, scores=("mahalanobis",), val_loader=loader(val_x, torch.arange(3).repeat(10)),
                       score_kwargs={"mahalanobis": {"layers": "penultimate", "eps_grid": (0.0, 0.005)}})
    assert out["info"]["mahalanobis"]["protocol"] == "validation"
    assert out["info"]["mahalanobis"]["eps"] in (0.0, 0.005)


@pytest.mark.parametrize("kw, err, msg", [
    ({"scores": ("nope",)}, ValueError, "unknown OOD score"),
    ({"scores": ("msp",), "score_kwargs": {"msp": {"tau": 1}}}, TypeError, "tau"),
    ({"scores": ("msp",), "score_kwargs": {"energy": {}}}, ValueError, "not requested"),
    ({"convention": "x"}, ValueError, "convention"),
    ({"scores": "msp"}, ValueError, "sequence"),
])
def test_bad_arguments(kw, err, msg):
    model, fit, id_l, oods, _ = _setup()
    with pytest.raises(err, match=msg):
        evaluate_ood(model, fit, id_l, oods, **kw)


def test_bad_loaders():
    model, fit, id_l, oods, _ = _setup()
    with pytest.raises(ValueError, match="ood_loaders"):
        evaluate_ood(model, fit, id_l, {})
    with pytest.raises(ValueError, match="no samples"):
        evaluate_ood(model, fit, id_l, {"empty": []})
    with pytest.raises(ValueError, match="no samples"):
        evaluate_ood(model, fit, [], oods)


def test_markdown_needs_convention():
    with pytest.raises(ValueError, match="convention"):
        markdown_table({"msp": {}}, None)


class _PerSetProtocol(OODScore):
    """A score with its own per-OOD-set protocol, known to the evaluator only through the interface."""

    def __init__(self, offset: float = 1.0):
        self.offset = offset

    def score(self, model, loader):
        return torch.cat([model(x).detach().amax(1).double() for x, _ in loader])

    def evaluate(self, model, id_loader, ood_loaders):
        base = self.score(model, id_loader)
        return {k: (base + i * self.offset, self.score(model, v)) for i, (k, v) in enumerate(ood_loaders.items())}

    def result_note(self):
        return "per-set protocol"

    def info(self):
        return {"offset": self.offset, "custom": True}


def test_evaluator_uses_only_the_score_interface():
    register_score("_per_set_test")(_PerSetProtocol)
    try:
        model, fit, id_l, oods, _ = _setup()
        out = evaluate_ood(model, fit, id_l, oods, scores=("_per_set_test",))
        raw = out["scores"]["_per_set_test"]
        np.testing.assert_allclose(raw["far"]["id"] - raw["noise"]["id"], 1.0)
        assert out["results"]["_per_set_test"]["far"]["protocol"] == "per-set protocol"
        assert out["info"]["_per_set_test"] == {"offset": 1.0, "custom": True}
    finally:
        SCORES._entries.pop("_per_set_test")


def test_memoised_knows_a_tensor_by_its_data_and_version():
    """A detached view of the same data is the same source; an in-place change, another key or no memo
    recomputes."""
    import torch

    from ood import create_score

    s = create_score("msp")
    s.pass_memo = {}
    t, calls = torch.ones(3), []

    def compute():
        calls.append(1)
        return len(calls)

    assert s.memoised("k", t, compute) == 1
    assert s.memoised("k", t.detach(), compute) == 1
    t.add_(1)
    assert s.memoised("k", t, compute) == 2
    assert s.memoised("k2", t, compute) == 3
    s.pass_memo = None
    assert s.memoised("k", t, compute) == 4
    assert "pass_memo" not in s.info() and "pass_memo" not in repr(s)
