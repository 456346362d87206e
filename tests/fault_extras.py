"""The fault pass's cases beyond issue 14's (scripts/fault_pass.py); see tests/faultcases.py."""
from faultcases import Case

EXTRA_CASES: list = []
