"""The loss x OOD-score benchmark (lossbench.experiments.benchmark, ``bench.py``): config, embedding metrics,
leaderboard statistics, and the default digits benchmark end to end with resume and skipping."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lossbench.framework.config import ConfigError
from lossbench.framework.checkpoint import CheckpointError
from lossbench.experiments.benchmark import (
    cell_args, cell_state, leaderboard_csv, leaderboard_markdown, load_config,
    mean_std, resolve_config, run_benchmark, set_label, summarize,
)
from lossbench.experiments.embedding import embedding_quality
from ood import list_scores

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "bench_digits.yaml"
FASHION = ROOT / "configs" / "bench_fashionmnist.yaml"


# -- embedding quality against a naive float64 formula --------------------------------------------

def naive_retrieval(features, labels, distance):
    """P@1 and MAP@R written from Musgrave et al. 2020, Sec. 3.2, query excluded from its neighbours."""
    f = features.double()
    if distance == "cosine":
        fn = f / f.norm(dim=1, keepdim=True)
        sim = fn @ fn.T
    else:
        sim = -torch.cdist(f, f)
    sim.fill_diagonal_(-math.inf)
    order = sim.argsort(dim=1, descending=True)[:, :-1]  # the query itself is last
    p1, ap = [], []
    for i in range(f.shape[0]):
        rel = (labels[order[i]] == labels[i]).double()
        r = int((labels == labels[i]).sum()) - 1
        p1.append(float(rel[0]))
        hits = rel[:r]
        prec = hits.cumsum(0) / torch.arange(1, r + 1, dtype=torch.float64)
        ap.append(float((prec * hits).sum() / r))
    return float(np.mean(p1)), float(np.mean(ap))


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("n,d,c", [(40, 3, 4), (90, 8, 6)])
def test_embedding_quality_matches_naive_formula(distance, n, d, c):
    g = torch.Generator().manual_seed(n + d)
    labels = torch.arange(n) % c
    centres = torch.randn(c, d, generator=g)
    feats = centres[labels] + 0.9 * torch.randn(n, d, generator=g)
    got = embedding_quality(feats, labels, distance=distance, batch_size=17)
    p1, mapr = naive_retrieval(feats, labels, distance)
    torch.testing.assert_close(torch.tensor([got["p_at_1"], got["map_at_r"]], dtype=torch.float64),
                               torch.tensor([p1, mapr], dtype=torch.float64), atol=1e-6, rtol=0)
    assert 0 < got["map_at_r"] < 1  # neither trivial nor saturated: the test can fail


def test_embedding_quality_separated_classes_are_perfect():
    labels = torch.arange(30) % 3
    feats = torch.eye(3)[labels] * 5 + 0.01 * torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    assert embedding_quality(feats, labels) == {"p_at_1": 1.0, "map_at_r": 1.0}


def test_embedding_quality_bad_input():
    f = torch.randn(10, 4)
    with pytest.raises(TypeError, match="labels"):
        embedding_quality(f, torch.zeros(10))
    with pytest.raises(ValueError, match="labels"):
        embedding_quality(f, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="features"):
        embedding_quality(f.masked_fill(f > 1, math.nan), torch.arange(10) % 2)
    with pytest.raises(ValueError, match="distance"):
        embedding_quality(f, torch.arange(10) % 2, distance="manhattan")
    with pytest.raises(ValueError, match="single sample"):
        embedding_quality(f, torch.arange(10))


# -- leaderboard statistics -----------------------------------------------------------------------

def _metrics(acc, auroc_a, auroc_b):
    res = {"a": {"auroc": auroc_a, "fpr95": 1 - auroc_a}, "b": {"auroc": auroc_b, "fpr95": 1 - auroc_b}}
    return {"test": {"acc": acc, "ece": 0.1}, "embedding": {"p_at_1": acc, "map_at_r": acc / 2},
            "ood": {"results": {"msp": res}}}


def test_summary_is_mean_and_sample_std_over_seeds():
    cells = {"ce": {0: _metrics(0.9, 0.8, 0.6), 1: _metrics(0.8, 0.7, 0.7), 2: _metrics(0.7, 0.9, 0.5)},
             "svm_l2": {0: _metrics(0.95, 0.6, 0.6)}}
    rows = summarize(cells)
    m, s = rows["ce"]["stats"]["acc"]
    assert m == pytest.approx(np.mean([0.9, 0.8, 0.7])) and s == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
    per_seed = [np.mean([0.8, 0.6]), np.mean([0.7, 0.7]), np.mean([0.9, 0.5])]  # mean over OOD sets first
    assert rows["ce"]["stats"]["msp/auroc"] == pytest.approx((np.mean(per_seed), np.std(per_seed, ddof=1)))
    assert rows["ce"]["stats"]["msp/b/auroc"][0] == pytest.approx(0.6)
    assert rows["svm_l2"]["n"] == 1 and math.isnan(rows["svm_l2"]["stats"]["acc"][1])
    md = leaderboard_markdown(rows, ["msp"], ["a", "b"], "paper")
    main_table, per_set_table = md.split("AUROC (%) per OOD set")
    table = [l for l in main_table.splitlines() if l.startswith("| ") and not l.startswith("| loss")]
    assert [l.split("|")[1].strip() for l in table] == ["ce", "svm_l2"]
    assert "| ce | 80.0 ± 10.0 | 60.0 ± 10.0 |" in per_set_table  # msp on set a, on set b
    assert "80.0 ± 10.0" in table[0] and "**95.0**" in table[1]  # acc; best mean in bold
    assert "convention `paper`" in md and "ID positive" in md
    rows_csv = list(csv.DictReader(leaderboard_csv(rows).splitlines()))
    assert float(rows_csv[0]["msp_b_auroc_mean"]) == pytest.approx(0.6) and rows_csv[1]["acc_std"] == ""
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_set_label():
    assert set_label("imagefolder:../data/notMNIST/") == "notMNIST" and set_label("gaussian") == "gaussian"
    assert set_label("imagefolder:../data/tinyimagenet/test") == "tinyimagenet/test"


# -- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("data,match", [
    ({"lossses": ["ce"]}, "lossses"),
    ({"losses": ["ce", "no_such_loss"]}, "no_such_loss"),
    ({"scores": ["msp", "no_such_score"]}, "no_such_score"),
    ({"train": {"loss": "ce"}}, "set per cell"),
    ({"train": {"seed": 3}}, "set per cell"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"seeds": ["a"]}, "seeds"),
    ({"convention": "mine"}, "convention"),
    ({"score_args": {"odin": {"temperature": 10}}, "scores": ["msp"]}, "odin"),
    ({"loss_args": {"wcdas": {"g_init": 1}}, "losses": ["ce"]}, "wcdas"),
])
def test_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(data)


def test_unknown_train_option_and_loss_args_come_from_loss_configs(tmp_path):
    cfg = load_config(str(DIGITS), {"train": {"epochs": 1}, "losses": ["wcdas", "ce"],
                                    "loss_args": {"ce": {"label_smoothing": 0.1}}})
    assert cfg.losses == ["wcdas", "ce"] and cfg.train["epochs"] == 1
    args = cell_args(cfg, "wcdas", 3)
    assert args.loss_args["g_init"] == 0.0 and args.seed == 3 and args.name == "wcdas-s3"  # configs/wcdas.yaml
    assert cell_args(cfg, "ce", 0).loss_args["label_smoothing"] == 0.1  # the benchmark's override wins
    bad = load_config(str(DIGITS), {"train": {"learnig_rate": 0.1}})
    with pytest.raises(ConfigError, match="learnig_rate"):
        cell_args(bad, "ce", 0)


def test_command_line_grid_narrows_the_files_per_name_arguments(tmp_path):
    """``bench.py --losses focal`` on a config with ce's loss_args runs focal; the file is still checked."""
    path = tmp_path / "bench.yaml"
    path.write_text("losses: [ce, focal]\nloss_args:\n  ce: {label_smoothing: 0.2}\n"
                    "scores: [msp, odin]\nscore_args:\n  odin: {temperature: 10}\n")
    cfg = load_config(str(path), {"losses": ["focal"], "scores": ["msp"]})
    assert cfg.losses == ["focal"] and cfg.loss_args == {} and cfg.score_args == {}
    kept = load_config(str(path), {"losses": ["ce"]})
    assert kept.loss_args == {"ce": {"label_smoothing": 0.2}} and kept.score_args == {"odin": {"temperature": 10}}
    with pytest.raises(ConfigError, match="no_such_loss"):  # a wrong name on the command line still fails
        load_config(str(path), {"losses": ["no_such_loss"]})
    path.write_text("losses: [ce]\nloss_args:\n  focal: {gamma: 2}\n")  # a file naming a loss it leaves out
    with pytest.raises(ConfigError, match="not benchmarked"):
        load_config(str(path), {"losses": ["focal"]})
    path.write_text("losses: [ce, focal]\nloss_args:\n  ce: {label_smoothing: 0.2, reduction: mean}\n")
    merged = load_config(str(path), {"loss_args": {"ce": {"label_smoothing": 0.0}, "focal": {"gamma": 3}}})
    assert merged.loss_args == {"ce": {"label_smoothing": 0.0, "reduction": "mean"}, "focal": {"gamma": 3}}
    with pytest.raises(ConfigError, match="loss_args"):
        load_config(str(path), {"loss_args": {"ce": 0.1}})


