"""Every Python block of the README runs unchanged (the names it leaves to the reader are bound here),
and its train / eval / bench commands, run in reading order, find and never overwrite each other's folders."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _namespace():
    """What the README's snippets assume the reader has: data, a backbone, a model, loaders."""
    from lossbench.framework.models import create_model

    g = torch.Generator().manual_seed(0)
    model = create_model("test_resnet", 6, "ce", {}, in_chans=1).eval()
    x = torch.randn(24, 1, 32, 32, generator=g)
    y = torch.arange(24) % 6

    def make_loader(inputs, labels):
        return DataLoader(TensorDataset(inputs, labels), batch_size=8)

    return {
        "logits": torch.randn(16, 100, generator=g), "target": torch.randint(0, 100, (16,), generator=g),
        "features": torch.randn(16, 32, generator=g), "weight": torch.randn(100, 32, generator=g),
        "bias": torch.randn(100, generator=g),
        "backbone": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 512)),
        "loader": make_loader(torch.randn(8, 4, generator=g), torch.randint(0, 100, (8,), generator=g)),
        "model": model, "train_loader": make_loader(x, y), "id_loader": make_loader(x[:12], y[:12]),
        "ood_loader": make_loader(torch.rand(12, 1, 32, 32, generator=g), torch.zeros(12, dtype=torch.long)),
    }


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), _namespace())


# ---- the README's shell commands, run in reading order -------------------------------------------
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
SCRIPTS = ("train.py", "eval.py", "bench.py")


def _make_recipe(target):
    """The commands of ``make <target>`` (its recipe lines in the Makefile, ``$(PY)`` read as python)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(shlex.split(line.strip().replace("$(PY)", "python")))
    return recipe


def readme_commands():
    """``(script, argv)`` of every train.py / eval.py / bench.py command in the README's bash blocks,
    in reading order; ``make demo`` stands for its recipe. Comments, line continuations, environment
    assignments and launchers (``torchrun ...``) are taken away."""
    out = []
    for block in BASH_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if not line:
                continue
            words = shlex.split(line)
            cmds = _make_recipe(words[1]) if words[0] == "make" and len(words) > 1 else [words]
            for cmd in cmds:
                at = next((i for i, w in enumerate(cmd) if w in SCRIPTS), None)  # not bench/train.py
                if at is not None:
                    out.append((cmd[at], cmd[at + 1:]))
    return out


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_readme_commands_run_in_order_without_colliding(monkeypatch):
    """An ``eval.py --run`` folder is made by an earlier README train command; a train command
    without ``--resume`` never lands in a folder an earlier one made (it would be refused); two
    different ``bench.py`` commands never share an output folder (the second would be refused)."""
    import os

    import yaml

    from lossbench.framework.config import parse_args

    monkeypatch.chdir(ROOT)
    made, benches = {}, {}
    commands = readme_commands()
    assert sum(s == "train.py" for s, _ in commands) >= 5 and sum(s == "eval.py" for s, _ in commands) >= 3
    for script, argv in commands:
        shown = " ".join([script] + argv)
        if script == "train.py":
            args = parse_args(argv)
            name = args.name or f"{args.data.split(':')[0]}-{args.model}-{args.loss}"  # the trainer's default
            folder = os.path.normpath(os.path.join(args.output, name))
            assert args.resume or folder not in made, \
                f"README: `{shown}` writes {folder}, which `{made.get(folder)}` already made"
            made.setdefault(folder, shown)
        elif script == "eval.py":
            folder = os.path.normpath(_flag(argv, "--run"))
            assert folder in made, f"README: `{shown}` evaluates {folder}, which no earlier README train command makes"
        else:
            config = yaml.safe_load(open(_flag(argv, "-c")))
            folder = os.path.normpath(_flag(argv, "--out") or config["output"])
            assert benches.get(folder, argv) == argv, \
                f"README: `{shown}` writes {folder}, which a different bench command already made"
            benches[folder] = argv
