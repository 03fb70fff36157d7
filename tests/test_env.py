"""The process environment flywheel sets up for itself: glibc malloc tuned for CPU training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# In a fresh interpreter: malloc 24 MB, note how many more bytes glibc has mmap'ed, free it, note how much freed
# memory the heap kept at its top (mallinfo2: hblkhd = mmap'ed bytes, keepcost = releasable top of heap).
PROBE = """
import ctypes, json, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = None
if sys.argv[1] == "tuned":
    from flywheel.env import keep_freed_memory
    tuned = keep_freed_memory()
before = libc.mallinfo2().hblkhd
p = libc.malloc(24 << 20)
mmapped = libc.mallinfo2().hblkhd - before
libc.free(p)
print(json.dumps({"tuned": tuned, "mmapped": mmapped, "kept": libc.mallinfo2().keepcost}))
"""


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=60)
    return json.loads(out.stdout)


def test_keep_freed_memory_moves_large_blocks_to_the_heap_and_keeps_them_after_free():
    default, tuned = _probe("default"), _probe("tuned")
    assert default["mmapped"] >= 24 << 20  # glibc's default: a fresh 24 MB block is its own mmap ...
    assert tuned["tuned"] is True
    assert tuned["mmapped"] == 0  # ... tuned, it comes from the heap
    assert tuned["kept"] >= 24 << 20  # and freeing it keeps the pages for the next step instead of trimming


def test_a_users_malloc_variables_win_over_keep_freed_memory():
    # glibc read the user's 1 MB threshold at start-up; keep_freed_memory must not raise it to 32 MB
    user = _probe("tuned", MALLOC_MMAP_THRESHOLD_=str(1 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    assert user["mmapped"] >= 24 << 20
