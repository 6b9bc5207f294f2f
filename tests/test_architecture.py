"""The shape of the code: no import cycle anywhere in the package, and a torch-free settings
module (the command line's options and the run directory's keys need no deep-learning stack)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mfv"
TESTS = Path(__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every explicit import of an mfv module by an mfv module: at module level, inside
    functions, and under `if TYPE_CHECKING:` alike (a package's own `__init__` that Python runs
    before a submodule is not an edge: it is not an import the submodule wrote)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == \
                    "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                targets = [node.args[0].value]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
        if name == "mfv":  # the package's lazy exports: `_EXPORTS` names its modules
            exports = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Dict)]
            for d in exports:
                graph[name] |= {v.value for v in d.values if isinstance(v, ast.Constant)
                                and v.value in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 25 and "mfv.runtime.pipeline" in graph["mfv"]  # the walk sees the package
    assert "mfv.runtime.rundir" in graph["mfv.runtime.pipeline"]
    assert "mfv.models.activations" in graph["mfv.scan.scanner"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_settings_and_the_cli_parser_import_no_torch_nor_scikit_learn():
    light = ("import sys, mfv.runtime.settings, mfv.scan.options, mfv.facets.options, "
             "mfv.evaluate.options, mfv.cli; mfv.cli.build_parser(); ")
    code = (f"{light} heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', "
            "'sklearn')); assert not heavy, heavy; "
            "import mfv.runtime.rundir, mfv.models.targets, mfv.render.recipes; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)
    help_text = subprocess.run([sys.executable, "-X", "importtime", "-m", "mfv.cli", "--help"],
                               capture_output=True, text=True, check=True)
    loaded = {line.split("|")[-1].strip() for line in help_text.stderr.splitlines()}
    assert "usage: mfv" in help_text.stdout and not loaded & {"torch", "sklearn"}


def imported_names(source: str) -> set[str]:
    """The top-level module names a file imports, anywhere in it (`import a.b` and `from a.b
    import c` name `a`; `importlib.import_module("a")` too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # `from . import a` (tests/ is no package)
            names |= ({node.module.split(".")[0]} if node.module else
                      {alias.name for alias in node.names})
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_no_test_module_imports_another():
    """Test modules share code only through conftest.py: a test module that imports another
    runs that one's imports and ties the two together (moving or renaming one breaks the
    other). A module of tests/ other than conftest.py is a test module here."""
    local = {p.stem for p in TESTS.glob("*.py")} - {"conftest"}
    found = {p.name: sorted(imported_names(p.read_text()) & local)
             for p in sorted(TESTS.glob("test_*.py"))}
    assert len(found) > 30 and "conftest" in imported_names((TESTS / "test_sweep.py")
                                                            .read_text())  # the walk sees them
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_the_import_finder_sees_every_form():
    source = ("import test_a\nfrom test_b import x\nfrom conftest import y\nimport os.path\n"
              "def f():\n    import test_c.sub\n    importlib.import_module('test_d')\n"
              "from . import test_e\n")
    assert imported_names(source) == {"test_a", "test_b", "conftest", "os", "test_c", "test_d",
                                      "test_e"}
