"""OpenOOD's protocol through the framework: grouped OOD sets, the validation OOD set, the search, the
feature cache of a run, and how the leaderboard shows groups, skipped scores and chosen grid points."""

from pathlib import Path

import pytest
import torch

from lossbench.errors import UserInputError
from lossbench.experiments.benchmark import cell_args, load_config, resolve_config, summarize
from lossbench.experiments.benchmark.schema import eval_ood_sets, eval_settings, eval_val_ood
from lossbench.experiments.benchmark.tables import leaderboard_markdown
from lossbench.experiments.evaluate_run import evaluate_model, report_markdown, split_ood_sets
from lossbench.framework.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "bench_digits.yaml"
GROUPS = {"near": ["heldout"], "far": ["uniform"]}


def test_config_takes_groups_a_validation_set_and_search():
    cfg = resolve_config({"ood_sets": {"near": ["gaussian"], "far": ["uniform", "mnist"]}, "val_ood_set": "imagefolder:v", "search": True})
    assert cfg.ood_sets == ["gaussian", "uniform", "mnist"] and cfg.ood_groups == {"near": ["gaussian"], "far": ["uniform", "mnist"]}
    assert eval_ood_sets(cfg, None) == {"near": ["gaussian"], "far": ["uniform", "mnist"]} and eval_val_ood(cfg, None) == "imagefolder:v"
    s = eval_settings(cfg, None)
    assert s["ood_groups"] == cfg.ood_groups and s["val_ood_set"] == "imagefolder:v" and s["search"] is True
    cfg = resolve_config({"ood_sets": {"near": ["imagefolder:{data_root}/x"]}, "val_ood_set": "imagefolder:{data_root}/v"})
    assert eval_ood_sets(cfg, "R") == {"near": ["imagefolder:R/x"]} and eval_val_ood(cfg, "R") == "imagefolder:R/v"


def test_settings_of_a_flat_config_are_unchanged_so_finished_cells_stay_done():
    cfg = resolve_config({"ood_sets": ["heldout", "uniform"]})
    assert not {"ood_groups", "val_ood_set", "search"} & set(eval_settings(cfg, None))


@pytest.mark.parametrize("data,match", [
    ({"ood_sets": {"near": ["gaussian"]}, "val_ood_set": "gaussian"}, "also a test OOD set"),
    ({"ood_sets": ["gaussian"], "search": True}, "needs val_ood_set"),
    ({"ood_sets": {"near": ["gaussian"], "far": ["gaussian"]}}, "more than once"),
    ({"ood_sets": ["gaussian"], "val_ood_set": "imagefolder:v", "search": "yes"}, "true or false"),
    ({"ood_sets": {}}, "non-empty"),
    ({"ood_sets": {"near": []}}, "ood_sets.near"),
    ({"ood_sets": ["gaussian"], "val_ood_set": 3}, "val_ood_set"),
])
def test_protocol_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(data)


def test_split_ood_sets():
    assert split_ood_sets(["a", "b"], False) == (["a", "b"], None)
    assert split_ood_sets({"n": ["a"], "f": ["b"]}, False) == (["a", "b"], {"n": ["a"], "f": ["b"]})
    assert split_ood_sets(None, True)[0] == ["heldout", "gaussian", "uniform"]
    with pytest.raises(UserInputError, match="more than once"):
        split_ood_sets({"n": ["a"], "f": ["a"]}, False)
    with pytest.raises(UserInputError, match=r"ood_sets\['n'\]"):
        split_ood_sets({"n": "a"}, False)


def _cell(auroc_near, auroc_far, skipped=None, chosen=None):
    res = {"knn": {"tin": {"auroc": auroc_near, "fpr95": 0.5}, "mnist": {"auroc": auroc_far, "fpr95": 0.2}}}
    gm = {"knn": {"near": {"auroc": auroc_near, "fpr95": 0.5}, "far": {"auroc": auroc_far, "fpr95": 0.2}}}
    ood = {"results": res, "group_means": gm, "skipped": skipped or {}, "search": {}}
    if chosen is not None:
        ood["search"]["knn"] = {"chosen": chosen, "val_auroc": 0.9, "grid": []}
    return {"test": {"acc": 0.9, "ece": 0.1}, "embedding": {"p_at_1": 0.9, "map_at_r": 0.5}, "ood": ood}


