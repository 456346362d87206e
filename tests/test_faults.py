"""Issue 14's fault-injection cases, each driving the real command line in a subprocess
(``python launch.py ...`` / ``python -m lift3d ...``; cases in tests/faultcases.py).

Every case must end with its exit code (2 for a user error) and one stderr line that names the problem,
without a traceback; the data-loss cases also check that the good files survive (a finite checkpoint,
an untouched finished trial, no stub folder, no orphan temporary files). ``scripts/fault_pass.py``
runs these and more and prints the counts.
"""

import pytest

from faultcases import CASES, Workspace, run_case, verdict


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One trained tiny trial shared by the cases (they copy it before writing into it)."""
    return Workspace(str(tmp_path_factory.mktemp("faults"))).build()


@pytest.mark.parametrize("case", [c for c in CASES if c.in_test], ids=lambda c: c.name)
def test_fault_is_one_clear_line_and_loses_nothing(ws, case, tmp_path):
    outcome = run_case(ws, case, str(tmp_path))
    assert not outcome.lost, outcome.lost
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.code == case.expect, outcome.stderr
    if case.expect != 0:
        assert len(outcome.lines) == 1, outcome.stderr
        assert case.message.lower() in outcome.lines[0].lower(), outcome.lines[0]
        assert not case.avoid or case.avoid.lower() not in outcome.lines[0].lower(), outcome.lines[0]
    assert verdict(case, outcome) == "clean"
