"""Host memory for timed CPU work: memory a step frees stays in the process for the next step.

By default glibc's malloc hands freed memory back to the kernel: blocks above a threshold that it raises and
lowers as the program runs are mapped and unmapped one by one, and the top of the heap is trimmed. A step
that allocates after something freed memory then pays page faults to get it back (the kernel zeroes every
4 KiB page, counted as system time, and the pages arrive cold in the caches), and how many it pays depends
on what ran before it. Measured on this project's 2-core VM with Llama-68M shapes (`specbatch-validate`,
fixed γ = 4): a serving run whose batch changes shape every few iterations paid about 6,000 faults per
iteration, 4 % of its CPU time in the kernel, while the profiler's loop repeating one shape, and a replay of
the same steps back to back, paid none; after a warm-up at larger shapes a replay paid 6,000 per step too.
On CUDA the device memory goes through torch's caching allocator and none of this applies.

:func:`keep_freed_memory` fixes glibc's thresholds: blocks under 32 MiB come from the heap, which is never
trimmed, so once a process has run its largest step a step allocates without faults, as a caching
allocator behaves. Larger blocks (KV caches) are still mapped and returned to the kernel when freed.
The profiler (CPU sweeps) and the engine (CPU runs) both call it, so a profile and a run time the same
allocator behaviour; a profile records the settings in ``meta.json`` (``timing.host_memory``).
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest value glibc accepts on 64-bit: blocks below it stay in the heap
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # mallopt takes an int: free heap top beyond ~2 GiB is still returned


def keep_freed_memory(device: str = "cpu") -> dict | None:
    """Set glibc's malloc so that freed blocks under 32 MiB stay in the process (see the module docstring),
    for timed work on ``device``.

    Process-wide and idempotent. Returns the settings as a dict (for a profile's metadata), or ``None`` when
    ``device`` is CUDA or the C library is not glibc (then nothing is changed). Raises ``RuntimeError`` if
    glibc refuses a setting.
    """
    if str(device).startswith("cuda"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc_version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for name, param, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        if mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({name}, {value}) failed")
    return {"libc": "glibc " + libc_version().decode(), "mmap_threshold_bytes": MMAP_THRESHOLD_BYTES,
            "trim_threshold_bytes": TRIM_THRESHOLD_BYTES}
