"""No git-tracked file carries merge-conflict markers (a half-resolved merge)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The lines git writes around a conflict: ``<<<<<<< ours``, ``=======``, ``>>>>>>> theirs``.
OPENING, SEPARATOR, CLOSING = "<<<<<<< ", "=======", ">>>>>>> "


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not in a git checkout (or git is missing)")
    return [ROOT / name for name in out.stdout.decode().split("\0") if name]


def conflict_lines(data: bytes):
    """``(line number, line)`` of every conflict marker in a text file's bytes; nothing for a binary file."""
    if b"\0" in data[:8192]:  # binary
        return []
    text = data.decode("utf-8", errors="replace")
    return [(i, line) for i, line in enumerate(text.splitlines(), 1)
            if line.startswith((OPENING, CLOSING)) or line == SEPARATOR]


def test_conflict_lines_finds_the_three_markers_only():
    text = b"a\n<<<<<<< HEAD\nb\n=======\nc\n>>>>>>> branch\n======== not one\n<<<<<<<no space\n"
    assert [n for n, _ in conflict_lines(text)] == [2, 4, 6]
    assert conflict_lines(b"\0<<<<<<< HEAD\n") == []


def test_no_tracked_file_has_conflict_markers():
    found = []
    for path in tracked_files():
        if path.is_file():  # a file deleted in the working tree is still listed
            found += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in conflict_lines(path.read_bytes())]
    assert not found, "merge-conflict markers left in:\n" + "\n".join(found)
