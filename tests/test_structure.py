"""The shape of the code: layers, import cycles, and what the installed package holds.

Imports are read from the source (every ``import``, also inside functions and under
``if TYPE_CHECKING``), so a cycle hidden from the interpreter still counts.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"vhostd": ROOT / "vhostd", "vhostd_proto": ROOT / "proto"}

# Lower layers never import higher ones (docs/architecture.md, "Layers").
LAYERS = {
    "vhostd_proto": 0,
    "vhostd.core": 1,
    "vhostd.engine": 2,
    "vhostd.storage": 3,
    "vhostd.vhost_user": 4,
    "vhostd.devices": 5,
    "vhostd.shell": 6,
    "vhostd.cli": 7,
    "vhostd.__main__": 8,
    "vhostd.frontend": 9,
    "vhostd.tools": 10,
}


def modules() -> dict[str, Path]:
    out = {}
    for top, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [top, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (the module, or its package's __init__)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len,
               default=None)
    assert best is not None, f"{name} is in no layer"
    return LAYERS[best]


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m not in g:
                continue
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m):], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_runs_up_a_layer() -> None:
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})"
             for a, deps in graph().items() for b in deps
             if not b.startswith(a.partition(".")[0] + "._") and layer(b) > layer(a)
             and not (a.startswith("vhostd.") and b == "vhostd")]
    assert not wrong, "\n".join(wrong)


def test_the_owner_knows_members_only_through_member() -> None:
    deps = graph()["vhostd.devices.owner"]
    assert "vhostd.vhost_user.member" in deps
    assert not {"vhostd.vhost_user.handler", "vhostd.vhost_user.placement"} & deps


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="not a source checkout")
def test_the_wheel_holds_no_guest_harness(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("vhostd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vhostd/cli.py" in names and "vhostd_proto/device_parts.py" in names
    assert "vhostd/tools/admin_cli.py" in names and "vhostd/frontend/client.py" in names
    harness = [n for n in names if "testbed" in n or "guest_scripts" in n
               or n.endswith(("/guest.py", "/qemu.py", "/demo.py")) or n.endswith(".sh")]
    assert not harness, harness


def test_vhostd_admin_works_without_qemu_qmp() -> None:
    code = ("import sys; sys.modules['qemu'] = None; sys.modules['qemu.qmp'] = None; "
            "sys.argv = ['vhostd-admin', '--help']; "
            "from vhostd.tools.admin_cli import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "usage: vhostd-admin" in r.stdout
