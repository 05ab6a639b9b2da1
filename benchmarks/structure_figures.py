"""The house's figures for docs/structure.md, measured from the code's own imports and definitions.

Run from the repository root: ``python benchmarks/structure_figures.py [SRC_DIR]``. Nothing of the
package is imported or run; the files are parsed with ``ast``. It prints: per room (a top-level
module or a subpackage, recursively one level down for eval/) the files and lines; the import
circles between modules; the longest function; and the function-level imports of siamae modules,
with where they stand (the stated exceptions, an entry module that must not load torch, are
named in docs/structure.md).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    found = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = resolve(node, module, is_package)
        names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        names = [name for name in names if name in known][:1] or [base]
    else:
        return found
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name.startswith("siamae") and name != "siamae":
            found.append(name)
    return found


def main(src: Path) -> None:
    files = sorted(src.rglob("*.py"))
    root = src.parent
    known = {module_name(path, root) for path in files}
    graph: dict[str, set[str]] = defaultdict(set)
    inner_imports: list[str] = []
    longest = (0, "")
    rooms: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path in files:
        text = path.read_text()
        module = module_name(path, root)
        is_package = path.name == "__init__.py"
        rel = path.relative_to(src).parts
        room = rel[0] if len(rel) == 1 or rel[0] != "eval" or len(rel) == 2 else "/".join(rel[:2])
        rooms[room][0] += 1
        rooms[room][1] += len(text.splitlines())
        tree = ast.parse(text)
        for node in tree.body:
            for target in imported_modules(node, module, is_package, known):
                graph[module].add(target)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > longest[0]:
                    longest = (length, f"{module}.{node.name}")
                for inner in ast.walk(node):
                    targets = imported_modules(inner, module, is_package, known)
                    if targets:
                        inner_imports.append(
                            f"{path.relative_to(root)}:{inner.lineno} -> {targets[0]}"
                        )
                        graph[module].update(targets)
    print("rooms (files, lines):")
    for room, (count, lines) in sorted(rooms.items()):
        print(f"  {room:28s} {count:3d} {lines:6d}")
    print(f"circles: {circles(graph)}")
    print(f"longest function: {longest[1]} ({longest[0]} lines)")
    print(f"function-level siamae imports: {len(inner_imports)}")
    for line in inner_imports:
        print(f"  {line}")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), packages' faces kept."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "src/siamae"))
