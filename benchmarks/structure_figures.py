"""The house's figures for docs/structure.md, measured from the code's own imports and definitions.

Run from the repository root: ``python benchmarks/structure_figures.py [SRC_DIR]``. Nothing of the
package is imported or run; the files are parsed with ``ast``. It prints: per room (a top-level
module or a subpackage, recursively one level down for eval/) the files and lines; the import
circles between modules; the room loops (rooms here the top-level modules and packages, eval/
whole, that reach each other through any import, type-only ones included: a room importing a
room above it); the longest function; and the function-level imports of siamae modules, with
where they stand (the stated exceptions, an entry module that must not load torch, are named in
docs/structure.md).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
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
        # Every module the import names (``from siamae import export, submit``: both), and the
        # base itself for names that are not modules (``from siamae.config import Config``).
        named = [f"{base}.{alias.name}" for alias in node.names]
        names = [name for name in named if name in known]
        if len(names) < len(named):
            names.append(base)
    else:
        return found
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name.startswith("siamae") and name != "siamae":
            found.append(name)
    return found


@dataclass
class Figures:
    rooms: dict[str, list[int]]  # room -> [files, lines]
    graph: dict[str, set[str]]  # module -> the siamae modules it imports at run time
    room_arrows: dict[str, dict[str, set[str]]]  # room -> room -> "module -> module" imports
    functions: list[tuple[int, str]]  # (lines from def to the end, module.function)
    inner_imports: list[str]  # "path:line -> module" of each function-level siamae import

    @property
    def circles(self) -> list[list[str]]:
        return circles(self.graph)

    @property
    def room_loops(self) -> list[list[str]]:
        return circles({room: set(targets) for room, targets in self.room_arrows.items()})

    @property
    def longest(self) -> tuple[int, str]:
        return max(self.functions, default=(0, ""))


def measure(src: Path) -> Figures:
    """The figures of the package at ``src`` (e.g. ``src/siamae``), from its parsed files."""
    files = sorted(src.rglob("*.py"))
    root = src.parent
    known = {module_name(path, root) for path in files}
    figures = Figures(defaultdict(lambda: [0, 0]), defaultdict(set), defaultdict(dict), [], [])
    for path in files:
        text = path.read_text()
        module = module_name(path, root)
        is_package = path.name == "__init__.py"
        rel = path.relative_to(src).parts
        room = rel[0] if len(rel) == 1 or rel[0] != "eval" or len(rel) == 2 else "/".join(rel[:2])
        figures.rooms[room][0] += 1
        figures.rooms[room][1] += len(text.splitlines())
        tree = ast.parse(text)
        for node in tree.body:
            for target in imported_modules(node, module, is_package, known):
                figures.graph[module].add(target)
        for node in ast.walk(tree):
            for target in imported_modules(node, module, is_package, known):
                if top_room(target) != top_room(module):
                    arrows = figures.room_arrows[top_room(module)]
                    arrows.setdefault(top_room(target), set()).add(f"{module} -> {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                figures.functions.append((length, f"{module}.{node.name}"))
                for inner in ast.walk(node):
                    targets = imported_modules(inner, module, is_package, known)
                    if targets:
                        figures.inner_imports.append(
                            f"{path.relative_to(root)}:{inner.lineno} -> {targets[0]}"
                        )
                        figures.graph[module].update(targets)
    return figures


def main(src: Path) -> None:
    figures = measure(src)
    print("rooms (files, lines):")
    for room, (count, lines) in sorted(figures.rooms.items()):
        print(f"  {room:28s} {count:3d} {lines:6d}")
    print(f"circles: {figures.circles}")
    loops = figures.room_loops
    print(f"room loops: {len(loops)}")
    for loop in loops:
        print(f"  {' <-> '.join(loop)}:")
        for room in loop:
            for target in sorted(set(figures.room_arrows[room]) & set(loop)):
                print(f"    {', '.join(sorted(figures.room_arrows[room][target]))}")
    length, name = figures.longest
    print(f"longest function: {name} ({length} lines)")
    print(f"function-level siamae imports: {len(figures.inner_imports)}")
    for line in figures.inner_imports:
        print(f"  {line}")


def top_room(module: str) -> str:
    """``siamae.eval.probes.knn`` -> ``eval``; the package itself is ``siamae``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


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