def test_leaderboard_shows_groups_skipped_scores_and_chosen_points():
    rows = summarize({"ce": {0: _cell(0.8, 0.9, {"vim": "needs a linear classifier"}, {"k": 50}),
                             1: _cell(0.6, 0.7, {"vim": "needs a linear classifier"}, {"k": 100})}})
    assert rows["ce"]["stats"]["knn/group:near/auroc"][0] == pytest.approx(0.7)
    md = leaderboard_markdown(rows, ["knn", "vim"], ["tin", "mnist"], "openood", groups={"near": ["tin"],
                                                                                       "far": ["mnist"]})
    assert "| score | ce near | ce far |" in md
    knn = next(l for l in md.splitlines() if l.startswith("| knn |"))
    assert "**70.0 ± 14.1** / 50.0" in knn and "**80.0 ± 14.1** / 20.0" in knn
    vim = next(l for l in md.splitlines() if l.startswith("| vim |"))
    assert vim.count("skipped") == 2
    assert "- vim for ce: needs a linear classifier" in md
    assert "| knn | k=50 / k=100 |" in md
    assert "near = tin" in md and "far = mnist" in md
    from lossbench.experiments.benchmark.tables import compact_markdown
    compact = compact_markdown(rows, ["knn", "vim"])
    assert "| ce | 90.0±0.0 | 10.0±0.0 → - |" in compact and "| skipped |" in compact


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from lossbench.framework.builders import load_run
    from lossbench.framework.trainer import Trainer

    out = tmp_path_factory.mktemp("protocol")
    cfg = load_config(str(DIGITS), {"losses": ["ce"], "seeds": [0], "output": str(out), "train": {"epochs": 1}})
    args = cell_args(cfg, "ce", 0)
    Trainer(args).fit()
    return load_run(str(out / "runs" / "ce-s0" / "last.pt"), "cpu")


def test_evaluate_model_with_groups_search_and_a_cache_that_skips_the_second_pass(digits_run, tmp_path):
    model, _, bundle, _ = digits_run
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(1))
    kw = dict(ood_sets=GROUPS, scores=["msp", "react", "knn", "gen", "vim"], val_ood="gaussian", search=True,
              feature_cache_dir=str(tmp_path / "features"), batch_size=128)
    try:
        first = evaluate_model(model, bundle, **kw)
        n_first = len(calls)
        calls.clear()
        second = evaluate_model(model, bundle, **kw)
    finally:
        hook.remove()
    assert n_first > 0 and len(calls) == 0  # every pass (test, val, train, OOD sets) came from the cache
    assert first["ood"]["feature_passes"] == 6 and second["ood"]["feature_passes"] == 0
    assert second["test"] == first["test"] and second["ood"]["results"] == first["ood"]["results"]
    assert second["ood"]["search"] == first["ood"]["search"]
    ood = first["ood"]
    assert ood["groups"] == GROUPS and set(ood["group_means"]["msp"]) == {"near", "far"}
    assert ood["group_means"]["msp"]["near"]["auroc"] == ood["results"]["msp"]["heldout"]["auroc"]
    assert {"react", "knn", "gen"} <= set(ood["search"]) and first["val_ood"]["name"] == "gaussian"
    assert "gaussian" not in ood["results"]["msp"]  # the validation OOD set is not a test set
    md = report_markdown(first)
    assert "near mean" in md and "chosen by the grid search" in md
    # the failure block: four confidences of the same test predictions, MSP-TS at the calibration temperature
    fail = first["failure"]
    assert set(fail["scores"]) == {"msp", "energy", "maxlogit", "msp_ts"} and second["failure"]["scores"] == fail["scores"]
    assert fail["temperature"] == first["calibration"]["temperature"] and fail["n"] == first["test"]["n"]
    assert fail["error_rate"] == pytest.approx(1 - first["test"]["acc"]) and "Failure detection" in md
    assert set(first["calibration"]["calibrators"]) == {"vector", "matrix_odir", "histogram", "isotonic"}
    with pytest.raises(UserInputError, match="also a test OOD set"):
        evaluate_model(model, bundle, ood_sets=GROUPS, scores=["msp"], val_ood="uniform")
    with pytest.raises(UserInputError, match="needs val_ood"):
        evaluate_model(model, bundle, ood_sets=GROUPS, scores=["msp"], search=True)


def test_outputs_a_paper_can_use(digits_run, tmp_path):
    """Strict JSON (null for undefined numbers), relative paths, provenance, per-sample scores equal to the
    ones behind the metrics, and files that honour the umask."""
    import json
    import math
    import os
    import stat

    import numpy as np

    from lossbench.experiments.evaluate_run import load_scores, write_report
    from ood.metrics import ood_metrics

    model, _, bundle, _ = digits_run
    result = evaluate_model(model, bundle, ood_sets=["uniform"], scores=["msp", "energy"], batch_size=128)
    result["checkpoint"] = str(tmp_path / "run" / "best.pt")
    result["test"]["undefined"] = float("nan")
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        write_report(result, str(out), plots=False)
    finally:
        os.umask(old)
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    assert metrics["test"]["undefined"] is None and "NaN" not in text
    assert metrics["checkpoint"] == "best.pt" and not os.path.isabs(metrics["checkpoint"])
    prov = metrics["provenance"]
    assert prov["torch"] == torch.__version__ and prov["lossbench"] and prov["date"] and prov["device"] == "cpu"
    raw = load_scores(str(out / "scores.npz"))
    for score in ("msp", "energy"):
        pair = raw[score]["uniform"]
        again = ood_metrics(np.asarray(pair["id"]), np.asarray(pair["ood"]))
        assert math.isclose(again["auroc"], result["ood"]["results"][score]["uniform"]["auroc"])
        np.testing.assert_array_equal(pair["id"], np.asarray(result["ood"]["scores"][score]["uniform"]["id"], dtype=np.float64))
    for name in ("metrics.json", "results.md", "scores.npz"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o640, name  # 0666 & ~0027
