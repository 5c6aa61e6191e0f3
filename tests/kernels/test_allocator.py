"""transduce/allocator.py: freed blocks are reused instead of faulted in afresh (glibc)."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
from transduce.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.empty(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(200):  # sizes that change every time, as a decoding step's do (1-2 MB)
    torch.ones(262144 + 1024 * i)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**env, "OMP_NUM_THREADS": "1"}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (elsewhere it does nothing)")
def test_kept_memory_is_reused_without_page_faults():
    kept, with_keep = faults("keep")
    assert kept == "True"
    _, without = faults("system")
    # fresh pages for every block (~256-460 pages each) without; the heap's own pages with
    assert without > 20_000 and with_keep < without / 10, (without, with_keep)


def test_environment_setting_takes_precedence(monkeypatch):
    from transduce.allocator import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert keep_freed_memory() is False
