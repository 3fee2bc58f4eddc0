"""Dependencies are ranges (a user's own torch stays); the exact tested versions live in constraints.txt."""

import configparser
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _requirements():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].strip().splitlines()
    for extra in cfg["options.extras_require"].values():  # test, docs
        lines += extra.strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def _constraints():
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def test_requirements_are_lower_bounds_not_pins():
    for req in _requirements():
        ops = {spec.operator for spec in req.specifier}
        assert ops and ops <= {">=", "<"}, f"{req} must be a range (>=), not a pin"


def test_constraints_pin_every_requirement_within_its_range():
    pins = _constraints()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name}"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {req.name}=={pins[name]} outside {req}"


def test_another_torch_minor_version_is_kept():
    torch_req = next(r for r in _requirements() if r.name == "torch")
    assert torch_req.specifier.contains("2.5.1") and torch_req.specifier.contains("2.13.0")
