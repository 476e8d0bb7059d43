"""The package stays readable: no function over 60 lines unless its ``def`` line says why."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hub_ccrop"
MAX_LINES = 60


def long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            reason = "# long:" in lines[node.lineno - 1]
            if length > MAX_LINES and not reason:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_60_lines_without_a_reason():
    assert long_functions() == [], "split these, or say why beside the def with '# long: <reason>'"


def test_the_check_finds_a_long_function(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "hub_ccrop").mkdir()
    (tmp_path / "hub_ccrop" / "m.py").write_text(f"def long():\n{body}\n\n\ndef excused():  # long: a table\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "hub_ccrop")
    assert long_functions() == ["hub_ccrop/m.py:1 long (61 lines)"]
