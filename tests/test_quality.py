"""The code stays as STYLE.md asks: ruff clean and mypy clean (run as part of the suite)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "gitpipe", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "gitpipe"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The gitpipe modules `module` imports anywhere: at the top, under TYPE_CHECKING, or inside a
    function (a late import is still a dependency: it only moves when the cycle bites)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..models import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    deps = set()
    for name in found:
        while name and name not in modules:  # gitpipe.deploy.ssh.Peer -> gitpipe.deploy.ssh
            name = name.rpartition(".")[0]
        if name and name != module:
            deps.add(name)
    return deps


def import_cycles(root: Path) -> list[list[str]]:
    """Every cycle of imports among the modules of the package at `root`, as a path a -> ... -> a."""
    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {m: _imports_of(p, m, set(files)) for m, p in files.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycles.append(trail[trail.index(module):] + [module])
            return
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, trail + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return cycles


def test_no_module_of_gitpipe_imports_itself_back() -> None:
    # Dependencies point one way (STYLE.md): delivery gets a narrow RunContext from the
    # scheduler instead of importing it back, and so on.
    cycles = import_cycles(ROOT / "gitpipe")
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.c import X\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..a import g\n")
    (pkg / "d.py").write_text("import pkg.a\n")  # into the cycle, not part of it
    assert import_cycles(pkg) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