def test_bench_cli_loss_and_score_args_reach_the_config():
    from lossbench.experiments.benchmark.cli import build_parser_bench, overrides_from

    ns = build_parser_bench().parse_args(["-c", "x.yaml", "--loss-args", '{"ce": {"label_smoothing": 0}}',
                                          "--score-args", '{"odin": {"temperature": 10}}'])
    out = overrides_from(ns)
    assert out["loss_args"] == {"ce": {"label_smoothing": 0}} and out["score_args"] == {"odin": {"temperature": 10}}


def test_all_losses_is_the_registry():
    import lossbench

    assert resolve_config({"losses": "all"}).losses == lossbench.list_losses()


# -- end to end -----------------------------------------------------------------------------------

def _bench(args, check=True):
    out = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"bench.py {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.mark.slow
def test_default_benchmark_end_to_end_resumes_and_skips(tmp_path, capsys):
    """``bench.py``'s entry point in-process (the script's dispatch is tested below)."""
    from lossbench.experiments.benchmark import main

    out_dir = tmp_path / "bench"
    flags = ["-c", str(DIGITS), "--losses", "ce,svm_l2", "--seeds", "0,1", "--epochs", "2", "--out", str(out_dir),
             "--no-progress"]
    # an interrupted benchmark: cell (ce, 0) stopped after 1 of its 2 epochs
    from lossbench.framework.trainer import Trainer

    cfg = load_config(str(DIGITS), {"losses": ["ce", "svm_l2"], "seeds": [0, 1], "output": str(out_dir),
                                    "train": {"epochs": 2}})
    args = cell_args(cfg, "ce", 0)
    args.stop_after_epochs = 1
    Trainer(args).fit()
    assert cell_state(cfg, cell_args(cfg, "ce", 0)) == ("partial", 1)

    assert main(flags) == 0
    assert "trained 3, resumed 1, evaluated 0, skipped 0" in capsys.readouterr().out
    md = (out_dir / "leaderboard.md").read_text()
    rows = [l for l in md.split("AUROC (%) per OOD set")[0].splitlines()
            if l.startswith("| ") and not l.startswith("| loss")]
    assert [r.split("|")[1].strip() for r in rows] == ["ce", "svm_l2"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[1] == "2" and all("±" in c for c in cells[2:]), r
    for score in ("msp", "energy", "maxlogit", "mahalanobis", "odin"):
        assert f"{score} AUROC" in md and f"{score} FPR@95" in md
    assert "convention `paper`" in md
    table = list(csv.DictReader((out_dir / "leaderboard.csv").read_text().splitlines()))
    assert [r["loss"] for r in table] == ["ce", "svm_l2"]
    assert {"acc_mean", "ece_std", "p_at_1_mean", "map_at_r_std", "energy_heldout_auroc_mean",
            "mahalanobis_uniform_fpr95_std"} <= set(table[0])
    per_seed = list(csv.DictReader((out_dir / "leaderboard_seeds.csv").read_text().splitlines()))
    assert [(r["loss"], r["seed"]) for r in per_seed] == [("ce", "0"), ("ce", "1"), ("svm_l2", "0"), ("svm_l2", "1")]
    assert np.mean([float(r["acc"]) for r in per_seed[:2]]) == pytest.approx(float(table[0]["acc_mean"]), abs=1e-6)
    assert r"svm\_l2 & " in (out_dir / "leaderboard.tex").read_text()
    for png in ("acc_vs_auroc.png", "roc_best.png"):
        assert (out_dir / png).stat().st_size > 1000
    runs = out_dir / "runs"
    for loss in ("ce", "svm_l2"):
        for seed in (0, 1):
            cell = runs / f"{loss}-s{seed}"
            m = json.loads((cell / "metrics.json").read_text())
            assert m["epoch"] == 2 and m["cell"] == {"loss": loss, "seed": seed}
            assert 0 <= m["embedding"]["p_at_1"] <= 1 and m["embedding"]["n"] == m["test"]["n"]
            assert set(m["ood"]["results"]["msp"]) == {"heldout", "gaussian", "uniform"}
            assert json.loads((cell / "cell.json").read_text())["epoch"] == 2
    # the resumed cell has the same log as an uninterrupted two-epoch run would: two epochs, once each
    assert len((runs / "ce-s0" / "log.csv").read_text().strip().splitlines()) == 3
    mean_acc = float(table[0]["acc_mean"])
    # 2 epochs: the features already retrieve their class far above chance (1/6), even where the
    # eval-mode accuracy still lags behind (BatchNorm running statistics after 22 steps)
    assert float(table[0]["p_at_1_mean"]) > 0.5

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/*") if p.suffix in (".pt", ".json", ".npz")}
    again = run_benchmark(load_config(str(DIGITS), {"losses": ["ce", "svm_l2"], "seeds": [0, 1],
                                                   "output": str(out_dir), "train": {"epochs": 2}}),
                          progress=False, plots=False)
    assert again["counts"] == {"trained": 0, "resumed": 0, "evaluated": 0, "skipped": 4, "failed": 0}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained nor re-evaluated
    assert again["rows"]["ce"]["stats"]["acc"][0] == pytest.approx(mean_acc, abs=1e-6)

    # a run narrowed to one cell writes its own grid's leaderboard; --leaderboard-only rewrites the
    # whole grid's from the finished cells, naming those not finished, and touches no cell
    capsys.readouterr()
    assert main(flags + ["--losses", "ce", "--seeds", "0", "--no-plots"]) == 0
    assert [r["loss"] for r in csv.DictReader((out_dir / "leaderboard.csv").read_text().splitlines())] == ["ce"]
    capsys.readouterr()
    assert main(flags + ["--seeds", "0,1,2", "--leaderboard-only", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "4 finished cell(s)" in printed and "not finished: ce-s2, svm_l2-s2" in printed
    board = list(csv.DictReader((out_dir / "leaderboard.csv").read_text().splitlines()))
    assert [r["loss"] for r in board] == ["ce", "svm_l2"] and float(board[0]["acc_mean"]) == pytest.approx(mean_acc)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not (runs / "ce-s2").exists()

    # other evaluation settings: re-evaluated, not retrained
    assert main(flags + ["--scores", "msp,energy", "--no-plots"]) == 0
    assert "trained 0, resumed 0, evaluated 4, skipped 0" in capsys.readouterr().out
    assert all((runs / c / "last.pt").stat().st_mtime_ns == stamps[runs / c / "last.pt"]
               for c in ("ce-s0", "ce-s1", "svm_l2-s0", "svm_l2-s1"))
    assert "mahalanobis" not in (out_dir / "leaderboard.md").read_text()

    # a cell trained with another recipe is never silently reused
    with pytest.raises(CheckpointError, match="lr"):
        run_benchmark(load_config(str(DIGITS), {"losses": ["ce"], "seeds": [0], "output": str(out_dir),
                                                "train": {"epochs": 2, "lr": 0.01}}), progress=False)


def test_diverged_cell_is_recorded_and_skipped(tmp_path, monkeypatch):
    from lossbench.framework.trainer import Trainer

    calls = []

    def diverge(self):
        calls.append(self.args.name)
        raise FloatingPointError("training loss became nan at step 3")

    monkeypatch.setattr(Trainer, "fit", diverge)
    cfg = load_config(str(DIGITS), {"losses": ["zloss"], "seeds": [0], "output": str(tmp_path), "train": {"epochs": 1}})
    res = run_benchmark(cfg, progress=False)
    assert res["counts"]["failed"] == 1 and calls == ["zloss-s0"]
    assert "zloss seed 0 (training loss became nan at step 3)" in (tmp_path / "leaderboard.md").read_text()
    assert run_benchmark(cfg, progress=False)["counts"]["failed"] == 1 and calls == ["zloss-s0"]  # not retried


@pytest.mark.slow
def test_bench_script_reports_config_errors(tmp_path):
    res = _bench(["-c", str(DIGITS), "--losses", "ce,no_such_loss", "--out", str(tmp_path)], check=False)
    assert res.returncode == 2 and "no_such_loss" in res.stderr
    assert res.stderr.startswith("bench.py: error: ") and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.slow
def test_real_data_benchmark(shared_data, tmp_path):
    """Fashion-MNIST (a 600-image subset) against MNIST and notMNIST, through the real-data config."""
    out_dir = tmp_path / "fashion"
    _bench(["-c", str(FASHION), "--losses", "ce", "--seeds", "0", "--epochs", "2", "--max-train-samples", "600",
            "--scores", "msp,energy", "--ood", "mnist,imagefolder:{data_root}/notMNIST",
            "--data-root", str(shared_data), "--out", str(out_dir), "--no-progress", "--no-plots"])
    table = list(csv.DictReader((out_dir / "leaderboard.csv").read_text().splitlines()))
    assert len(table) == 1 and table[0]["loss"] == "ce" and table[0]["n_seeds"] == "1"
    m = json.loads((out_dir / "runs" / "ce-s0" / "metrics.json").read_text())
    assert m["test"]["n"] == 10000 and m["embedding"]["p_at_1"] > 0.3  # 10 classes: well above chance
    assert set(m["ood_sets"]) == {"mnist", f"imagefolder:{shared_data}/notMNIST"}
    assert "notMNIST" in (out_dir / "leaderboard.md").read_text()
    assert "notMNIST_auroc_mean" in " ".join(table[0])


@pytest.mark.parametrize("name", ["bench_digits", "bench_cifar10", "bench_fashionmnist", "bench_cifar10_cpu", "bench_cifar10_full"])
def test_shipped_configs_resolve(name):
    """Every benchmark config names known losses/scores/options and no machine path."""
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    for loss in cfg.losses:
        assert cell_args(cfg, loss, cfg.seeds[0]).loss == loss
    assert len(cfg.seeds) == 3 and {"msp", "energy", "maxlogit", "mahalanobis"} <= set(cfg.scores)
    paths = [cfg.train.get("data_root") or "", cfg.output] + [s.split(":", 1)[1] for s in cfg.ood_sets if ":" in s]
    assert not any(Path(p).is_absolute() for p in paths), paths  # relative to the project root


#: The recent scores (Mahalanobis++ / RMDS++, NCI, VRA, WeiPer, AdaSCALE-A/-L, i-ODIN, RankFeat, GRAM, NAC).
RECENT_SCORES = ("mds_norm", "rmds_norm", "nci", "vra", "weiper", "adascale_a", "adascale_l", "iodin", "rankfeat",
                 "gram", "nac")


@pytest.mark.parametrize("name", ["bench_cifar10", "bench_fashionmnist"])
def test_configs_with_a_score_list_run_the_recent_scores(name):
    """A config that lists its scores runs every recent score, or says in a comment why one is left out."""
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(str(path))
    comments = " ".join(line for line in path.read_text(encoding="utf-8").splitlines()
                        if line.lstrip().startswith("#")).lower()
    missing = [n for n in RECENT_SCORES if n not in cfg.scores]
    assert all(n in list_scores() for n in RECENT_SCORES)
    assert [n for n in missing if n not in comments] == [], f"{name}: {missing} neither run nor explained"


def test_resume_check_is_the_trainers_compile_is_run_control(tmp_path):
    """Regression: a cell trained with ``compile: true`` was refused on resume by the benchmark
    (which compared ``compile``) although the trainer accepts it; both now share one check."""
    from lossbench.framework.checkpoint import save_checkpoint
    from lossbench.framework.config import to_dict

    cfg = load_config(str(DIGITS), {"losses": ["ce"], "seeds": [0], "output": str(tmp_path),
                                    "train": {"epochs": 2, "compile": True}})
    args = cell_args(cfg, "ce", 0)
    saved = dict(to_dict(args), compile=False)
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "global_step": 5, "config": saved}
    save_checkpoint(str(tmp_path / "runs" / "ce-s0" / "last.pt"), state)
    assert cell_state(cfg, args) == ("partial", 1)  # compile differs: still resumable
    saved["lr"] = 0.5
    save_checkpoint(str(tmp_path / "runs" / "ce-s0" / "last.pt"), dict(state, config=saved))
    with pytest.raises(CheckpointError, match="lr"):
        cell_state(cfg, args)


def test_leaderboard_calibration_columns():
    def cell(ece, ece_ts, brier):
        m = _metrics(0.9, 0.8, 0.6)
        cal = {"adaptive_ece": ece * 0.9, "brier": brier, "nll": 0.5, "ece": ece}
        m["calibration"] = {"temperature": 1.5, "before": cal, "after": {"ece": ece_ts, "nll": 0.4}}
        m["test"]["ece"] = ece
        return m

    rows = summarize({"ce": {0: cell(0.10, 0.02, 0.3), 1: cell(0.20, 0.04, 0.4)},
                      "focal": {0: cell(0.05, 0.03, 0.25)}})
    assert rows["ce"]["stats"]["ece_ts"] == (pytest.approx(0.03), pytest.approx(np.std([0.02, 0.04], ddof=1)))
    md = leaderboard_markdown(rows, ["msp"], ["a", "b"], "paper")
    header = next(l for l in md.splitlines() if l.startswith("| loss |"))
    assert "| ECE | ECE after TS | adaptive ECE | Brier | NLL | P@1 | MAP@R |" in header
    ce_row = next(l for l in md.splitlines() if l.startswith("| ce |"))
    focal_row = next(l for l in md.splitlines() if l.startswith("| focal |"))
    assert "| 15.0 ± 7.1 | **3.0 ± 1.4** |" in ce_row  # ECE, ECE after TS (lower is better: best in bold)
    assert "| **5.0** |" in focal_row and "| **0.250** |" in focal_row  # best ECE; Brier as a plain number
    assert "| 0.350 ± 0.071 |" in ce_row
    # cells evaluated before the calibration block existed: the old columns only
    old = leaderboard_markdown(summarize({"ce": {0: _metrics(0.9, 0.8, 0.6)}}), ["msp"], ["a", "b"], "paper")
    old_header = next(l for l in old.splitlines() if l.startswith("| loss |"))
    assert "ECE after TS" not in old_header and "| ECE | P@1 |" in old_header


@pytest.mark.parametrize("extra, error, match", [
    ({"ood_sets": ["gaussian", "no_such_set"]}, ConfigError, "ood_sets: unknown OOD set name 'no_such_set'"),
    ({"ood_sets": ["gaussian"], "val_ood_set": "no_such_set"}, ConfigError, "val_ood_set: unknown OOD set name"),
    ({"ood_sets": ["gaussian", "imagefolder:{data_root}/missing"]}, FileNotFoundError, "missing"),
    ({"ood_sets": ["gaussian", "mnist"]}, FileNotFoundError, "'mnist' was not found"),
    ({"ood_sets": ["uniform"], "val_ood_set": "imagefolder:{data_root}/missing_val"}, FileNotFoundError, "missing_val"),
    ({"ood_sets": ["heldout"], "train": {"data": "mnist", "data_root": "{tmp}"}}, ValueError, "needs held-out classes"),
])
def test_every_ood_set_is_checked_before_any_cell_trains(tmp_path, monkeypatch, extra, error, match):
    """A bad OOD set name or a missing one is an error before the first cell's training, not after it."""
    from lossbench.errors import UserInputError
    from lossbench.framework.trainer import Trainer

    trained = []
    monkeypatch.setattr(Trainer, "fit", lambda self: trained.append(self.args.name))
    overrides = {"losses": ["ce"], "seeds": [0], "output": str(tmp_path / "out"),
                 "train": {"epochs": 1, "model": "test_resnet", "data_root": str(tmp_path)}, **extra}
    overrides["train"] = {k: str(v).replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
                          for k, v in overrides["train"].items()}
    with pytest.raises(error, match=match) as caught:
        run_benchmark(load_config(str(DIGITS), overrides), progress=False)
    assert isinstance(caught.value, UserInputError)  # bench.py prints it as one line, exit 2
    assert trained == [] and not (tmp_path / "out" / "runs").exists()


def test_leaderboard_failure_columns():
    def cell(aurc, augrc):
        m = _metrics(0.9, 0.8, 0.6)
        fm = {"aurc": aurc, "augrc": augrc, "eaurc": aurc / 2, "risk_at_coverage": 0.1, "coverage_at_risk": 0.5}
        m["failure"] = {"scores": {"msp": fm, "energy": dict(fm, aurc=0.5)}}
        return m

    rows = summarize({"ce": {0: cell(0.04, 0.02), 1: cell(0.06, 0.04)}, "focal": {0: cell(0.03, 0.025)}})
    assert rows["ce"]["stats"]["aurc"] == (pytest.approx(0.05), pytest.approx(np.std([0.04, 0.06], ddof=1)))
    assert rows["ce"]["stats"]["failure/energy/aurc"][0] == pytest.approx(0.5)
    md = leaderboard_markdown(rows, ["msp"], ["a", "b"], "paper")
    header = next(l for l in md.splitlines() if l.startswith("| loss |"))
    assert "| NLL |" not in header and "| MSP AURC | MSP AUGRC | P@1 |" in header
    ce_row = next(l for l in md.splitlines() if l.startswith("| ce |"))
    focal_row = next(l for l in md.splitlines() if l.startswith("| focal |"))
    assert "| 5.0 ± 1.4 | 3.0 ± 1.4 |" in ce_row
    assert "| **3.0** | **2.5** |" in focal_row and "risk-coverage curve" in md  # lower is better: bold
    rows_csv = list(csv.DictReader(leaderboard_csv(rows).splitlines()))
    assert float(rows_csv[0]["failure_msp_eaurc_mean"]) == pytest.approx(0.025)
    from lossbench.experiments.benchmark.tables import compact_markdown
    assert "| 5.0±1.4 / 3.0±1.4 |" in compact_markdown(rows, ["msp"])
    # cells evaluated before the failure block existed: no AURC columns
    old = leaderboard_markdown(summarize({"ce": {0: _metrics(0.9, 0.8, 0.6)}}), ["msp"], ["a", "b"], "paper")
    assert "AURC" not in next(l for l in old.splitlines() if l.startswith("| loss |"))


def test_leaderboard_tta_accuracy_column():
    """Cells of runs with test-time augmentation add 'acc with TTA' (mean ± std over seeds); others do not."""
    from lossbench.experiments.benchmark.tables import compact_markdown

    def cell(acc_tta):
        m = _metrics(0.9, 0.8, 0.6)
        m["test"].update(acc_tta=acc_tta, tta_level=2)
        return m

    rows = summarize({"ce": {0: cell(0.91), 1: cell(0.93)}, "focal": {0: cell(0.95)}})
    assert rows["ce"]["stats"]["acc_tta"] == (pytest.approx(0.92), pytest.approx(np.std([0.91, 0.93], ddof=1)))
    md = leaderboard_markdown(rows, ["msp"], ["a", "b"], "paper")
    header = next(l for l in md.splitlines() if l.startswith("| loss |"))
    assert "| acc | acc with TTA | ECE |" in header and "test-time augmentation" in md
    assert "| 92.0 ± 1.4 |" in next(l for l in md.splitlines() if l.startswith("| ce |"))
    assert "| **95.0** |" in next(l for l in md.splitlines() if l.startswith("| focal |"))
    assert float(list(csv.DictReader(leaderboard_csv(rows).splitlines()))[0]["acc_tta_mean"]) == pytest.approx(0.92)
    compact = compact_markdown(rows, ["msp"]).splitlines()
    assert compact[0].startswith("| loss | acc | acc with TTA |") and "| 92.0±1.4 |" in compact[2]
    plain = summarize({"ce": {0: _metrics(0.9, 0.8, 0.6)}})
    assert "TTA" not in leaderboard_markdown(plain, ["msp"], ["a", "b"], "paper")
    assert "TTA" not in compact_markdown(plain, ["msp"])


def test_leaderboard_seeds_csv_and_latex():
    """``leaderboard_seeds.csv``: one row per (loss, seed) holding that cell's own numbers, whose mean is
    the leaderboard's mean; ``leaderboard.tex``: the compact table as a booktabs tabular, special
    characters escaped."""
    from lossbench.experiments.benchmark import cell_values, latex_escape, leaderboard_latex, leaderboard_seeds_csv

    cells = {"ce": {0: _metrics(0.9, 0.8, 0.6), 1: _metrics(0.8, 0.7, 0.7), 2: _metrics(0.7, 0.9, 0.5)},
             "svm_l2": {3: _metrics(0.95, 0.6, 0.6), 1: _metrics(0.85, 0.65, 0.55)}}
    rows = summarize(cells)
    seeds = list(csv.DictReader(leaderboard_seeds_csv(rows).splitlines()))
    assert [(r["loss"], int(r["seed"])) for r in seeds] == [("ce", 0), ("ce", 1), ("ce", 2), ("svm_l2", 1),
                                                             ("svm_l2", 3)]
    board = {r["loss"]: r for r in csv.DictReader(leaderboard_csv(rows).splitlines())}
    for r in seeds:
        expected = cell_values(cells[r["loss"]][int(r["seed"])])
        assert {k.replace("/", "_"): v for k, v in expected.items()} == {
            k: float(v) for k, v in r.items() if k not in ("loss", "seed")}  # the cell's own numbers, exactly
    for loss in cells:
        mine = [r for r in seeds if r["loss"] == loss]
        for col in ("acc", "msp_auroc", "msp_b_fpr95", "p_at_1"):
            assert np.mean([float(r[col]) for r in mine]) == pytest.approx(float(board[loss][f"{col}_mean"]),
                                                                           abs=1e-6)
            assert np.std([float(r[col]) for r in mine], ddof=1) == pytest.approx(
                float(board[loss][f"{col}_std"]), abs=1e-6)

    tex = leaderboard_latex(rows, ["msp"])
    lines = tex.splitlines()
    assert lines[1] == r"\begin{tabular}{l" + "c" * 9 + "}" and lines[-1] == r"\end{tabular}"
    assert [r"\toprule", r"\midrule", r"\bottomrule"] == [l for l in lines if l in (r"\toprule", r"\midrule",
                                                                                    r"\bottomrule")]
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert [l.split(" & ")[0] for l in body] == ["ce", r"svm\_l2"]  # a row per loss, "_" escaped
    assert all(l.endswith(r" \\") and l.count(" & ") == 9 for l in body)
    assert r"80.0$\pm$10.0" in body[0] and r"& 60.0$\pm$0.0 / 40.0$\pm$0.0 \\" in body[1]  # acc; msp AUROC / FPR@95
    assert "±" not in tex and "→" not in tex and r"ECE $\to$ after TS" in lines[3]
    assert "MAP@R" in lines[3] and "_" not in tex.replace(r"\_", "")
    assert latex_escape("a_b 5% & {x} #1 $ ~^\\") == (r"a\_b 5\% \& \{x\} \#1 \$ \textasciitilde{}"
                                                       r"\textasciicircum{}\textbackslash{}")
