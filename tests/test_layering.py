"""The three layers import one way: libraries <- training framework <- experiments.

Every ``import`` statement of every module (module level and inside functions) is read with ``ast``
and resolved to an absolute module name, so a lazy import cannot hide a wrong-way dependency.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK, EXPERIMENTS = "lossbench.framework", "lossbench.experiments"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)  # 'from pkg import submodule'


def _layer(module: str) -> str:
    if module == EXPERIMENTS or module.startswith(EXPERIMENTS + "."):
        return "experiments"
    if module == FRAMEWORK or module.startswith(FRAMEWORK + "."):
        return "framework"
    if module.split(".")[0] in ("lossbench", "ood"):
        return "library"
    return "external"


MODULES = sorted(p for pkg in ("lossbench", "ood") for p in (ROOT / pkg).rglob("*.py"))
ALLOWED = {"library": {"library"}, "framework": {"library", "framework"},
           "experiments": {"library", "framework", "experiments"}}
LIBRARY_FORBIDDEN_EXTERNAL = ("timm", "torchvision")
#: Library modules allowed a lazy (in-function) import of a forbidden package: ood.adapter traces models
#: with torchvision's feature extraction only when a model without the feature interface is adapted
#: (test_library_imports_without_timm_or_torchvision checks that ``import ood`` still loads neither).
LAZY_EXTERNAL = {"ood.adapter": ("torchvision",)}


def test_the_walk_sees_every_layer():
    layers = {_layer(_module_name(p)) for p in MODULES}
    assert layers == {"library", "framework", "experiments"}
    assert len(MODULES) > 40


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    me = _layer(_module_name(path))
    wrong = []
    for mod in _imports(path):
        other = _layer(mod)
        if other == "external":
            if (me == "library" and mod.split(".")[0] in LIBRARY_FORBIDDEN_EXTERNAL
                    and mod.split(".")[0] not in LAZY_EXTERNAL.get(_module_name(path), ())):
                wrong.append(mod)
        elif other not in ALLOWED[me]:
            wrong.append(mod)
    assert not wrong, f"{_module_name(path)} ({me}) imports {sorted(set(wrong))}"


def test_a_wrong_way_import_is_caught(tmp_path):
    """The check itself can fail: a library module importing the trainer is reported."""
    bad = ROOT / "ood" / "_layering_probe.py"
    bad.write_text("def f():\n    from lossbench.framework.trainer import Trainer\n")
    try:
        with pytest.raises(AssertionError, match="lossbench.framework.trainer"):
            test_imports_run_one_way(bad)
    finally:
        bad.unlink()


def test_importing_the_libraries_loads_neither_timm_nor_the_trainer():
    code = ("import sys, lossbench, ood\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision') or "
            "m.startswith(('lossbench.framework', 'lossbench.experiments'))]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
