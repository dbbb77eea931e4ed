"""The QEMU selection of the harness: the chardev reconnect form per version, the two
sets of qemu-configs/, and the form chosen for each installed QEMU accepted by it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from testbed.qemu_select import (
    CONFIGS,
    CONFIGS_BEFORE_RECONNECT_MS,
    SYSTEM,
    configs_dir,
    find_program,
    reconnect_option,
    version,
)


def test_reconnect_option_by_version() -> None:
    assert reconnect_option(1, (7, 2, 22)) == "reconnect=1"
    assert reconnect_option(2, (9, 1, 3)) == "reconnect=2"
    assert reconnect_option(1, (9, 2, 0)) == "reconnect-ms=1000"
    assert reconnect_option(1, (10, 0, 2)) == "reconnect-ms=1000"
    assert configs_dir((7, 2, 22)) == CONFIGS_BEFORE_RECONNECT_MS
    assert configs_dir((10, 0, 2)) == CONFIGS


def _sections(path: Path) -> dict[str, dict[str, str]]:
    """A QEMU -readconfig file as {'[type "id"]': {key: value}} (comments left out)."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = out.setdefault(line, {})
            continue
        m = re.fullmatch(r'([\w-]+)\s*=\s*"(.*)"', line)
        assert m, f"{path}: {line!r}"
        current[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.cfg")))
def test_config_variants_differ_only_in_the_reconnect_form(name: str) -> None:
    current = _sections(CONFIGS / name)
    older = _sections(CONFIGS_BEFORE_RECONNECT_MS / name)
    assert current.keys() == older.keys()
    seen = 0
    for section, values in current.items():
        if "reconnect-ms" in values:
            seen += 1
            assert int(values.pop("reconnect-ms")) == int(older[section].pop("reconnect")) * 1000
        assert values == older[section], section
    assert seen, f"{name} has no chardev with reconnect-ms"


def _installed_qemus() -> list[str]:
    found = {p for p in (find_program(SYSTEM), "/opt/vhostd-qemu10/bin/qemu-system-x86_64")
             if p and Path(p).exists()}
    return sorted(found)


@pytest.mark.parametrize("qemu", _installed_qemus())
def test_the_chosen_reconnect_form_is_accepted_and_not_deprecated(qemu: str,
                                                                   tmp_path: Path) -> None:
    """The form the harness picks for this QEMU, given over QMP (where QEMU enforces its
    deprecation policy) with deprecated input rejected: it must be taken."""
    key, value = reconnect_option(1, version(qemu)).split("=")
    backend = {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": str(tmp_path / "absent.sock")}},
        "server": False, key: int(value)}}
    commands = [{"execute": "qmp_capabilities"},
                {"execute": "chardev-add", "arguments": {"id": "c0", "backend": backend}},
                {"execute": "quit"}]
    r = subprocess.run([qemu, "-compat", "deprecated-input=reject", "-machine", "none",
                        "-nodefaults", "-display", "none", "-qmp", "stdio"],
                       input="\n".join(json.dumps(c) for c in commands) + "\n",
                       capture_output=True, text=True, timeout=60)
    replies = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    answers = [x for x in replies if "return" in x or "error" in x]
    assert len(answers) >= 2, r.stdout + r.stderr
    assert "error" not in answers[1], answers[1]
