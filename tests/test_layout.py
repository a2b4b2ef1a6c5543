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
VERBS = ("kernel", "step", "free_response", "final_state")


@pytest.mark.parametrize("name", ["dense", "diag", "dplr", "rtf"])
def test_every_family_has_the_verbs(name):
    module = getattr(systems, name)
    for verb in VERBS:
        assert callable(getattr(module, verb, None)), f"ssm.systems.{name} lacks {verb}"
    assert callable(getattr(module, "discretize", None) or getattr(module, "system", None))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_names_its_family(name):
    cls = LAYERS[name]
    assert cls.family.__name__.startswith("ssm.systems.")
    assert "discrete_system" in vars(cls) and "default_state" in vars(cls)


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
