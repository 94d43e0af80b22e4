"""Small files with one job, functions that fit on a screen (tinygrad-style guard, issue 13): no source file over
400 lines and no function over 50, in the packages, studies/ and tools/ (tests are exempt)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 50


def sources() -> list[Path]:
    files = [ROOT / "toolkit.py"]
    for package in ("runtime", "train", "export", "eval", "studies", "tools"):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def test_no_file_over_400_lines_and_no_function_over_50():
    too_long = []
    for path in sources():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() {length} lines")
    assert not too_long, "split these up:\n" + "\n".join(too_long)
    assert len(sources()) > 50   # the walk found the code
