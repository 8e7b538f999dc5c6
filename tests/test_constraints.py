"""constraints.txt: every dependency of the toolkit is pinned there, and the environment under test has the
pinned versions (what `make setup` installs), so the suite passes with what the file records."""
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
HOW = "change it on purpose: `make setup`, `make test`, then `make constraints` (README: Installing)"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip()).groups()
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    """What the installed toolkit requires, extras included (setup.py, as `make setup` last installed it)."""
    return [Requirement(r) for r in metadata.requires("gptmoe-toolkit") or []]


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    pins = _pins()
    assert "torch" not in pins  # make setup installs its own pin first and keeps a cluster's build
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} (setup.py) is not in constraints.txt; {HOW}"
        assert metadata.version(req.name) == pins[name], (
            f"{req.name} {metadata.version(req.name)} is installed, constraints.txt pins {pins[name]}; {HOW}")
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name} {pins[name]}, outside setup.py's range {req.specifier}")


def test_setup_py_ranges_stop_below_the_next_major_version():
    """Users installing into their own environment get ranges; a new major version is not assumed to work."""
    for req in _requirements():
        uppers = [s for s in req.specifier if s.operator in ("<", "<=")]
        assert uppers, f"{req} has no upper bound"
