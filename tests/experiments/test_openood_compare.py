"""``bench/openood_compare.py``: the near / far table against OpenOOD's leaderboard and the per-set table
(Tiny-ImageNet, MNIST, Textures) with its gaps and agreement count, on small fabricated leaderboards."""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path
from typing import Dict, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def compare():
    """The script as a module (``bench/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("openood_compare", ROOT / "bench" / "openood_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_leaderboard(folder: Path, rows: Dict[str, Dict[str, float]]) -> Path:
    """``leaderboard.csv`` with one row per loss (AUROCs as fractions, as the benchmark writes them)."""
    columns = sorted({k for r in rows.values() for k in r})
    with open(folder / "leaderboard.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["loss"] + columns)
        w.writeheader()
        for loss, values in rows.items():
            w.writerow({"loss": loss, **values})
    return folder


def per_set_cells(text: str, compare) -> Dict[Tuple[str, str], list]:
    """(OpenOOD set, score) -> the cells of its per-set table row."""
    headings = {heading: s for s, (_, heading) in compare.PER_SET_SETS.items()}
    cells, current = {}, None
    for line in text.splitlines():
        if line in headings:
            current = headings[line]
        elif current and line.startswith("| ") and not line.startswith("| score"):
            parts = [c.strip() for c in line.strip("|").split("|")]
            cells[(current, parts[0].split(" ")[0])] = parts
    return cells


def agreement(text: str, prefix: str) -> Tuple[int, int]:
    m = re.search(prefix + r": (\d+) of (\d+)", text)
    assert m, f"no line {prefix!r} in:\n{text}"
    return int(m.group(1)), int(m.group(2))


def test_per_set_gaps_against_the_recorded_openood_figures(compare, tmp_path, capsys):
    """Every recorded OpenOOD figure gets a row on its set, gap = ours - OpenOOD in points."""
    ours = {"scale": 0.61, "gen": 0.72, "fdbd": 0.83, "msp": 0.70}
    values = {}
    for openood_set, (our_set, _) in compare.PER_SET_SETS.items():
        for score, v in ours.items():
            values[f"{score}_{our_set}_auroc_mean"] = v
    values["scale_mnist_auroc_mean"] = ""                       # a score that did not run on a set
    write_leaderboard(tmp_path, {"ce": values, "focal": {k: 0.5 for k in values}})
    assert compare.main([str(tmp_path)]) == 0
    cells = per_set_cells(capsys.readouterr().out, compare)
    expected = {(s, score) for score, sets in compare.OPENOOD_PER_SET.items() for s in sets}
    assert set(cells) == expected
    for (openood_set, score), row in cells.items():
        ref = compare.OPENOOD_PER_SET[score][openood_set]
        assert float(row[1]) == pytest.approx(ref)
        if (openood_set, score) == ("mnist", "scale"):
            assert row[2] == "skipped" and row[3] == "-"
        else:
            assert float(row[3]) == pytest.approx(100 * ours[score] - ref, abs=0.006)


def test_per_set_sides_of_msp_and_agreement_count(compare, tmp_path, capsys, monkeypatch):
    """With an OpenOOD per-set MSP figure, sides are compared per set and counted over all sets."""
    monkeypatch.setattr(compare, "OPENOOD_PER_SET", {
        "msp": {"tin": 80.0, "mnist": 90.0},
        "scale": {"tin": 85.0, "mnist": 85.0},                 # OpenOOD: above on tin, below on mnist
        "gen": {"tin": 70.0, "texture": 60.0},                 # below on tin; no MSP figure for texture
        "fdbd": {"tin": 95.0},                                  # ours did not run it
    })
    values = {"msp_tinyimagenet_test_auroc_mean": 0.60, "scale_tinyimagenet_test_auroc_mean": 0.70,
              "gen_tinyimagenet_test_auroc_mean": 0.65, "msp_mnist_auroc_mean": 0.90,
              "scale_mnist_auroc_mean": 0.95, "msp_dtd-subset_auroc_mean": 0.50,
              "gen_dtd-subset_auroc_mean": 0.55}
    write_leaderboard(tmp_path, {"ce": values})
    compare.main([str(tmp_path)])
    out = capsys.readouterr().out
    cells = per_set_cells(out, compare)
    assert cells[("tin", "msp")][4] == "(reference)"
    assert cells[("tin", "scale")][3:] == ["-15.00", "above / above", "yes"]
    assert cells[("tin", "gen")][3:] == ["-5.00", "below / above", "no"]
    assert cells[("tin", "fdbd")][2:] == ["skipped", "-", "above / skipped", "-"]
    assert cells[("mnist", "scale")][3:] == ["+10.00", "below / above", "no"]
    assert cells[("texture", "gen")][3:] == ["-5.00", "n/a (no OpenOOD MSP figure) / above", "-"]
    assert agreement(out, "Per-set sides of MSP that agree with OpenOOD's") == (1, 3)


def test_near_far_table_and_its_count_are_unchanged(compare, tmp_path, capsys):
    """The near / far comparison still counts both groups of every score that ran."""
    values = {"msp_group:near_auroc_mean": 0.70, "msp_group:far_auroc_mean": 0.70,
              "scale_group:near_auroc_mean": 0.75, "scale_group:far_auroc_mean": 0.65,
              "gen_group:near_auroc_mean": 0.80, "gen_group:far_auroc_mean": 0.80}
    write_leaderboard(tmp_path, {"ce": values})
    compare.main([str(tmp_path)])
    out = capsys.readouterr().out
    # OpenOOD: SCALE below MSP near and far, GEN above both; ours: SCALE above / below, GEN above / above.
    assert "| scale (SCALE) | 82.55 | 75.0 | 86.39 | 65.0 | below / above | below / below | 1/2 |" in out
    assert agreement(out, "Sides of MSP that agree with OpenOOD's") == (3, 4)
    assert out.index("Sides of MSP that agree") < out.index("Per OOD set")


def test_every_per_set_figure_has_a_source_and_a_known_set(compare):
    assert set(compare.PER_SET_SOURCES) == set(compare.OPENOOD_PER_SET)
    for score, sets in compare.OPENOOD_PER_SET.items():
        assert score in compare.OPENOOD_CIFAR10
        assert set(sets) <= set(compare.PER_SET_SETS)
        assert all(0 < v <= 100 for v in sets.values())
    assert "10-class" in compare.PER_SET_SETS["texture"][1]


def test_unknown_loss_names_the_file(compare, tmp_path):
    write_leaderboard(tmp_path, {"ce": {"msp_group:near_auroc_mean": 0.5}})
    with pytest.raises(SystemExit, match="'focal' not in"):
        compare.main([str(tmp_path), "--loss", "focal"])


def test_leaderboard_methods_are_registered_scores(compare):
    """Every compared name is a score of the registry (a misspelt name would always read 'skipped')."""
    from ood import list_scores

    assert set(compare.OPENOOD_CIFAR10) <= set(list_scores())
    # The recent scores with a CrossEntropy / ResNet-18 row on OpenOOD's leaderboard.
    recent = {"nac": ("NAC", 90.93, 94.60), "weiper": ("WeiPer+KLD", 90.54, 93.12),
              "adascale_a": ("AdaSCALE-A", 83.92, 88.00), "adascale_l": ("AdaSCALE-L", 74.99, 79.02),
              "nci": ("NCI", 88.86, 91.27), "iodin": ("i-ODIN", 87.92, 90.99),
              "rankfeat": ("RankFeat", 79.46, 75.87)}
    assert {k: compare.OPENOOD_CIFAR10[k] for k in recent} == recent
    # Left out on purpose (no CIFAR-10 row, or a row of another algorithm): see the module docstring.
    for name in ("vra", "gram", "mds_norm", "rmds_norm"):
        assert name not in compare.OPENOOD_CIFAR10 and f"``{name}``" in compare.__doc__


def test_agreement_counts_two_sides_per_compared_score(compare, tmp_path, capsys):
    """With every compared score run, the count is out of 2 x (number of scores but MSP), as documented."""
    values = {"msp_group:near_auroc_mean": 0.80, "msp_group:far_auroc_mean": 0.80}
    for score, (_, near, far) in compare.OPENOOD_CIFAR10.items():
        if score != "msp":  # ours on OpenOOD's side of MSP near, on the other side far
            values[f"{score}_group:near_auroc_mean"] = 0.85 if near > compare.OPENOOD_CIFAR10["msp"][1] else 0.75
            values[f"{score}_group:far_auroc_mean"] = 0.75 if far > compare.OPENOOD_CIFAR10["msp"][2] else 0.85
    write_leaderboard(tmp_path, {"ce": values})
    compare.main([str(tmp_path)])
    out = capsys.readouterr().out
    n = len(compare.OPENOOD_CIFAR10) - 1
    assert agreement(out, "Sides of MSP that agree with OpenOOD's") == (n, 2 * n)
    assert f"2 x {n} = {2 * n} comparisons" in compare.__doc__
    assert "| nac (NAC) | 90.93 | 85.0 | 94.60 | 75.0 | above / above | above / below | 1/2 |" in out
