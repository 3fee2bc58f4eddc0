"""Every Python block of the README and of the documentation's method pages runs unchanged (the names
it leaves to the reader are bound here), and their train / eval / bench commands, run in reading order
(the README, then the pages in the order of ``docs/index.md``), find and never overwrite each other's
folders. The guides' blocks are run by ``tests/test_guides.py``."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _toctree_pages():
    """The pages of ``docs/index.md``'s toctrees, in their order (``api/*`` and guides excluded)."""
    pages = []
    for tree in re.findall(r"```\{toctree\}\n(.*?)```", (DOCS / "index.md").read_text(), re.S):
        for line in tree.splitlines():
            line = line.strip()
            if line and not line.startswith(":") and not line.startswith(("api/", "guides/")):
                pages.append(DOCS / f"{line}.md")
    return pages


PAGES = [ROOT / "README.md"] + _toctree_pages()
BLOCKS = [(page.relative_to(ROOT).as_posix(), block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def _namespace():
    """What the snippets assume the reader has: data, a backbone, a model, loaders."""
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


def test_every_docs_page_is_in_the_index():
    """A page left out of ``docs/index.md`` would be built by nobody's reading order (and Sphinx warns)."""
    listed = set(_toctree_pages())
    for page in sorted(DOCS.glob("*.md")):
        assert page.name == "index.md" or page in listed, f"{page.name} is in no toctree of docs/index.md"


def test_the_readme_has_python_blocks():
    assert sum(name == "README.md" for name, _ in BLOCKS) >= 1 and len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index):
    name, block = BLOCKS[index]
    exec(compile(block, f"{name} python block", "exec"), _namespace())


def test_readme_links_resolve():
    """Every relative link of the README and the pages points at a file that exists (anchors aside)."""
    for page in PAGES + sorted((DOCS / "guides").glob("*.md")):
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


# ---- the shell commands, run in reading order ------------------------------------------------------
BASH_BLOCKS = [block for page in PAGES for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
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
    """``(script, argv)`` of every train.py / eval.py / bench.py command in the bash blocks, in reading
    order; ``make demo`` stands for its recipe. Comments, line continuations, environment assignments
    and launchers (``torchrun ...``) are taken away."""
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


def _bench_key(argv):
    """A bench.py command line without the flags that narrow or re-table the same grid."""
    narrowing, flags = {"--losses", "--seeds", "--scores"}, {"--leaderboard-only", "--no-plots"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in narrowing:
            skip = True
        elif a not in flags:
            out.append(a)
    return out


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_readme_commands_run_in_order_without_colliding(monkeypatch):
    """An ``eval.py --run`` folder is made by an earlier train command; a train command without
    ``--resume`` never lands in a folder an earlier one made (it would be refused); two different
    ``bench.py`` commands never share an output folder (the second would be refused)."""
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
                f"`{shown}` writes {folder}, which `{made.get(folder)}` already made"
            made.setdefault(folder, shown)
        elif script == "eval.py":
            if _flag(argv, "--run") is None:  # a model from elsewhere (--model / --weights): no run folder
                assert "--model" in argv, f"`{shown}` names neither --run nor --model"
                continue
            folder = os.path.normpath(_flag(argv, "--run"))
            assert folder in made, f"`{shown}` evaluates {folder}, which no earlier train command makes"
        else:
            config = yaml.safe_load(Path(_flag(argv, "-c")).read_text())
            folder = os.path.normpath(_flag(argv, "--out") or config["output"])
            # runs of one grid may be narrowed (--losses / --seeds / --scores) and re-tabled
            # (--leaderboard-only) into the same folder; anything else must match
            key = _bench_key(argv)
            assert benches.get(folder, key) == key, \
                f"`{shown}` writes {folder}, which a different bench command already made"
            benches[folder] = key
