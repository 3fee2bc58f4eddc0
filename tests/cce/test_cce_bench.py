"""The benchmark's suite definition (bench/cce.py): its cases, shapes and optional alternatives.

Nothing is timed here; the suite itself is run by hand (``python bench/cce.py --suite``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
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
    assert set(case["cases"]) == set(bench.OURS + bench.ALTERNATIVES + [bench.FLOOR])
    # the materialised baseline (logits ~3 times over, float32) beside C and its gradient fits
    # in 24 GiB with room for the process and the inputs
    need = 3 * case["n"] * case["v"] * 4 + 2 * case["v"] * case["d"] * 4
    assert need < 16 * 2 ** 30


def test_smoke_suite_keeps_the_cases_on_tiny_shapes(bench):
    full, smoke = bench.suite_tables(), bench.suite_tables(smoke=True)
    assert [t["cases"] for t in smoke] == [t["cases"] for t in full]
    assert all(t["n"] <= 256 and t["d"] <= 64 and t["v"] <= 4096 for t in smoke)


def test_suite_covers_the_three_vocabulary_sizes_and_parts(bench):
    for kind in ("dense", "peaked"):
        vs = [t["v"] for t in bench.suite_tables(parts=[kind])]
        assert vs == [32768, 131072, 262144]
    assert {t["part"] for t in bench.suite_tables()} == set(bench.PARTS) - {"bound"}
    assert [t["part"] for t in bench.suite_tables(parts=["bf16"])] == ["bf16"] * 3
    with pytest.raises(ValueError, match="parts must be among"):
        bench.suite_tables(parts=["sparse"])


def test_rounds_alternate_the_case_order(bench):
    orders = bench.round_orders(["a", "b", "c"], 3)
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert bench.round_orders(["a"], 1) == [["a"]]


def test_rounds_combine_into_medians_and_the_largest_load(bench):
    runs = [{"case": "x", "time": t, "extra_mib": m, "gemm_rate": 1e11, "grads_mib": 1.0,
             "load": ld, "skipped": float("nan")}
            for t, m, ld in ((3.0, 10.0, 0.5), (1.0, 30.0, 2.0), (2.0, 20.0, 1.0))]
    row = bench.combine_rounds("x", runs)
    assert row["time"] == 2.0 and row["extra_mib"] == 20.0 and row["load"] == 2.0
    assert row["rounds"] == [3.0, 1.0, 2.0]
    # a round that failed is left out of the medians; no round ran: its skip reason
    failed = {"case": "x", "skipped": "failed: boom"}
    assert bench.combine_rounds("x", [failed, runs[0], runs[1]])["time"] == 2.0
    assert bench.combine_rounds("x", [failed])["skipped"] == "failed: boom"


def test_materialised_cases_are_not_run_where_the_logits_would_not_fit(bench):
    gib = 2.0 ** 30
    # V = 262,144 at N = 8,192: three float32 N x V tensors are 24 GiB
    why = bench.too_big("F.cross_entropy(E @ C.T)", 8192, 512, 262144, "float32", 20 * gib)
    assert why is not None and "needs ~" in why
    assert bench.too_big("F.linear_cross_entropy default", 8192, 512, 262144, "float32",
                         20 * gib) is not None
    # the chunked and cut implementations hold no N x V tensor
    assert bench.too_big("lossbench ext", 8192, 512, 262144, "float32", 20 * gib) is None
    assert bench.too_big("F.linear_cross_entropy 512-row chunks", 8192, 512, 262144,
                         "float32", 20 * gib) is None
    assert bench.too_big("F.cross_entropy(E @ C.T)", 8192, 512, 32768, "float32", 20 * gib) is None


def _row(case, time, mib):
    return {"case": case, "time": time, "extra_mib": mib}


def test_targets_are_reported_met_or_missed(bench):
    alt = bench.ALTERNATIVES
    dense = [_row("lossbench ext", 9.0, 100.0), _row(alt[3], 10.0, 300.0),
             _row(alt[2], 20.0, 150.0)]
    lines = bench.target_lines("dense", dense)
    assert "met (0.90x)" in lines[0]
    assert lines[1].startswith("target: least extra memory of all: met")
    slow = [_row("lossbench ext", 9.6, 200.0)] + dense[1:]
    lines = bench.target_lines("dense", slow)
    assert "missed (0.96x)" in lines[0] and "missed (200 MiB vs 150" in lines[1]
    peaked = [_row("lossbench ext", 6.0, 1.0), _row(alt[3], 9.0, 1.0)]
    assert "met (1.50x)" in bench.target_lines("peaked", peaked)[0]
    peaked[0]["time"] = 7.0
    assert "missed (1.29x)" in bench.target_lines("peaked", peaked)[0]
    assert "not measured" in bench.target_lines("dense", [_row(alt[3], 1.0, 1.0)])[0]


def test_the_floor_runs_the_three_gemms_and_is_no_alternative(bench):
    import torch

    assert bench.FLOOR not in bench.ALTERNATIVES  # never the "best alternative"
    assert all(bench.FLOOR in t["cases"] for t in bench.suite_tables(parts=["dense", "peaked"]))
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(700, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    C = torch.randn(30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bench.make_case(bench.FLOOR)(E, C, None).backward()
    L = E.detach() @ C.detach().t()
    assert torch.allclose(E.grad, L @ C.detach()) and torch.allclose(C.grad, L.t() @ E.detach())


def test_suite_vocab_keeps_the_other_parts(bench):
    tabs = bench.suite_tables(vocab=[32768])
    assert {t["v"] for t in tabs if t["part"] in ("dense", "peaked")} == {32768}
    assert any(t["part"] == "bf16" for t in tabs) and any(t["part"] == "llm" for t in tabs)


def test_a_fixed_row_block_case_passes_rows_per_block(bench, monkeypatch):
    from lossbench import cce

    seen = {}
    monkeypatch.setattr(cce, "linear_cross_entropy", lambda *a, **kw: seen.update(kw))
    bench.make_case("lossbench torch rows=512")(None, None, None)
    assert seen["rows_per_block"] == 512 and seen["impl"] == "torch"
    bench.make_case("lossbench ext unsorted")(None, None, None)
    assert seen["rows_per_block"] is None and seen["sort_vocab"] is False


def _fake_runs(bench, monkeypatch, fail_after=None):
    """run_case replaced by a counter: each case-round's time is 1 + its call number."""
    calls = []

    def run_case(case, n, d, v, device, reps, timeout, kind, dtype):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt  # the run is killed here
        calls.append(case)
        return {"case": case, "time": float(len(calls)), "extra_mib": 1.0, "gemm_rate": 1e11,
                "grads_mib": 0.5, "skipped": float("nan"), "load": 0.1}

    monkeypatch.setattr(bench, "run_case", run_case)
    monkeypatch.setattr(bench, "mem_available", lambda: float("inf"))
    return calls


