"""Import arrows point down: launch/ -> ultrathink_jax/, never back, and no two package modules import each other.

Read from the source (imports inside functions included), so a lazy import counts as much as a top-level one.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ultrathink_jax"
CLI_PACKAGES = ("launch",)  # the repository-root command lines


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement and every import_module("...") / __import__("...") call."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args:
            arg = node.args[0]
            text = arg.value if isinstance(arg, ast.Constant) else (
                arg.values[0].value if isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant)
                else None)
            if isinstance(text, str):
                found.append((node.lineno, text))
    return found


def package_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"only {len(files)} files under {PACKAGE}"
    return files


def test_no_package_module_imports_the_command_lines():
    offenders = sorted({f"{path.relative_to(PACKAGE.parent)}:{line} imports {name.split('.')[0]}"
                        for path in package_files() for line, name in imported_names(path)
                        if name.split(".")[0] in CLI_PACKAGES})
    assert not offenders, "ultrathink_jax must not depend on launch/:\n" + "\n".join(offenders)


def test_the_layering_check_sees_lazy_and_dynamic_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from launch.common import x\n    import launch.eval\n"
                 "    importlib.import_module(f'launch.{name}')\n")
    assert [name.split(".")[0] for _, name in imported_names(f)] == ["launch"] * 4


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_package_modules():
    """Package __init__ files re-export their modules (an arrow up by design) and are left out; every other
    arrow is a module that needs another one, and those must form no cycle (data/pipeline <-> data/streaming was
    one, broken with a lazy import)."""
    modules = {module_name(p): p for p in package_files() if p.name != "__init__.py"}
    graph = {name: {m for _, m in imported_names(path) if m in modules and m != name}
             for name, path in modules.items()}
    assert import_cycle(graph) is None, f"import cycle: {' -> '.join(import_cycle(graph))}"


def test_the_cycle_check_finds_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set()}) is None
