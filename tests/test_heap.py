"""The mmap threshold (lift3d/utils/heap.py): freed mid-size tensors leave the process."""

import os
import subprocess
import sys

import pytest

from lift3d.utils import heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A ray chunk's pattern: transients of a few MiB, each followed by a small result that stays alive.
PATTERN = """
import sys, torch
from lift3d.utils.heap import set_mmap_threshold
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
print(set_mmap_threshold(float(sys.argv[1])))
big = torch.ones(6 * 2**20); del big       # a 24 MiB free: glibc's own threshold rises past 8 MiB
base = rss_mib()
blocks, kept = [], []
for _ in range(40):
    blocks.append(torch.ones(2 * 2**20))   # 8 MiB
    kept.append(torch.ones(16 * 2**10))    # 64 KiB
del blocks
print(rss_mib() - base)
"""


def resident_after_free(mib: float, env=None) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    out = subprocess.run([sys.executable, "-c", PATTERN, str(mib)], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(heap._glibc() is None, reason="glibc's malloc only")
def test_a_fixed_threshold_returns_freed_tensors(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    set_default, kept_default = resident_after_free(0)
    set_4, kept_4 = resident_after_free(4)
    assert not set_default and kept_default > 250       # 320 MiB freed, most of it still resident
    assert set_4 and kept_4 < 20
    # A threshold the user chose in the environment wins: lift3d leaves it as it is.
    set_env, _ = resident_after_free(4, {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)})
    assert not set_env
