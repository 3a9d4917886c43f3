"""The process heap between forwards: freed activations kept for the next run, handed back to
the kernel after huge runs and when the server goes idle.

onnxruntime's CPU arena is off (``runtime.py``: it keeps its high-water mark for good and, growing
by what is asked, fragments: the seed set's TTA peaked at 2232 MiB with it, 1083 without). Its
buffers then come from glibc's malloc, which by default serves every block over its mmap threshold
(128 KiB, rising to at most 32 MiB as such blocks are freed) with a fresh ``mmap`` and gives the
top of the heap back once more than twice that is free. A forward allocates and frees the same
activations every run, so each run page-faults them in again, zeroed by the kernel: ~6000 faults
and 18 ms of a 92 ms SegFormer-B0 512x512 forward on the development VM, exactly what the arena
saved. Fixing both thresholds (setting either also stops glibc's own adjustment) keeps freed
blocks up to 64 MiB in the heap, where the next run finds them (measured side by side: as fast
as the arena, 75 vs 75 ms). Unlike the arena, free blocks coalesce, so a later run of another
size reuses them instead of adding to the peak. All threads share one arena: glibc otherwise
gives threads that allocate at the same time arenas of their own, and what one arena keeps no
other thread reuses. With several arenas keeping, the integration corpus (sequential requests of
many sizes) peaked 385-655 MiB above its start; with one, 214-313 MiB (271-399 before any
keeping). The limit must be set before other threads allocate (the server does it first thing,
``service/__main__.py``): glibc hands a thread its arena at its first allocation, and a thread
on an arena of its own keeps nothing, because such an arena's 64 MiB sub-heaps are unmapped
whenever they empty, whatever the thresholds say. Set when the first model loaded (in a pool
thread that had already allocated), the server's batch thread got such an arena: ~14000 page
faults per B0 512x512 request, against ~0 with the limit set at start (2026-12-05).

What is kept is handed back by ``malloc_trim`` (which also releases free pages inside the heap,
not only at its top): at once after a run over ``RELEASE_PIXELS``, so one huge input does not keep
its peak, and after ``RELEASE_IDLE_S`` without any run, so an idle server shrinks to its working
set. Under CUDA the same holds for the host's share (decoded photos, label maps). Only glibc has
these knobs; elsewhere this module does nothing (and says so once).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger(__name__)

# Runs over this many pixels (batch x height x width) hand memory back at once (also the CUDA
# arena's shrink point in runtime.py).
RELEASE_PIXELS = 4_000_000
RELEASE_IDLE_S = 2.0
# Blocks up to this size stay in the heap when freed; bigger ones are mmapped and unmapped as
# glibc does by default. A B0 512x512 forward is as fast with 64 MiB as with 1 GiB (75 ms; 79.5
# with 32 MiB, glibc's own ceiling), but under 1 GiB batches of 1024x1024 windows keep their huge
# blocks: the seed set's TTA peaked at 1856 MiB above idle with it.
_KEEP_BYTES = 64 << 20
_TRIM_BYTES = 1 << 30  # free memory at the top of the heap kept up to this much
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


class Heap:
    """glibc's heap, told to keep freed blocks; one per process (``heap()``)."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._libc = libc
        self.keep()
        self._lock = threading.Lock()
        self._kept_since: float | None = None  # last run that left memory kept, if not released
        self._releases = 0
        threading.Thread(target=self._release_when_idle, name="heap-release", daemon=True).start()

    @property
    def releases(self) -> int:
        """How often memory was handed back."""
        return self._releases

    def keep(self) -> None:
        """Keep freed blocks up to ``_KEEP_BYTES`` in the heap, one heap for all threads
        (process-wide)."""
        self._libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
        self._libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)
        self._libc.mallopt(_M_ARENA_MAX, 1)

    def ran(self, pixels: int) -> None:
        """Called after each CPU forward of ``pixels`` input pixels."""
        if pixels > RELEASE_PIXELS:
            self.release()
        else:
            with self._lock:
                self._kept_since = time.monotonic()

    def release(self) -> None:
        """Hand every free page of the heap back to the kernel."""
        with self._lock:
            self._kept_since = None
            self._releases += 1
        self._libc.malloc_trim(0)

    def _release_when_idle(self) -> None:
        while True:
            time.sleep(RELEASE_IDLE_S / 2)
            with self._lock:
                idle = (
                    self._kept_since is not None
                    and time.monotonic() - self._kept_since >= RELEASE_IDLE_S
                )
            if idle:
                self.release()


_heap: Heap | None = None
_heap_lock = threading.Lock()
_unsupported = False


def heap() -> Heap | None:
    """The process's ``Heap`` (made on first use), or None where the C library is not glibc."""
    global _heap, _unsupported
    with _heap_lock:
        if _heap is None and not _unsupported:
            try:
                libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                libc = None
            if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                _heap = Heap(libc)
            else:
                _unsupported = True
                log.info("no glibc malloc: CPU forwards page-fault their activations every run")
        return _heap
