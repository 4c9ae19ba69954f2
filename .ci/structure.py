"""The shape a newcomer can read: no module over 400 lines, no function over 60, no import cycle.

    python .ci/structure.py [--runtime]

Run from the repository root. Checks ``pytest_vmenv`` and ``backends/*/vmenv_*``; an import
cycle counts the imports under ``if TYPE_CHECKING:`` too, unless ``--runtime`` is given. Prints
each problem and exits 1 if there is one.
"""

from __future__ import annotations

import ast
import graphlib
import sys
from collections.abc import Iterator
from pathlib import Path

MODULE_LINES = 400
FUNCTION_LINES = 60


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the core and every backend distribution."""
    found: dict[str, Path] = {}
    for package in [root / "pytest_vmenv", *sorted(root.glob("backends/*/vmenv_*"))]:
        base = package.parent
        for path in package.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def sizes(name: str, path: Path, tree: ast.Module) -> Iterator[str]:
    lines = path.read_text().count("\n")
    if lines > MODULE_LINES:
        yield f"{path}: {lines} lines (at most {MODULE_LINES})"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > FUNCTION_LINES:
                yield f"{path}:{node.lineno}: {node.name} is {length} lines (at most 60)"


def _targets(node: ast.ImportFrom, package: str, known: dict[str, Path]) -> list[str]:
    if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join([*parts, node.module] if node.module else parts)
    else:
        base = node.module or ""
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return submodules or [base]


def imports(name: str, path: Path, tree: ast.Module, known: dict[str, Path], runtime: bool):
    """The modules of ``known`` that module ``name`` imports at its top level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in tree.body:
        if runtime and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nested = isinstance(node, ast.If | ast.Try)
        for sub in ast.walk(node) if nested else [node]:
            if isinstance(sub, ast.ImportFrom):
                targets = _targets(sub, package, known)
            elif isinstance(sub, ast.Import):
                targets = [a.name for a in sub.names]
            else:
                continue
            yield from (t for t in targets if t in known and t != name)


def main(argv: list[str]) -> int:
    runtime = "--runtime" in argv
    known = modules(Path("."))
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for name, path in sorted(known.items()):
        tree = ast.parse(path.read_text())
        problems += sizes(name, path, tree)
        graph[name] = set(imports(name, path, tree, known, runtime))
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        problems.append("import cycle: " + " -> ".join(exc.args[1]))
    for problem in problems:
        print(problem)
    print(f"{len(known)} modules, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
