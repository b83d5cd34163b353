"""The shape the architecture promises: imports run handlers -> hub, never back; inside hub/
the runtime imports form no cycle (imports under TYPE_CHECKING are for the type checker only
and are not counted); the core imports nothing of Tornado."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (what sits under `if TYPE_CHECKING:` is skipped)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def modules(package: str) -> dict[str, set[str]]:
    return {
        f"{package}.{p.stem}": runtime_imports(p)
        for p in sorted((ROOT / package).glob("*.py"))
        if p.stem != "__init__"
    }


def test_the_core_never_imports_the_handlers_or_tornado():
    for name, imports in modules("hub").items():
        assert not {i for i in imports if i.split(".")[0] in ("handlers", "tornado")}, name


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a module graph, as the path that closes it; None if there is none."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return [*path, module, dep]
            if dep not in state:
                found = visit(dep, [*path, module])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [])
            if found:
                return found
    return None


def test_the_cores_runtime_imports_have_no_cycle():
    graph = {m: {i for i in deps if i.startswith("hub.")} for m, deps in modules("hub").items()}
    assert len(graph) >= 10  # the walk saw the package
    assert find_cycle(graph) is None


def test_the_checks_can_fail(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hub.a import y\n"
    (tmp_path / "c.py").write_text(guarded + "from hub.b import x\n")
    assert runtime_imports(tmp_path / "c.py") == {"typing", "hub.b"}
