"""The package's import rule and privacy rule, checked on the source (AST), not by convention.

Imports point one way: ``fidelity`` → {``sim``, ``profiler``} → the profile format (``specbatch.sim.profile``).
``sim`` imports neither ``profiler``, ``fidelity`` nor ``dashboards``; ``profiler`` imports only the profile
format from ``sim``. No module reads another module's underscored names: an underscored attribute used in a
file must be defined in that file. One adapter module owns SimPy's internals (:data:`SIMPY_ADAPTER`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"sim": REPO / "sim", "profiler": REPO / "profiler", "fidelity": REPO / "fidelity",
            "dashboards": REPO / "dashboards", "specbatch": REPO / "specbatch"}
SIMPY_ADAPTER = "sim/simpy_adapter.py"  # the one file allowed to reach into SimPy's underscored names
# underscored names that are documented public API: os._exit, and namedtuple's methods (underscored so that
# they cannot clash with field names)
DOCUMENTED = {"_exit", "_replace", "_asdict", "_fields", "_make", "_field_defaults"}

# package -> the specbatch modules it may import (prefixes); anything else under specbatch. is a wrong way
ALLOWED = {
    "specbatch": ("specbatch",),  # the data helpers (conf_dir, traces_dir): imported by everyone, import nobody
    "sim": ("specbatch.sim", "specbatch"),
    "profiler": ("specbatch.profiler", "specbatch.sim.profile", "specbatch"),
    "fidelity": ("specbatch.fidelity", "specbatch.sim", "specbatch.profiler", "specbatch"),
    "dashboards": ("specbatch.dashboards", "specbatch.sim", "specbatch"),
}


def sources():
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            yield pkg, path


def is_module(name: str) -> bool:
    """Whether ``specbatch.<pkg>.<mod>`` names a module file of this checkout."""
    parts = name.split(".")
    return len(parts) == 3 and parts[1] in PACKAGES and (PACKAGES[parts[1]] / f"{parts[2]}.py").is_file()


def imported(path: Path, pkg: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative imports resolved, and
    ``from specbatch.sim import profile`` read as ``specbatch.sim.profile``."""
    here = "specbatch" if pkg == "specbatch" else f"specbatch.{pkg}"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # the packages are one level deep: `from .x` is here.x
                base = f"{here}.{base}" if base else here
            out += [(node.lineno, f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base)
                    for a in node.names]
    return out


def test_top_level_names_are_not_imported_bare():
    bad = [f"{p.relative_to(REPO)}:{line}: {name}" for pkg, p in sources() for line, name in imported(p, pkg)
           if name.split(".")[0] in ("sim", "profiler", "fidelity", "dashboards")]
    assert not bad, "import through the specbatch namespace:\n" + "\n".join(bad)


def test_imports_point_one_way():
    bad = []
    for pkg, path in sources():
        for line, name in imported(path, pkg):
            if name.split(".")[0] != "specbatch" or name == "specbatch":
                continue
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED[pkg] if a != "specbatch") \
                    and name.split(".")[1] in ("sim", "profiler", "fidelity", "dashboards"):
                bad.append(f"{path.relative_to(REPO)}:{line}: {pkg} imports {name}")
    assert not bad, "wrong-way imports:\n" + "\n".join(bad)


def defined_underscored(tree: ast.AST) -> set[str]:
    """Underscored names a file defines: functions, classes, assigned attributes and names, __slots__."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            names.add(node.attr)  # (assigning another object's underscored attribute is a use, not a definition)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
            names.add(node.value)  # __slots__ entries
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    own = defined_underscored(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            bad += [f"{node.lineno}: imports {a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr not in own and node.attr not in DOCUMENTED:
                bad.append(f"{node.lineno}: .{node.attr}")
    return bad


@pytest.mark.parametrize("path", [p for _, p in sources()], ids=lambda p: str(p.relative_to(REPO)))
def test_no_other_modules_underscored_names(path):
    if str(path.relative_to(REPO)) == SIMPY_ADAPTER:
        return
    bad = private_uses(path)
    assert not bad, f"{path.relative_to(REPO)} uses underscored names it does not define:\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The privacy check flags a foreign underscored attribute and import, and accepts a file's own."""
    f = tmp_path / "m.py"
    f.write_text("from x import _hidden\nimport simpy\nclass A:\n    def _mine(self):\n        return 1\n"
                 "def g(env, a, p):\n    env._queue.append(1)\n    p._target = a\n    return a._mine()\n")
    assert sorted(private_uses(f)) == ["1: imports _hidden", "7: ._queue", "8: ._target"]
