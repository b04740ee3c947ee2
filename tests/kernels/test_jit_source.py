"""Checks on the source of every ``@triton.jit`` function that the interpreter cannot make.

Under ``TRITON_INTERPRET=1`` a jit function is plain Python, so a shape of code the
compiler refuses still passes the CPU tests. One such shape is an early ``return`` inside
an ``if`` on a constexpr, followed by more code::

    if IS_INT8:
        return v.to(tl.int8)
    return v.to(tl.float8e4nv)      # compiled too: "Inconsistent return types"

The code generator keeps visiting the statements after the ``if`` and compares the types
of both returns. Written as ``if ...: return a`` / ``else: return b`` only the taken
branch is generated. This test finds the first shape in triton_kernels/ and models/.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _is_jit(fn: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def _early_returns(body: list[ast.stmt]) -> list[ast.If]:
    """`if` statements that end in a return, have no else and are followed by more code."""
    found: list[ast.If] = []
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.If):
            if stmt.body and isinstance(stmt.body[-1], ast.Return) and not stmt.orelse \
                    and i < len(body) - 1:
                found.append(stmt)
            found += _early_returns(stmt.body) + _early_returns(stmt.orelse)
        elif isinstance(stmt, (ast.For, ast.While, ast.With)):
            found += _early_returns(stmt.body)
    return found


def early_returns_in(source: str, name: str) -> list[str]:
    places = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef) and _is_jit(fn):
            places += [f"{name}:{s.lineno} {fn.name}" for s in _early_returns(fn.body)]
    return places


def test_the_check_finds_an_early_return():
    bad = ("@triton.jit\ndef f(x, A: tl.constexpr):\n    if A:\n        return x.to(tl.int8)\n"
           "    return x\n")
    good = bad.replace("    return x\n", "    else:\n        return x\n")
    assert early_returns_in(bad, "bad") == ["bad:3 f"]
    assert early_returns_in(good, "good") == []


def test_no_jit_function_returns_early_from_an_if():
    places = []
    for folder in ("triton_kernels", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            places += early_returns_in(path.read_text(), str(path.relative_to(ROOT)))
    assert places == [], "write these as if/else: " + ", ".join(places)
