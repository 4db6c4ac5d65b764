"""profiler.host_memory: with it, memory freed by one step serves the next without page faults."""
import json
import subprocess
import sys

import pytest

from specbatch.profiler.host_memory import MMAP_THRESHOLD_BYTES, keep_freed_memory

# In a fresh interpreter: malloc + write 20 MiB, free, then malloc + write 20 MiB again; report the minor
# page faults of the second round. Raw libc calls, so no library's own caching or huge-page advice interferes.
PROBE = r"""
import ctypes, json, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
settings = None
if sys.argv[1] == "keep":
    from specbatch.profiler.host_memory import keep_freed_memory
    settings = keep_freed_memory()
size = 20 << 20
def touch():
    p = libc.malloc(size)
    libc.memset(p, 1, size)
    return p
libc.free(touch())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
libc.free(p)
print(json.dumps({"faults": faults, "pages": size // 4096, "settings": settings}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_block_is_reused_without_faults():
    if keep_freed_memory() is None:
        pytest.skip("the C library is not glibc")
    default, kept = probe("default"), probe("keep")
    assert kept["settings"]["mmap_threshold_bytes"] == MMAP_THRESHOLD_BYTES
    assert kept["settings"]["libc"].startswith("glibc ")
    # glibc's default maps the first block and, having raised its threshold on the free, grows the heap for the
    # second: every page faults again. With the fixed thresholds the second block is the first one, still mapped.
    assert default["faults"] > default["pages"] // 2, default
    assert kept["faults"] < kept["pages"] // 50, kept


def test_keep_freed_memory_is_idempotent_and_leaves_cuda_alone():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
    assert keep_freed_memory("cuda:0") is None
