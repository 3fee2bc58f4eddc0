"""The benchmark's suite definition (bench/cce.py): its cases, shapes and optional alternatives.

Nothing is timed here; the suite itself is run by hand (``python bench/cce.py --suite``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cce.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lossbench_bench_cce", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_apple_column_is_left_out_with_a_note_when_not_installed(bench, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cut_cross_entropy" else real(name, *a))
    note = bench.apple_note()
    assert note is not None and "pip install cut-cross-entropy==25.1.1 --no-deps" in note
    kept = bench.available(bench.OURS + bench.ALTERNATIVES)
    assert bench.APPLE not in kept and bench.APPLE_TRITON not in kept
    assert len(kept) == len(bench.OURS + bench.ALTERNATIVES) - 2
    assert bench.APPLE_TRITON not in bench.available(bench.ALTERNATIVES, "cuda")


def test_apple_column_is_kept_when_installed(bench, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cut_cross_entropy" else real(name, *a))
    assert bench.apple_note() is None
    assert bench.APPLE in bench.available(bench.ALTERNATIVES)
    # apple's Triton kernels run on CUDA only
    assert bench.APPLE_TRITON not in bench.available(bench.ALTERNATIVES, "cpu")
    assert bench.APPLE_TRITON in bench.available([bench.APPLE], "cuda")
    assert all(bench.APPLE in t["cases"] for t in bench.suite_tables()
               if t["dtype"] == "float32")


def test_suite_has_an_llm_shaped_case_with_every_implementation(bench):
    llm = [t for t in bench.suite_tables() if (t["d"], t["v"]) == (2304, 256000)]
    assert len(llm) == 1
    case = llm[0]
    assert set(case["cases"]) == set(bench.OURS + bench.ALTERNATIVES)
    # the materialised baseline (logits ~3 times over, float32) beside C and its gradient fits
    # in 24 GiB with room for the process and the inputs
    need = 3 * case["n"] * case["v"] * 4 + 2 * case["v"] * case["d"] * 4
    assert need < 16 * 2 ** 30


def test_smoke_suite_keeps_the_cases_on_tiny_shapes(bench):
    full, smoke = bench.suite_tables(), bench.suite_tables(smoke=True)
    assert [t["cases"] for t in smoke] == [t["cases"] for t in full]
    assert all(t["n"] <= 256 and t["d"] <= 64 and t["v"] <= 4096 for t in smoke)
