"""The house rules, kept by a test: imports point down the layers, and no module imports
itself back through others. Every import is read with ``ast``, those inside functions
(lazy) and under ``TYPE_CHECKING`` too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deepseek_mini"

# Floor of each top-level module or sub-package; a module may import its own floor or
# below. The package's face (__init__) and the CLI are on top.
FLOORS = {
    "errors": 0, "files": 0, "threads": 0, "progress": 0, "allocator": 0, "console": 0,
    "memory": 0,
    "config": 1,
    "checkpoint": 2,
    "model": 3, "data": 3,
    "inference": 4, "evaluation": 4, "instruct_eval": 4, "expert_usage": 4, "plotting": 4,
    "interop": 5,
    "train": 6, "serve": 6,
    "cli": 7, "__main__": 7,
    "__init__": 8,
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, root: Path) -> set[str]:
    """The package modules ``path`` imports, as dotted names below the package ``root``."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "deepseek_mini":
                target = node.module.split(".")[1:]
            else:
                continue
            stem = ".".join(target)
            for alias in node.names:  # ``from . import x`` may name a module
                sub = f"{stem}.{alias.name}" if stem else alias.name
                found.add(sub if (root / (sub.replace(".", "/") + ".py")).exists()
                          or (root / sub.replace(".", "/")).is_dir() else stem)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names
                         if a.name.startswith("deepseek_mini."))
    found.discard("")
    found.discard(name)
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, root): imports(p, root) for p in root.rglob("*.py")}


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_every_module_has_a_floor():
    assert {m.split(".")[0] for m in graph()} <= set(FLOORS)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [f"{source} -> {target}" for source, targets in sorted(edges.items())
            for target in sorted(targets) if floor(target) > floor(source)]


def loops(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    found: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                found.append(" -> ".join(path[path.index(target):] + [target]))
            elif target in edges and not state.get(target):
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if not state.get(module):
            visit(module, [module])
    return found


def test_imports_point_down():
    upward = upward_imports(graph())
    assert not upward, "imports of a higher layer: " + ", ".join(upward)


def test_nothing_below_the_cli_imports_it():
    into_cli = [f"{source} -> {target}" for source, targets in sorted(graph().items())
                for target in targets if target.startswith("cli")
                and not source.startswith(("cli", "__main__"))]
    assert not into_cli, ", ".join(into_cli)


def test_no_import_loops():
    found = loops(graph())
    assert not found, "import loops: " + "; ".join(found)


def test_the_checks_find_a_lazy_upward_import_and_a_loop(tmp_path):
    """The checks above can fail: in a made-up package, a lazy import of the CLI from the
    model and a loop through a TYPE_CHECKING import are both found and named."""
    (tmp_path / "model").mkdir()
    (tmp_path / "cli").mkdir()
    (tmp_path / "model" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
        "def f():\n    from ..cli import main\n")
    (tmp_path / "model" / "b.py").write_text("from .a import f\nB = 1\n")
    (tmp_path / "cli" / "main.py").write_text("from ..model.a import f\n")
    edges = graph(tmp_path)
    assert upward_imports(edges) == ["model.a -> cli.main"]
    assert loops(edges) == ["cli.main -> model.a -> cli.main", "model.a -> model.b -> model.a"]
