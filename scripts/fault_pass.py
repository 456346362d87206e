#!/usr/bin/env python
"""A fault-injection pass over the lift3d command line: bad inputs and faults, each run as a subprocess
the way a user would, classified and counted in a table.

    python scripts/fault_pass.py [--only WORD] [--inputs] [--keep DIR]

The cases are issue 14's (tests/faultcases.py, also run by tests/test_faults.py), the extras of
tests/fault_extras.py and issue 26's numbers, files and outputs (tests/fault_inputs.py).
A case is *clean* when it ends with the expected exit code and one stderr line that says the right thing,
without a traceback and without losing a good file. Exit code 0 when every case is clean.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from faultcases import CASES, Workspace, run_case, verdict  # noqa: E402
from fault_extras import EXTRA_CASES  # noqa: E402
from fault_inputs import INPUT_CASES  # noqa: E402

COLUMNS = ("clean", "traceback", "wrong exit", "multi-line", "misleading", "lost")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the cases whose name contains this word")
    p.add_argument("--inputs", action="store_true", help="run only issue 26's numbers/files/outputs cases")
    p.add_argument("--keep", default=None, help="work in this folder (kept) instead of a temporary one")
    a = p.parse_args()
    root = a.keep or tempfile.mkdtemp(prefix="lift3d-faults-")
    ws = Workspace(os.path.join(root, "ws")).build()
    inputs = {id(c) for c in INPUT_CASES}
    cases = [c for c in (INPUT_CASES if a.inputs else CASES + EXTRA_CASES + INPUT_CASES)
             if a.only.lower() in c.name.lower()]
    counts = {group: dict.fromkeys(COLUMNS, 0) for group in ("issue 14", "extra", "issue 26 inputs")}
    bad = 0
    for i, case in enumerate(cases):
        outcome = run_case(ws, case, os.path.join(root, f"case{i:03d}"))
        v = verdict(case, outcome)
        counts["issue 14" if case.listed else "issue 26 inputs" if id(case) in inputs else "extra"][v] += 1
        bad += v != "clean"
        first = outcome.lines[-1] if outcome.lines else ""
        print(f"{v:<11} exit {outcome.code:<4} {outcome.seconds:5.1f}s  {case.name}: {first[:150]}"
              + (f"  [LOST: {outcome.lost}]" if outcome.lost else ""), flush=True)
        if v == "traceback" and os.environ.get("FAULT_PASS_VERBOSE"):
            print(outcome.stderr)
    print()
    print("| cases | tried | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    total = dict.fromkeys(COLUMNS, 0)
    for group, c in counts.items():
        print(f"| {group} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in COLUMNS) + " |")
        for k in COLUMNS:
            total[k] += c[k]
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[k]) for k in COLUMNS) + " |")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
