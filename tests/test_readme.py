"""README's Python examples run as written (the ones that need the Hub are only shown there), in a temporary folder,
and every value a comment states is checked: a line ``expression  # (3, 200, 768) ...`` asserts that the
expression (a shape, or the shapes of a list of tensors) equals the literal that starts the comment."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _leading_literal(comment: str) -> tuple[bool, object]:
    """The longest prefix of ``comment`` that is a Python literal (not ending in a comma, which would make a tuple
    of what the comment states)."""
    for end in range(len(comment), 0, -1):
        prefix = comment[:end].strip()
        if not prefix or prefix.endswith(","):
            continue
        try:
            return True, ast.literal_eval(prefix)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
    return False, None


def _comparable(value: object) -> object:
    """Tensors and sizes compare by shape, sequences element by element."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_comparable(v) for v in value)
    return value


def with_checks(code: str) -> tuple[str, int]:
    """``code`` with an assert after every expression line whose comment starts with a literal; and their count."""
    out, checks = [], 0
    for line in code.splitlines():
        out.append(line)
        source, _, comment = line.partition("  # ")
        if not comment or not isinstance(_parse(source), ast.Expr):
            continue
        found, literal = _leading_literal(comment)
        if found:
            out.append(f"assert _comparable({source.strip()}) == {literal!r}, {line.strip()!r}")
            checks += 1
    return "\n".join(out), checks


def _parse(source: str) -> ast.stmt | None:
    try:
        body = ast.parse(source.strip()).body
    except SyntaxError:
        return None
    return body[0] if len(body) == 1 else None


def test_readme_has_examples_with_checked_values():
    assert len(BLOCKS) >= 2
    assert sum(with_checks(block)[1] for block in BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save write here
    code, _ = with_checks(BLOCKS[index])
    exec(compile(code, f"README.md python block {index}", "exec"), {"_comparable": _comparable})
