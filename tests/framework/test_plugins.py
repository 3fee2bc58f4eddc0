"""--plugin: a user's module registers a loss and a score, and train.py, eval.py and bench.py can name them."""

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lossbench.errors import UserInputError
from lossbench.framework import plugins
from lossbench.framework.cli import run_main
from lossbench.registry import LOSSES
from ood.registry import SCORES

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = textwrap.dedent('''
    """A plug-in as a user writes it: a loss on logits and a score on logits."""
    import torch
    import torch.nn.functional as F

    import lossbench
    import ood


    @lossbench.register_loss("plugin_smooth_ce")
    class SmoothCE(lossbench.LogitLoss):
        def __init__(self, smoothing: float = 0.1):
            super().__init__()
            self.smoothing = float(smoothing)

        def forward(self, logits, target):
            return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


    @ood.register_score("plugin_margin")
    class Margin(ood.LogitScore):
        """Top-1 minus top-2 logit: the public score_logits is the formula."""

        def score_logits(self, logits):
            top = logits.topk(2, dim=1).values
            return top[:, 0] - top[:, 1]
''')


@pytest.fixture
def clean_registries():
    """Each test's plug-ins are forgotten after it (the harness reads the registries: leave them as found)."""
    losses, scores, loaded = dict(LOSSES._entries), dict(SCORES._entries), dict(plugins._LOADED)
    modules = set(sys.modules)
    yield
    LOSSES._entries.clear()
    LOSSES._entries.update(losses)
    SCORES._entries.clear()
    SCORES._entries.update(scores)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith(("lossbench_plugin_", "my_plugin")):
            del sys.modules[name]


@pytest.fixture
def plugin_file(tmp_path, clean_registries) -> Path:
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    return path


def _main(script: str):
    spec = importlib.util.spec_from_file_location(script[:-3] + "_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TINY = ["--model", "test_resnet", "--img-size", "16", "--epochs", "1", "--batch-size", "32",
        "--max-train-samples", "64", "--warmup-epochs", "0", "--no-progress"]


def test_plugin_file_registers_once_and_public_score_logits_works(plugin_file):
    import lossbench
    import ood

    assert "plugin_smooth_ce" not in lossbench.list_losses()
    mod = plugins.load_plugin(str(plugin_file))
    assert plugins.load_plugin(str(plugin_file)) is mod  # imported once: no double registration
    assert "plugin_smooth_ce" in lossbench.list_losses() and "plugin_margin" in ood.list_scores()
    s = ood.create_score("plugin_margin").score_logits(torch.tensor([[3.0, 1.0, 0.5]]))
    assert s.dtype == torch.float64 and s.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="NaN"):  # the base class still checks the input
        ood.create_score("plugin_margin").score_logits(torch.tensor([[float("nan"), 1.0]]))


def test_plugin_module_name_from_the_current_folder(tmp_path, plugin_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    plugins.load_plugin("my_plugin")
    import lossbench

    assert "plugin_smooth_ce" in lossbench.list_losses()


@pytest.mark.parametrize("spec, match", [
    ("missing_dir/none.py", "--plugin 'missing_dir/none.py': no such file"),
    ("no_such_plugin_module", "--plugin 'no_such_plugin_module': no module of that name"),
    ("not a module", "neither a module name"),
])
def test_plugin_that_cannot_be_found_is_a_user_error(spec, match, clean_registries):
    with pytest.raises(UserInputError) as err:
        plugins.load_plugin(spec)
    assert match in str(err.value)


def test_a_plugins_own_import_error_is_not_hidden(tmp_path, clean_registries):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        plugins.load_plugin(str(bad))


def test_without_the_plugin_the_names_are_unknown(tmp_path, capsys, clean_registries):
    """Regression guard: the plug-in is what makes the names valid (train.py checks the loss name)."""
    assert run_main("train.py", _main("train.py"), TINY + ["--loss", "plugin_smooth_ce", "--output",
                                                           str(tmp_path)]) == 2
    assert "unknown loss name 'plugin_smooth_ce'" in capsys.readouterr().err


@pytest.mark.slow  # trains a tiny model, evaluates it, runs a one-cell benchmark (about 20 s)
def test_plugin_through_train_eval_and_bench(tmp_path, plugin_file, capsys):
    # train.py: the plug-in's loss, one tiny epoch on the digits
    argv = TINY + ["--loss", "plugin_smooth_ce", "--loss-args", '{"smoothing": 0.2}', "--plugin", str(plugin_file),
                   "--output", str(tmp_path), "--name", "p"]
    assert run_main("train.py", _main("train.py"), argv) == 0, capsys.readouterr().err
    run = tmp_path / "p"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["loss"] == "plugin_smooth_ce" and cfg["plugin"] == [str(plugin_file)]

    # eval.py: the plug-in's score on the run
    out = tmp_path / "ev"
    assert run_main("eval.py", _main("eval.py"), [
        "--run", str(run), "--plugin", str(plugin_file), "--scores", "plugin_margin,msp", "--ood", "gaussian",
        "--max-ood-samples", "40", "--no-progress", "--out", str(out), "--no-feature-cache"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["ood"]["results"]) == {"plugin_margin", "msp"}
    assert 0 <= metrics["ood"]["results"]["plugin_margin"]["gaussian"]["auroc"] <= 1

    # without the plug-in in a fresh registry, eval.py names the plug-in the run was trained with
    LOSSES._entries.pop("plugin_smooth_ce")
    SCORES._entries.pop("plugin_margin")
    plugins._LOADED.clear()
    capsys.readouterr()
    assert run_main("eval.py", _main("eval.py"), ["--run", str(run), "--scores", "msp", "--no-progress",
                                                  "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown loss name 'plugin_smooth_ce'" in err and f"--plugin {plugin_file}" in err

    # bench.py: a one-cell benchmark of the plug-in's loss and score
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(tmp_path / "bench"), "losses": ["plugin_smooth_ce"], "seeds": [0],
        "train": {"data": "digits", "img_size": 16, "model": "test_resnet", "epochs": 1, "batch_size": 32,
                  "max_train_samples": 64, "warmup_epochs": 0},
        "ood_sets": ["gaussian"], "scores": ["plugin_margin", "msp"], "max_ood_samples": 40, "n_noise": 40,
        "cell_plots": False}))
    capsys.readouterr()
    assert run_main("bench.py", _main("bench.py"), ["-c", str(config), "--plugin", str(plugin_file),
                                                    "--no-progress", "--no-plots"]) == 0, capsys.readouterr().err
    cell = tmp_path / "bench" / "runs" / "plugin_smooth_ce-s0"
    m = json.loads((cell / "metrics.json").read_text())
    assert set(m["ood"]["results"]) == {"plugin_margin", "msp"}
    assert m["config"]["plugin"] == [str(plugin_file)]
    assert "plugin_margin AUROC" in (tmp_path / "bench" / "leaderboard.md").read_text()
