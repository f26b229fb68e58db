"""The package's layers, read from the source with `ast` (every import, function-level ones included).

core (configuration_simmim, modeling_simmim, masking, backbones, errors, cli, visualization)
  <- data/ <- publish/ <- pretrain/, eval/ <- scripts/
A module imports only from its own layer or lower ones, pretrain/ and eval/ never import each other, and no chain of
imports comes back to where it started. `simmim_hf/__init__.py` is the public facade: it may import any layer, and any module may read `__version__` from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "simmim_hf"
LAYERS = {"core": 0, "data": 1, "publish": 2, "pretrain": 3, "eval": 3}
# Files saved beside every checkpoint as Hub remote code: they may import only each other (relatively), torch and
# transformers, since the machine that loads them may not have simmim_hf.
REMOTE_CODE = {
    "simmim_hf.configuration_simmim",
    "simmim_hf.modeling_simmim",
    "simmim_hf.backbones",
    "simmim_hf.sparse_masking",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every `simmim_hf` module that `path` imports, anywhere in the file, relative imports resolved."""
    name = module_name(path, package)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from simmim_hf.data import stream` imports the module simmim_hf.data.stream
            found.update(f"{module}.{alias.name}" for alias in node.names)
    modules = {module_name(p, package) for p in package.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "core"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(path, package): imported_modules(path, package) for path in sorted(package.rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        if module == "simmim_hf":  # the facade
            continue
        for target in sorted(targets):
            if target == "simmim_hf":  # `from simmim_hf import __version__`; a cycle through it is still caught
                continue
            own, other = layer_of(module), layer_of(target)
            if LAYERS[other] > LAYERS[own] or (LAYERS[other] == LAYERS[own] and own != other):
                problems.append(f"{module} ({own}) imports {target} ({other})")
    return problems


def test_checker_finds_a_cycle_and_an_upward_import():
    # The checks below only mean something if they can fail.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = {"simmim_hf.data.stream": {"simmim_hf.pretrain.run"}, "simmim_hf.eval.run": {"simmim_hf.pretrain.run"}}
    assert layer_violations(graph) == [
        "simmim_hf.data.stream (data) imports simmim_hf.pretrain.run (pretrain)",
        "simmim_hf.eval.run (eval) imports simmim_hf.pretrain.run (pretrain)",
    ]


def test_imports_are_read_from_the_source(tmp_path):
    package = tmp_path / "simmim_hf"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "images.py").write_text("")
    (package / "data" / "stream.py").write_text(
        "from . import images\n\ndef f():\n    from ..errors import x\n    import simmim_hf.data.images\n"
    )
    assert imported_modules(package / "data" / "stream.py", package) == {
        "simmim_hf.data",
        "simmim_hf.data.images",
        "simmim_hf.errors",
    }


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_every_import_points_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_subpackages_are_plain_namespaces():
    # An __init__ that imports its modules would make `import simmim_hf.data.x` load the whole layer.
    for layer in LAYERS:
        if layer != "core":
            init = PACKAGE / layer / "__init__.py"
            assert imported_modules(init) == set(), init


@pytest.mark.parametrize("module", sorted(REMOTE_CODE))
def test_remote_code_imports_only_its_own_files(module):
    path = PACKAGE / (module.split(".", 1)[1].replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert f"simmim_hf.{node.module}" in REMOTE_CODE, f"{module} imports .{node.module}"
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                assert name.split(".")[0] != "simmim_hf", f"{module} imports {name} (remote code has no simmim_hf)"
