"""The package's shape, checked: imports go only down the layers (the import-linter contract in
pyproject.toml, run here through grimp, which import-linter uses), no two modules import each other
through any chain (function-local imports count: they only defer a cycle), and no module or class
grows past what one reader takes in (generated files excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "smoothq"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 200


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("smoothq", exclude_type_checking_imports=True)


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [f"smoothq.{layer}" for layer in contract["layers"]]


def test_every_subpackage_is_a_layer_of_the_contract():
    packages = {f"smoothq.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(_layers())


def test_imports_go_only_down_the_layers(graph):
    layers = _layers()
    upward = []
    for i, low in enumerate(layers):
        for high in layers[:i]:
            for chain in graph.find_shortest_chains(importer=low, imported=high, as_packages=True):
                upward.append(" -> ".join(chain))
    assert not upward, "imports that go up the layers:\n" + "\n".join(sorted(upward))


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    modules = sorted(m for m in graph.modules if m.startswith("smoothq"))
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if not w.startswith("smoothq"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles(graph):
    # a package __init__ that re-exports its modules imports them: that edge is not a cycle of the
    # modules themselves, so packages importing their own children are left out
    cycles = [c for c in _cycles(graph)]
    for c in list(cycles):
        rest = [m for m in c if not any(o.startswith(m + ".") for o in c)]
        if len(rest) <= 1:
            cycles.remove(c)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_no_module_over_the_limit():
    long = {name: text.count("\n") for name, text in _sources() if text.count("\n") > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_class_over_the_limit():
    long = {}
    for name, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"