def _table(bench, store, rate=1e11):
    return bench.table(64, 8, 128, "cpu", 1, 10.0, "dense", "float32", ["a", "b", "c"], rate,
                       rounds=3, store=str(store), part="dense")


def test_a_killed_suite_table_resumes_without_rerunning_a_finished_case_round(bench, monkeypatch,
                                                                               tmp_path):
    store = tmp_path / "t.json"
    calls = _fake_runs(bench, monkeypatch, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        _table(bench, store)
    assert calls == ["a", "b", "c", "c"]  # round 1 forwards, round 2 backwards
    done = json.loads(store.read_text())
    assert [len(done["results"][c]) for c in "abc"] == [1, 1, 2]
    calls2 = _fake_runs(bench, monkeypatch)
    rows = _table(bench, store, rate=5e10)  # the rate measured when the table started is kept
    assert calls2 == ["b", "a", "a", "b", "c"]  # the rest of round 2, then round 3
    assert [len(r["rounds"]) for r in rows] == [3, 3, 3]
    assert rows[2]["rounds"] == [3.0, 4.0, 5.0]  # c: the stored rounds, then the new one
    state = json.loads(store.read_text())
    assert state["rate"] == 1e11 and len(state["dates"]) == 9
    calls3 = _fake_runs(bench, monkeypatch)
    assert [r["rounds"] for r in _table(bench, store)] == [r["rounds"] for r in rows]
    assert calls3 == []  # a finished table is reprinted, nothing is run


def test_a_suite_table_of_another_machine_or_setting_starts_anew(bench, monkeypatch, tmp_path,
                                                                 capsys):
    store = tmp_path / "t.json"
    _fake_runs(bench, monkeypatch)
    _table(bench, store)
    state = json.loads(store.read_text())
    state["machine"]["cpu"] = "another CPU"
    store.write_text(json.dumps(state))
    calls = _fake_runs(bench, monkeypatch)
    _table(bench, store)
    assert len(calls) == 9 and "no table mixes machines" in capsys.readouterr().out
    store.write_text("{not json")
    calls = _fake_runs(bench, monkeypatch)
    _table(bench, store)
    assert len(calls) == 9 and "unreadable" in capsys.readouterr().out
    calls = _fake_runs(bench, monkeypatch)
    bench.table(64, 8, 256, "cpu", 1, 10.0, "dense", "float32", ["a", "b", "c"], 1e11,
                rounds=3, store=str(store), part="dense")  # another V in the same file
    assert len(calls) == 9 and "other settings" in capsys.readouterr().out


def test_peaked_targets_state_the_bound_that_filtering_allows(bench):
    alt = bench.ALTERNATIVES
    rows = [dict(_row("lossbench ext", 8.0, 1.0), skipped=0.7), _row(alt[3], 12.0, 1.0),
            _row(bench.FLOOR, 10.0, 1.0)]
    lines = bench.target_lines("peaked", rows)
    # kept 30 %: one full GEMM and two at 30 % = 1.6 of 3 GEMMs of the floor's 10 s
    assert "missed (1.50x)" not in lines[0] and "met (1.50x)" in lines[0]
    assert "are 53% of the floor's, 5.33 s: at most 2.25x faster" in lines[1]
    assert len(bench.target_lines("peaked", rows[:2])) == 1  # no floor row: no bound line


def test_a_table_without_alternatives_says_so_and_bf16_prints_its_block(bench, monkeypatch,
                                                                       capsys):
    _fake_runs(bench, monkeypatch)
    bench.table(64, 8, 8192, "cpu", 1, 10.0, "dense", "bfloat16", ["lossbench ext"], 1e11,
                rounds=1, targets=True, part="bf16")
    out = capsys.readouterr().out
    assert "no alternative in this table" in out and "nan" not in out.split("\n")[0]
    # 64 rows (N) of V = 8192 float32 = 2 MiB; the fake case holds 1.0 - 0.5 MiB beyond the grads
    assert "memory: 0 MiB beyond the gradients, of which one float32 logits block of 64 x 8192 " \
           "is 2 MiB; -2 MiB beyond both" in out


def test_the_suite_prints_targets_under_the_llm_shaped_table(bench, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "table",
                        lambda *a, **k: seen.append((k["part"], k["targets"])) or [])
    monkeypatch.setattr(bench, "bound_check", lambda *a, **k: None)
    monkeypatch.setattr(bench, "gemm_rate", lambda *a, **k: 1e11, raising=False)
    monkeypatch.setattr(sys, "argv", ["cce.py", "--suite", "--smoke", "--parts", "llm", "bf16"])
    bench.main()
    assert seen and all(targets for _, targets in seen)
    assert {part for part, _ in seen} == {"llm", "bf16"}


def test_the_summary_has_one_line_per_table_with_its_targets(bench, capsys):
    alt = bench.ALTERNATIVES

    def row(case, time, mib):
        return dict(_row(case, time, mib), grads_mib=10.0)

    dense = dict(kind="dense", dtype="float32", n=8, d=4, v=64)
    peaked = dict(dense, kind="peaked")
    bf16 = dict(dense, dtype="bfloat16")
    bench.summary([(dense, [row("lossbench ext", 9.0, 100.0), row(alt[3], 10.0, 300.0),
                            row(alt[2], 20.0, 50.0)]),
                   (peaked, [row("lossbench ext", 6.0, 100.0), row(alt[3], 9.0, 300.0)]),
                   (bf16, [row("lossbench ext", 2.0, 40.0)]),
                   (dense, [row(alt[3], 1.0, 1.0)])])
    lines = capsys.readouterr().out.strip().split("\n")[3:]
    assert len(lines) == 4
    assert "| 0.90x | 90 | 40 (" in lines[0] and "time: met; least memory: missed |" in lines[0]
    assert "| 0.67x |" in lines[1] and ">= 1.5x faster: met |" in lines[1]
    assert lines[2].endswith("| 2 | - | - | 30 | - | - |")
    assert "not measured" in lines[3]
