"""Fuzzing with Hypothesis: a short, seeded run in the default test run, a long one on demand.

Default (``./scripts/test``): every target runs a fixed, derandomized set of examples
(seconds in all). Long (``scripts/fuzz --long``, or ``VHOSTD_FUZZ=long``): random
examples, ``VHOSTD_FUZZ_EXAMPLES`` per target (default 20000), and a report of the
inputs each target tried. A failing example is printed by Hypothesis (with the
``@reproduce_failure`` line to replay it); docs/fuzzing.md says how a finding becomes
a regression test.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import pytest
from fuzz_support import CATCHER, INPUTS
from hypothesis import HealthCheck, Phase, settings

LONG = os.environ.get("VHOSTD_FUZZ", "") == "long"
EXAMPLES = int(os.environ.get("VHOSTD_FUZZ_EXAMPLES", "20000"))

_common = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much,
                              HealthCheck.function_scoped_fixture],
}
settings.register_profile("ci", max_examples=150, derandomize=True, **_common)
# VHOSTD_FUZZ_SHRINK=0: report a failing example as found, without shrinking it
# (shrinking can take minutes; for campaigns that should keep going).
_phases = ((Phase.explicit, Phase.reuse, Phase.generate)
           if os.environ.get("VHOSTD_FUZZ_SHRINK", "1") == "0" else tuple(Phase))
settings.register_profile("long", max_examples=EXAMPLES, derandomize=False,
                          print_blob=True, phases=_phases, **_common)
settings.load_profile("long" if LONG else "ci")

_started = time.monotonic()


@pytest.fixture(autouse=True, scope="session")
def quiet_and_watchful() -> Iterator[None]:
    """Hostile input makes vhostd log a lot: keep only the records with a traceback,
    which the targets turn into failures."""
    logger = logging.getLogger("vhostd")
    old = (logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(CATCHER)
    yield
    logger.removeHandler(CATCHER)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not INPUTS:
        return
    took = time.monotonic() - _started
    report = os.environ.get("VHOSTD_FUZZ_REPORT")
    if report:  # scripts/fuzz --long adds up the rounds
        with open(report, "a") as f:
            f.write(json.dumps({"seconds": took, "inputs": dict(INPUTS)}) + "\n")
    tr = terminalreporter
    tr.section(f"fuzzing ({'long' if LONG else 'short, seeded'})")
    for target, (examples, inputs) in sorted(INPUTS.items()):
        tr.write_line(f"{target:<28} {examples:>9} examples {inputs:>10} inputs")
    total_e = sum(e for e, _ in INPUTS.values())
    total_i = sum(i for _, i in INPUTS.values())
    tr.write_line(f"{'total':<28} {total_e:>9} examples {total_i:>10} inputs in {took:.0f} s")
