"""Every call of a ``bct_fast._C`` function in the package matches that function's signature:
the number of arguments, and no float where the binding takes an integer (pybind11 refuses it).

Most of these calls run only on a GPU (their glue refuses CPU tensors first), so a mismatch
would first show up in a lease's test run and cost it its verification. This reads the calls
from the package's source (``<anything>.<binding name>(...)``) and the signatures from the
built extension's pybind11 docstrings. Not covered: the order of same-typed arguments (the
GPU tests and the emulator's twins check what the kernels compute) and calls through
``getattr`` (the tile checks; listed below so a new one is noticed)."""
import ast
import re
import sys
from pathlib import Path

import pytest

from bct_fast._core.extension import native

PACKAGE = Path(__file__).resolve().parents[2] / "bct_fast"
DYNAMIC = {"margin_fused_mma_tile_check", "margin_fused_pv_tile_check"}  # via getattr(native(), name)
_PARAM = re.compile(r"arg\d+: ([^,)]+(?:\| [^,)]+)*)")


def _signature(fn) -> list[str] | None:
    """Parameter kinds ("int" | "float" | "bool" | "other") from a pybind11 docstring's first
    line, ``name(arg0: typing.SupportsInt | ..., arg1: bool) -> None``; None if not pybind11's."""
    doc = (fn.__doc__ or "").splitlines()
    if not doc or "(" not in doc[0]:
        return None
    params = doc[0][doc[0].index("(") + 1:doc[0].rindex(")")]
    if not params.strip():
        return []
    kinds = []
    for t in _PARAM.findall(params):
        kinds.append("int" if "SupportsInt" in t or t.strip() == "int" else
                     "float" if "SupportsFloat" in t or t.strip() == "float" else
                     "bool" if t.strip() == "bool" else "other")
    return kinds


def _kind(arg: ast.expr) -> str:
    """What an argument expression evaluates to, where the source says so plainly."""
    if isinstance(arg, ast.Constant):
        return {bool: "bool", int: "int", float: "float"}.get(type(arg.value), "other")
    if isinstance(arg, ast.Call):
        f = arg.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name in ("float",):
            return "float"
        if name in ("int", "len", "data_ptr", "_ptr", "stream_of"):
            return "int"
        if name == "bool":
            return "bool"
    return "unknown"


def _binding_calls(names: set[str]) -> list[tuple[str, int, str, ast.Call]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
                calls.append((str(path.relative_to(PACKAGE.parent)), node.lineno, node.func.attr, node))
    return calls


def _bindings() -> dict[str, list[str]]:
    mod = native()
    if mod is None:
        pytest.fail("bct_fast._C does not import: the package was not built")
    out = {}
    for name in dir(mod):
        fn = getattr(mod, name)
        if not name.startswith("_") and callable(fn) and not isinstance(fn, type):
            sig = _signature(fn)
            if sig is not None:
                out[name] = sig
    return out


def test_every_binding_call_matches_its_signature():
    bindings = _bindings()
    calls = _binding_calls(set(bindings))
    assert calls, "no call of a bct_fast._C function found in the package"
    problems = []
    for where, line, name, node in calls:
        kinds = bindings[name]
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            problems.append(f"{where}:{line} {name}: keyword or starred arguments (pass them positionally)")
            continue
        if len(node.args) != len(kinds):
            problems.append(f"{where}:{line} {name}: {len(node.args)} arguments, the binding takes {len(kinds)}")
            continue
        for i, (arg, want) in enumerate(zip(node.args, kinds)):
            got = _kind(arg)
            if want == "int" and got == "float":
                problems.append(f"{where}:{line} {name}: argument {i} is a float, the binding takes an integer")
    assert not problems, "\n".join(problems)


def test_every_launcher_is_called_somewhere():
    """A binding no Python code calls (a stale name after a rename) or one reached only through
    getattr: the static check above would not see its calls."""
    bindings = _bindings()
    called = {name for _, _, name, _ in _binding_calls(set(bindings))}
    launchers = {n for n, kinds in bindings.items() if len(kinds) >= 5}  # pointer-taking launchers
    if not launchers:
        pytest.skip("a CPU-only build: no CUDA launchers to check")
    assert launchers - called == DYNAMIC & launchers


def test_the_checks_catch_a_wrong_call(tmp_path, monkeypatch):
    """Negative control: a call with one argument too few and one with a float for an integer."""
    bindings = _bindings()
    name = next(n for n, k in bindings.items() if len(k) >= 5 and k[1] == "int")
    kinds = bindings[name]
    args = ", ".join("1" for _ in kinds[:-1])
    wrong = ", ".join("float(1)" if i == 1 else "1" for i in range(len(kinds)))
    pkg = tmp_path / "bct_fast"
    pkg.mkdir()
    (pkg / "glue.py").write_text(f"def f(mod):\n    mod.{name}({args})\n    mod.{name}({wrong})\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError) as e:
        test_every_binding_call_matches_its_signature()
    assert f"{len(kinds) - 1} arguments, the binding takes {len(kinds)}" in str(e.value)
    assert "argument 1 is a float, the binding takes an integer" in str(e.value)
