"""bench/seeds.py: per-seed accuracy and wall time; a run finished before the call is not timed again."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains tiny models through the script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--model", "test_resnet", "--img-size", "16", "--epochs", "2", "--batch-size", "32",
        "--max-train-samples", "64", "--warmup-epochs", "0", "--opt", "adamw", "--no-progress", "--name", "t"]


def _seeds_script():
    spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "bench" / "seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wall_time_only_for_runs_trained_in_this_call(tmp_path, capsys):
    seeds = _seeds_script()
    out, js = tmp_path / "runs", tmp_path / "seeds.json"
    # seed 1 is killed after its first epoch: not finished, so the next call trains (and times) it
    assert not seeds.is_finished(TINY, 1, str(out))
    seeds.train_seed(TINY + ["--stop-after-epochs", "1"], 1, str(out))
    assert (out / "t-s1" / "last.pt").is_file() and not seeds.is_finished(TINY, 1, str(out))

    assert seeds.main(TINY + ["--seeds", "0", "1", "--output", str(out), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(r["wall_s"] is not None and r["wall_s"] > 0 for r in rows)
    assert all(0.0 <= r["tta0"] <= 1.0 for r in rows)
    assert seeds.is_finished(TINY, 0, str(out)) and seeds.is_finished(TINY, 1, str(out))
    assert not list(tmp_path.glob("*.tmp"))

    capsys.readouterr()
    assert seeds.main(TINY + ["--seeds", "0", "--output", str(out), "--json", str(js)]) == 0
    again = json.loads(js.read_text())
    assert again[0]["wall_s"] is None and again[0]["tta0"] == rows[0]["tta0"]
    table = capsys.readouterr().out
    assert "| seed | train s | wall s | load |" in table
    assert "| 0 | " in table and " | - | " in table
