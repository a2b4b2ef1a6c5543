"""Docs that run: every ```python block of README.md executes, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run():
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md should contain python examples"
    torch.manual_seed(0)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md[python block {i}]", "exec"), namespace)


def test_readme_commands_on_top():
    head = README.read_text().split("## ")[0]
    assert "pip install" in head and "pytest" in head and "examples/lra.py" in head
