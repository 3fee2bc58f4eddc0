"""``bench/ood.py --part model``: one row per score that runs the model, timed through its own fit / score."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ood import list_scores
from ood.registry import get_score_class

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench_ood(monkeypatch):
    """The script as a module (``bench/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_ood", ROOT / "bench" / "ood.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script edits sys.path on import
    spec.loader.exec_module(module)
    return module


def rows(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| score"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


@pytest.mark.slow  # about 40 CPU seconds: every model score fits and scores a small network
# (64 px: RankFeat refuses the 1 x 1 stage maps of smaller inputs)
def test_model_table_times_every_model_score(bench_ood, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ood.py", "--part", "model", "--classes", "4", "--model-n", "40",
                                      "--model-val", "16", "--model-queries", "8", "--model-size", "64",
                                      "--model-batch", "16"])
    bench_ood.main()
    out = capsys.readouterr().out
    table = rows(out)
    expected = [n for n in list_scores() if get_score_class(n).needs == "model"]
    assert {"odin", "iodin", "adascale_a", "adascale_l", "rankfeat", "gram", "nac", "mahalanobis"} <= set(expected)
    assert sorted(table) == sorted(expected)
    for name, cells in table.items():
        assert not cells[1].startswith("skipped"), cells
        fit, score, qps = float(cells[2]), float(cells[3]), float(cells[4].replace(",", ""))
        assert fit >= 0 and score > 0 and qps > 0
    # the pixel-step scores get an input std (not printed), ODIN's settings are its own
    assert table["odin"][1] == "temperature=1000.0, eps=0.0014"
    assert "resnet10t" in out and "40 training + 16 validation images (64 px" in out
