"""The architecture's joints: layers point one way, no import cycles, a lazy command line."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("trainer", "services")      # folders of the repository: tribune.trainer, tribune.services


def _module_name(path: Path) -> str:
    parts = ["tribune", *path.relative_to(REPO).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Project modules imported by a file (module-level statements only, with top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.split(".")[:2] in [["tribune", p] for p in PACKAGES]}


def _files():
    return [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]


def test_services_never_import_trainer():
    """training → serving → shared base (tribune.services.common) and the generated protos."""
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p, False) if m.startswith("tribune.trainer"))
                 for p in (REPO / "services").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
    base = {str(p.relative_to(REPO)): sorted(m for m in _imports(p, False) if not m.startswith("tribune.services.common"))
            for p in (REPO / "services" / "common").rglob("*.py")}
    assert not {k: v for k, v in base.items() if v}, "the shared base imports only itself"


def test_no_module_level_import_cycle():
    graph = {_module_name(p): set() for p in _files()}
    for p in _files():
        for m in _imports(p, True):
            while m and m not in graph:          # `from a.b import c` where c is a name in a.b
                m = m.rpartition(".")[0]
            if m and m != _module_name(p):
                graph[_module_name(p)].add(m)
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("argv", [["gateway", "--help"], ["score", "--help"], ["serve", "--help"]])
def test_serving_commands_load_no_torch(argv):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tribune.trainer", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported, sorted(m for m in imported if "torch" in m)[:5]
    assert "--help" not in argv or "usage: tribune" in proc.stdout
