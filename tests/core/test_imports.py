"""No import cycle among evd's modules.

The graph is read from the source (the AST), not from importing it: an edge
``a -> b`` for every runtime import in module ``a`` of a module ``b`` of the
same package, at any depth (imports inside functions count; imports under
``if TYPE_CHECKING:`` do not, they only serve annotations). ``from a.b import
c`` imports the module ``a.b.c`` when there is one, else ``a.b``; a package's
``__init__`` is the package's module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import evd

ROOT = Path(evd.__file__).parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements under ``node``, but those in ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:  # the else branch runs
                yield from _runtime_imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _runtime_imports(child)


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Each module of the package to the package's modules it imports at runtime."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = graph[name] = set()
        for stmt in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(stmt, ast.Import):
                targets.update(a.name for a in stmt.names if a.name in modules)
                continue
            base = stmt.module or ""
            if stmt.level:
                # Relative: level 1 is the module's own package.
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (stmt.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in stmt.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    targets.add(sub)
                elif base in modules:
                    targets.add(base)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None if it has none."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Iterative depth-first search; ``path`` holds the modules on the stack.
        path = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
                continue
            if nxt in on_path:
                return [*path[path.index(nxt):], nxt]
            if nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_evd_has_no_import_cycle() -> None:
    graph = module_graph(ROOT, "evd")
    assert "evd.edge.http" in graph and "evd.core.log" in graph  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_the_checker_finds_a_cycle_of_two_modules(tmp_path: Path) -> None:
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b.py": "def f():\n    from pkg import a\n    return a\nthing = 1\n",
    })
    graph = module_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_the_checker_finds_a_cycle_through_a_package_and_relative_imports(
    tmp_path: Path,
) -> None:
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from .impl import Impl\n",
        "sub/impl.py": "import pkg.user\nclass Impl: ...\n",
        "user.py": "from pkg.sub import Impl\n",
    })
    graph = module_graph(pkg, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.impl"}
    assert find_cycle(graph) == ["pkg.sub", "pkg.sub.impl", "pkg.user", "pkg.sub"]


def test_type_checking_imports_are_no_cycle(tmp_path: Path) -> None:
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import B\n",
        "b.py": (
            "from typing import TYPE_CHECKING\nimport typing\n"
            "if TYPE_CHECKING:\n    from pkg.a import A\n"
            "if typing.TYPE_CHECKING:\n    import pkg.a\n"
            "class B: ...\n"
        ),
    })
    graph = module_graph(pkg, "pkg")
    assert graph["pkg.b"] == set()
    assert find_cycle(graph) is None


#: What each part of evd may import at runtime (docs/architecture.md, "The map"):
#: lower layers never import higher ones. A module counts as the first of these
#: prefixes it starts with (the longest match); top-level modules not listed
#: (cli, supervisor, worker, __main__) may import anything.
ALLOWED: dict[str, set[str]] = {
    "evd.core": set(),
    "evd.core.log": {"evd.core"},
    "evd.core.log.embedded": {"evd.core", "evd.core.log"},
    "evd.core.log.kafka": {"evd.core", "evd.core.log"},
    # the kafka sink is a Kafka client: it shares the log's client options
    "evd.sinks": {"evd.core", "evd.core.log", "evd.core.log.kafka"},
    "evd.config": {"evd.core", "evd.sinks"},
    "evd.state": {"evd.core", "evd.core.log", "evd.config"},
    "evd.edge": {"evd.core", "evd.core.log", "evd.config"},
    "evd.bench": {"evd.core"},
    "evd.stages": {"evd.core", "evd.core.log", "evd.config", "evd.edge", "evd.sinks", "evd.state"},
    "evd.pipeline": {"evd.core", "evd.core.log", "evd.core.log.embedded", "evd.config", "evd.stages"},
    "evd.groups": {"evd.core", "evd.core.log", "evd.core.log.kafka", "evd.config", "evd.stages"},
    "evd.logtool": {"evd.core", "evd.core.log", "evd.core.log.embedded"},
}


def part_of(module: str) -> str | None:
    """The entry of ALLOWED that ``module`` belongs to (None: unrestricted)."""
    owners = [p for p in ALLOWED if module == p or module.startswith(p + ".")]
    return max(owners, key=len, default=None)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for each runtime import that crosses into a part not allowed."""
    bad = []
    for module, targets in sorted(graph.items()):
        part = part_of(module)
        if part is None:
            continue
        for target in sorted(targets):
            other = part_of(target)
            if other is not None and other != part and other not in ALLOWED[part]:
                bad.append(f"{module} -> {target}")
    return bad


def test_each_part_imports_only_the_layers_below_it() -> None:
    assert layer_violations(module_graph(ROOT, "evd")) == []


def test_the_layer_check_sees_a_core_module_importing_a_stage() -> None:
    graph = {"evd.core.schema": {"evd.sinks.rows"}, "evd.sinks.rows": {"evd.core.schema"}}
    assert layer_violations(graph) == ["evd.core.schema -> evd.sinks.rows"]
