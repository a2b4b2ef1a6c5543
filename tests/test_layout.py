"""The layout rules: one module per family with the same verbs, no private name across files, and the
float64 oracle (ssm.reference) imported by tests only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ssm
from ssm import systems
from ssm.layers import LAYERS

PACKAGE = Path(ssm.__file__).parent


@pytest.mark.parametrize("name", sorted(systems.FAMILIES))
def test_every_family_has_the_verbs_of_its_tier(name):
    module = systems.FAMILIES[name]
    assert systems.missing_verbs(module) == [], f"ssm.systems.{name}"
    assert isinstance(module, systems.Family)
    assert isinstance(module, systems.LTIFamily if module.TIER == "lti" else systems.ScanFamily)


def test_every_family_module_is_registered():
    modules = {p.stem for p in (PACKAGE / "systems").glob("*.py")} - {"__init__", "common"}
    assert modules == set(systems.FAMILIES)


def test_missing_verbs_names_what_is_missing():
    import types

    fake = types.SimpleNamespace(TIER="lti", discretize=len, step=len, final_state=len, kernel=len)
    assert systems.missing_verbs(fake) == ["free_response"]
    assert systems.missing_verbs(types.SimpleNamespace()) == ["TIER (one of ['lti', 'scan']; got None)"]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_names_its_family(name):
    """A layer's base matches its family's tier: LTI layers build a discrete system for the kernel."""
    from ssm.layers import LTILayer

    cls = LAYERS[name]
    assert cls.family.__name__.startswith("ssm.systems.")
    assert "default_state" in vars(cls) or "default_state" in vars(cls.__mro__[1])
    assert issubclass(cls, LTILayer) == (cls.family.TIER == "lti")
    if cls.family.TIER == "lti":
        assert "discrete_system" in vars(cls)


def test_no_private_name_crosses_a_file_boundary():
    crossings = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                # a package-private module (``from . import _parallel``) is meant for the package's files
                crossings += [f"{path.relative_to(PACKAGE)}:{node.lineno} {a.name}" for a in node.names
                              if a.name.startswith("_") and not (path.parent / f"{a.name}.py").exists()]
    assert crossings == []


def test_production_code_never_imports_the_reference():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "reference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("reference"):
                importers.append(str(path.relative_to(PACKAGE)))
            if isinstance(node, ast.ImportFrom) and any(a.name == "reference" for a in node.names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == []
    code = (
        "import sys, torch, ssm\n"
        "for cls in (ssm.S4, ssm.S4D, ssm.RTF):\n"
        "    m = cls(4, 8); s = m.default_state(2) + 0.1\n"
        "    y, s = m(torch.randn(2, 16, 4), s, return_state=True); m.step(torch.randn(2, 4), s)\n"
        "assert 'ssm.reference' not in sys.modules\n"
        "assert ssm.data.load_lra and ssm.reference.scan\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _top_level_names_of_installed_distributions() -> dict[str, list[str]]:
    """Import name -> distributions that install it, for every installed distribution."""
    import importlib.metadata as md

    if hasattr(md, "packages_distributions"):  # Python 3.10+
        return md.packages_distributions()
    names: dict[str, list[str]] = {}
    for dist in md.distributions():
        for name in (dist.read_text("top_level.txt") or "").split():
            names.setdefault(name, []).append(dist.metadata["Name"])
    return names


def test_no_repository_module_shadows_an_installed_package():
    """benchmarks/, examples/ and tests/ land on ``sys.path`` (scripts run from there, pytest puts tests/ and
    examples/ there): none of their modules may share a name with an installed distribution's top-level
    package or a standard-library module, or it would stand in for it (benchmarks/kernels.py once replaced
    the PyPI package ``kernels`` that transformers imports)."""
    root = PACKAGE.parent
    ours = {}
    for folder in ("benchmarks", "examples", "tests"):
        for path in (root / folder).iterdir():
            if path.suffix == ".py" or (path / "__init__.py").exists():
                ours[path.stem] = f"{folder}/{path.name}"
    installed = _top_level_names_of_installed_distributions()
    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    clashes = {ours[name]: installed.get(name, ["the standard library"])
               for name in ours if name != "conftest" and (name in installed or name in stdlib)}
    assert clashes == {}
