"""The loss x OOD-score benchmark: train every (loss, seed), evaluate every score on every OOD set, rank.

``python bench.py -c configs/bench_digits.yaml [--seeds 0,1 --epochs 2 --losses ce,wcdas ...]``

A benchmark config (YAML) holds a ``train`` section -- any ``train.py`` option (keys = option
dests), the recipe shared by every cell -- and the benchmark's own keys (:data:`schema.BENCH_KEYS`):
``losses`` (names or ``all`` = :func:`lossbench.list_losses`), ``seeds``, ``ood_sets``, ``scores``,
``score_args``, ``convention``, ``output``, ... Each loss's hyper-parameters are the ``loss_args``
of ``<loss_configs>/<loss>.yaml`` (default: the folder of the benchmark config, i.e. ``configs/``),
overridden by the benchmark's ``loss_args: {loss: {...}}``; everything else is the same for every
loss, so the comparison is of the losses alone. An OOD set name may say ``{data_root}``, which is
replaced by the ``train.data_root`` in force (e.g. ``imagefolder:{data_root}/notMNIST``).

For each cell (loss, seed) the run folder is ``<output>/runs/<loss>-s<seed>`` (:mod:`.cells`):
training through the framework's :class:`~lossbench.framework.trainer.Trainer` (resumed from its
``last.pt`` when half-trained; stdout in ``train.log``); then one evaluation of the reloaded model
(:func:`~lossbench.experiments.evaluate_run.evaluate_model`: accuracy, ECE, P@1 / MAP@R of the
penultimate test features, every OOD score) written as ``metrics.json``, ``results.md``, plots and
``scores.npz``; ``cell.json`` last, the completion marker. A finished cell whose marker matches the
evaluation settings is skipped; one trained with a different configuration is an error.

Then the leaderboard (:mod:`.runner`, :mod:`.tables`, :mod:`.plots`): ``leaderboard.md`` /
``leaderboard.csv`` (mean ± sample std over seeds), ``leaderboard_compact.md`` and its LaTeX twin
``leaderboard.tex``, ``leaderboard_seeds.csv`` (one row per loss and seed), ``acc_vs_auroc.png`` and ``roc_best.png``.
Every file is written atomically.
"""

from .aggregate import cell_values, collect, failures, mean_std, set_label, summarize
from .cells import cell_dir, cell_state, evaluate_cell, load_scores, run_cell, save_scores
from .cli import build_parser_bench, main, overrides_from
from .runner import run_benchmark, write_leaderboard
from .schema import BENCH_KEYS, PER_CELL_KEYS, BenchConfig, cell_args, eval_settings, load_config, resolve_config
from .tables import latex_escape, leaderboard_csv, leaderboard_latex, leaderboard_markdown, leaderboard_seeds_csv

__all__ = [
    "BENCH_KEYS", "PER_CELL_KEYS", "BenchConfig", "cell_args", "eval_settings", "load_config", "resolve_config",
    "cell_dir", "cell_state", "evaluate_cell", "load_scores", "run_cell", "save_scores",
    "cell_values", "collect", "failures", "mean_std", "set_label", "summarize",
    "latex_escape", "leaderboard_csv", "leaderboard_latex", "leaderboard_markdown", "leaderboard_seeds_csv", "run_benchmark", "write_leaderboard",
    "build_parser_bench", "main", "overrides_from",
]
