"""The code block of each guide in docs/guides runs: the plug-ins through train.py and eval.py, the
own-model command through eval.py (its placeholders replaced by a tiny model and the digits)."""

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from lossbench.framework import plugins
from lossbench.framework.cli import run_main
from lossbench.registry import LOSSES
from ood.registry import SCORES

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ROOT / "docs" / "guides"
TINY_EVAL = ["--max-train-samples", "120", "--max-ood-samples", "40", "--no-progress", "--no-feature-cache"]


def _block(guide: str):
    """(language, code) of the guide's one fenced code block."""
    blocks = re.findall(r"```(\w+)\n(.*?)```", (GUIDES / guide).read_text(), re.S)
    assert len(blocks) == 1, f"{guide}: expected exactly one code block, found {len(blocks)}"
    return blocks[0]


def _main(script: str):
    spec = importlib.util.spec_from_file_location(script[:-3] + "_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(autouse=True)
def clean_registries():
    """What a guide's plug-in registers is forgotten after the test (the harness reads the registries)."""
    losses, scores, loaded = dict(LOSSES._entries), dict(SCORES._entries), dict(plugins._LOADED)
    modules = set(sys.modules)
    yield
    for reg, saved in ((LOSSES, losses), (SCORES, scores)):
        reg._entries.clear()
        reg._entries.update(saved)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith("lossbench_plugin_"):
            del sys.modules[name]


def test_readme_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    for guide in sorted(GUIDES.glob("*.md")):
        assert f"docs/guides/{guide.name}" in readme, guide.name


def test_add_a_loss_guide(tmp_path, capsys):
    lang, code = _block("add_a_loss.md")
    assert lang == "python"
    path = tmp_path / "my_losses.py"
    path.write_text(code)
    (name,) = re.findall(r'register_loss\("(\w+)"', code)
    argv = ["--plugin", str(path), "--loss", name, "--loss-args", '{"epsilon": 2.0}', "--model", "test_resnet",
            "--img-size", "16", "--epochs", "1", "--batch-size", "32", "--max-train-samples", "64",
            "--warmup-epochs", "0", "--no-progress", "--output", str(tmp_path), "--name", "g"]
    assert run_main("train.py", _main("train.py"), argv) == 0, capsys.readouterr().err
    import lossbench

    loss = lossbench.create_loss(name, epsilon=1.0)
    logits, target = torch.randn(8, 5, dtype=torch.float64), torch.arange(8) % 5
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss(logits, target), (ce + 1 - torch.exp(-ce)).mean())  # Poly-1 as the guide says
    with pytest.raises(ValueError, match="empty"):
        loss(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


def test_add_a_score_guide(tmp_path, capsys):
    lang, code = _block("add_a_score.md")
    assert lang == "python"
    path = tmp_path / "my_scores.py"
    path.write_text(code)
    names = re.findall(r'register_score\("(\w+)"', code)
    assert len(names) == 2
    out = tmp_path / "out"
    argv = ["--plugin", str(path), "--model", "test_resnet", "--random-init", "--data", "digits", "--img-size", "16",
            "--scores", ",".join(names + ["msp"]), "--ood", "gaussian", "--out", str(out)] + TINY_EVAL
    assert run_main("eval.py", _main("eval.py"), argv) == 0, capsys.readouterr().err
    results = json.loads((out / "metrics.json").read_text())["ood"]["results"]
    assert set(results) == set(names) | {"msp"}
    assert all(0 <= results[n]["gaussian"]["auroc"] <= 1 for n in names)


def test_evaluate_your_own_model_guide(tmp_path, capsys):
    lang, code = _block("evaluate_your_own_model.md")
    assert lang == "bash"
    lines = [l for l in code.replace("\\\n", " ").splitlines() if l.strip() and not l.lstrip().startswith("#")]
    env = dict(l.split("=", 1) for l in lines if re.match(r"^[A-Z_]+=", l))
    assert set(env) == {"WEIGHTS", "MODEL", "DATA"}  # the marked placeholders
    weights = tmp_path / "weights.pth"
    torch.manual_seed(0)
    tvm = pytest.importorskip("torchvision.models")
    assert env["MODEL"] == "torchvision:resnet18"
    torch.save(tvm.resnet18(num_classes=6).state_dict(), weights)  # the digits' 6 classes
    env.update(WEIGHTS=str(weights), DATA="digits")
    (command,) = [l for l in lines if "eval.py" in l]
    for k, v in env.items():
        command = command.replace(f'"${k}"', shlex.quote(v))
    argv = shlex.split(command)
    argv = argv[argv.index("eval.py") + 1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    argv += ["--scores", "msp,energy,knn,vim", "--score-args", '{"vim": {"dim": 64}}'] + TINY_EVAL  # quick
    assert run_main("eval.py", _main("eval.py"), argv) == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(m["ood"]["results"]) == {"msp", "energy", "knn", "vim"} and m["model"]["input"]["size"] == 32
