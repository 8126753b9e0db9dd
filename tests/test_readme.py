"""The Python examples of README.md and of every page under docs/ run as written (the ones that need the Hub are
only shown, in ``py`` blocks), each in a temporary folder, and every value a comment states is checked: a line
``expression  # (3, 200, 768) ...`` asserts that the expression (a shape, or the shapes of a list of tensors) equals
the literal that starts the comment. docs/architecture.md names every module of the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [  # (where, code)
    (f"{page.relative_to(ROOT)} python block {i}", code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


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


def test_the_docs_have_examples_with_checked_values():
    assert sum(where.startswith("README.md") for where, _ in BLOCKS) >= 1
    assert sum(with_checks(code)[1] for _, code in BLOCKS) >= 10


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save write here
    checked, _ = with_checks(code)
    exec(compile(checked, where, "exec"), {"_comparable": _comparable})


def test_the_architecture_page_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "siglip2_encoder"
    missing = []
    for path in sorted(package.rglob("*.py")):
        folder = path.parent.relative_to(package)
        if path.name == "__init__.py":
            named = f"{folder}/" in text or str(folder) == "."
        else:
            named = re.search(rf"(?<![\w.]){re.escape(path.name)}\b", text) is not None
        if not named:
            missing.append(str(path.relative_to(package)))
    assert not missing, f"docs/architecture.md does not name {missing}"
