"""The package's import graph: layers only import downwards, no cycles, no private names across
modules. Walks the ``ast`` of every module (imports inside functions included)."""
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import bct_fast

# Layer of each module, lowest first (README "Layers"). A module may import its own layer or below.
LAYERS = {
    "foundation": 0,  # bct_fast._version, bct_fast._core.*
    "ops": 1,         # bct_fast.ops.*
    "api": 2,         # bct_fast (root), losses, search, gallery, metrics, evaluate, train, ...
    "apps": 3,        # demo, cli, compat_command
}
APPS = {"bct_fast.demo", "bct_fast.cli", "bct_fast.compat_command"}


def layer_of(module: str) -> int:
    if module == "bct_fast._version" or module.startswith("bct_fast._core"):
        return LAYERS["foundation"]
    if module == "bct_fast.ops" or module.startswith("bct_fast.ops."):
        return LAYERS["ops"]
    return LAYERS["apps"] if module in APPS else LAYERS["api"]


def package_modules() -> dict[str, Path]:
    root = Path(bct_fast.__file__).parent
    mods = {"bct_fast": root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix="bct_fast."):
        spec = importlib.util.find_spec(info.name)
        if spec.origin and spec.origin.endswith(".py"):
            mods[info.name] = Path(spec.origin)
    return mods


def imports_of(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every bct_fast import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "bct_fast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bct_fast":
                continue
            names = [a.name for a in node.names]
            # `from bct_fast.ops import topk` imports a submodule: count it as that module
            subs = [f"{target}.{n}" for n in names if importlib.util.find_spec(f"{target}.{n}") is not None] \
                if importlib.util.find_spec(target).submodule_search_locations else []
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in subs]
            if rest or not subs:  # `from pkg import submodule` alone is no edge to pkg's __init__
                out.append((target, rest, node.lineno))
    return out


MODULES = package_modules()
GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def test_every_module_imports():
    for m in MODULES:
        importlib.import_module(m)
    assert {"bct_fast.ops", "bct_fast.ops.topk", "bct_fast._core.checks", "bct_fast.search"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    for target, _, line in GRAPH[module]:
        if target == "bct_fast._C":
            continue  # the binding: below every Python layer
        assert layer_of(target) <= layer_of(module), \
            f"{module}:{line} imports {target} from a higher layer"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module):
    for target, names, line in GRAPH[module]:
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module}:{line} imports private {private} from {target}"


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ re-exporting its submodules is not a cycle with them: a submodule
    # importing its own package's public name would be, and is checked like any other edge.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """Negative control: the walker reports an upward import and a private name."""
    f = tmp_path / "mod.py"
    f.write_text("from bct_fast.losses import _private_thing\nimport bct_fast.cli\n")
    found = imports_of("bct_fast.ops.fake", f)
    targets = {t for t, _, _ in found}
    assert {"bct_fast.losses", "bct_fast.cli"} <= targets
    assert any(layer_of(t) > layer_of("bct_fast.ops.fake") for t in targets)
    assert any(n.startswith("_") for _, names, _ in found for n in names)
