"""constraints.txt, the lock file ``make setup`` installs from (``make lock`` writes it), pins every package that
``make setup`` asks for at a version the project's own requirements admit, and agrees with the Makefile's pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
evidence = load_script("benchmarks/evidence.py")


def _make_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name} variable"
    return m.group(1).strip()


def test_the_lock_pins_every_requirement_make_setup_installs_at_an_admitted_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = _make_var("EXTRAS").split(",")
    assert set(extras) <= set(project["optional-dependencies"]), extras
    pins = evidence.read_lock(ROOT / _make_var("LOCK"))
    reqs = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    assert len(reqs) > 30
    for line in reqs:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required but not in the lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} but {line!r}"
    assert "bioperceiver" not in pins  # the package itself is installed editable, never pinned


def test_the_makefile_installs_from_the_lock_and_agrees_with_its_pins():
    pins = evidence.read_lock(ROOT / _make_var("LOCK"))
    for var in ("TORCH", "DEMO_DATA"):  # pinned in the Makefile too: the same versions
        for pin in _make_var(var).split():
            name, _, version = pin.partition("==")
            assert pins[canonicalize_name(name)] == version, (var, pin)
    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.deps:", 1)[1].split("\n\n", 1)[0]
    assert "$(LOCK)" in recipe.splitlines()[0]  # a new lock re-installs
    assert re.search(r"install .*-c \$\(LOCK\) .*-e \"\.\[\$\(EXTRAS\)\]\"", recipe), recipe
