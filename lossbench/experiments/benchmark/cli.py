"""``bench.py``: the benchmark's command line (a config file and the overrides a quick run needs)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional, Sequence

from ...framework.cli import list_type
from ...framework.plugins import add_plugin_option, preload_plugins
from .aggregate import collect
from .runner import run_benchmark, write_leaderboard
from .schema import load_config


def build_parser_bench() -> argparse.ArgumentParser:
    """Options of ``bench.py``: the config file and the overrides a quick run needs."""
    p = argparse.ArgumentParser(
        prog="bench.py", description="Train every (loss, seed), evaluate every OOD score on every "
        "OOD set, and write a leaderboard (finished cells are skipped when run again).")
    p.add_argument("-c", "--config", required=True, help="benchmark YAML (e.g. configs/bench_digits.yaml)")
    p.add_argument("--out", default=None, help="benchmark folder (config key 'output')")
    p.add_argument("--losses", type=list_type(str, "names"), default=None, help="comma-separated loss names, or 'all'")
    p.add_argument("--seeds", type=list_type(int, "seeds"), default=None, help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--scores", type=list_type(str, "names"), default=None, help="comma-separated OOD scores")
    p.add_argument("--ood", type=list_type(str, "names"), default=None, help="comma-separated OOD sets")
    p.add_argument("--epochs", type=float, default=None, help="train.epochs (may be fractional)")
    p.add_argument("--model", default=None, help="train.model (a timm name)")
    p.add_argument("--img-size", type=int, default=None, help="train.img_size")
    p.add_argument("--max-train-samples", type=int, default=None, help="train.max_train_samples")
    p.add_argument("--data-root", default=None, help="train.data_root (folder of the data set files)")
    p.add_argument("--device", default=None, help="train.device: auto | cpu | cuda | cuda:N")
    p.add_argument("--train-args", type=json.loads, default=None,
                   help='JSON object of further train.py options, e.g. \'{"batch_size": 128}\'')
    p.add_argument("--loss-args", type=json.loads, default=None,
                   help='JSON object {loss: {argument: value}} updating the config\'s loss_args, e.g. '
                        '\'{"ce": {"label_smoothing": 0}}\'')
    p.add_argument("--score-args", type=json.loads, default=None,
                   help="JSON object {score: {argument: value}} updating the config's score_args")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the leaderboard plots")
    p.add_argument("--leaderboard-only", action="store_true",
                   help="rewrite the leaderboard from the grid's finished cells; train and evaluate nothing "
                        "(e.g. the whole file's grid after runs narrowed with --losses / --seeds)")
    add_plugin_option(p)
    return p


def overrides_from(ns: argparse.Namespace) -> Dict[str, Any]:
    """Benchmark-config overrides from parsed ``bench.py`` options."""
    out: Dict[str, Any] = {}
    for flag, key in (("out", "output"), ("losses", "losses"), ("seeds", "seeds"), ("scores", "scores"),
                      ("ood", "ood_sets")):
        if getattr(ns, flag) is not None:
            out[key] = getattr(ns, flag)
    for key in ("loss_args", "score_args"):
        if getattr(ns, key) is not None:
            out[key] = getattr(ns, key)
    if out.get("losses") == ["all"]:
        out["losses"] = "all"
    train = dict(ns.train_args or {})
    for key in ("epochs", "model", "img_size", "max_train_samples", "data_root", "device"):
        if getattr(ns, key) is not None:
            train[key] = getattr(ns, key)
    if getattr(ns, "plugin", None):  # recorded in every cell's configuration (added to the config's own)
        train["plugin"] = list(ns.plugin)
    if train:
        out["train"] = train
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``bench.py`` entry point: run the benchmark and print the leaderboard."""
    preload_plugins(argv)  # before the config's loss and score names are checked
    ns = build_parser_bench().parse_args(argv)
    cfg = load_config(ns.config, overrides_from(ns))
    if ns.leaderboard_only:
        board = write_leaderboard(cfg, plots=not ns.no_plots)
        done = collect(cfg)
        missing = [f"{loss}-s{seed}" for loss in cfg.losses for seed in cfg.seeds if seed not in done.get(loss, {})]
        print(board["markdown"])
        print(f"leaderboard of {sum(map(len, done.values()))} finished cell(s) in {cfg.output}"
              + (f"; not finished: {', '.join(missing)}" if missing else ""))
        return 0
    res = run_benchmark(cfg, progress=not ns.no_progress, plots=not ns.no_plots)
    print(res["markdown"])
    c = res["counts"]
    print(f"cells: {len(res['cells'])} (trained {c['trained']}, resumed {c['resumed']}, evaluated {c['evaluated']}, "
          f"skipped {c['skipped']}, failed {c['failed']}) in {res['seconds']:.1f} s; "
          f"leaderboard in {cfg.output}")
    return 0
