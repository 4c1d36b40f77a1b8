"""Memory budgets and measured peaks.

``budget_bytes(mb, device)``: the memory one measurement may use, ``mb`` megabytes or, for 0,
a quarter of what the machine has free (``MemAvailable`` of /proc/meminfo on CPU, the CUDA
driver's free memory on a GPU). On CPU it bounds the process's resident set: work is planned
within :func:`headroom_bytes`, the budget less what the process already holds.
:func:`memory_budget` makes a budget current for the code that chunks its work (enumeration, the
gradient engine); :func:`current_budget` reads it.

``peak_bytes(fn, device)``: the high-water mark of memory allocated while ``fn`` runs, above
what was allocated when it started. On CUDA the caching allocator's own counters (peak reset
before). On CPU PyTorch keeps no allocator statistics and the process's resident set is a poor
per-call measure (the C allocator keeps freed pages and grows lazily), so a dispatch mode sees
every operator's outputs, backward included, and counts the bytes of the storages created during
the call that are still alive after each operator: the tensors' own high-water mark. It does not
see memory that operators free before they return (their scratch space) nor non-tensor memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from estbench.errors import EstbenchError

__all__ = [
    "budget_bytes",
    "available_bytes",
    "memory_budget",
    "current_budget",
    "peak_bytes",
    "bytes_of",
    "resident_bytes",
    "megabytes",
    "headroom_bytes",
    "BUDGET_SHARE",
    "MIB",
]

MIB = 1 << 20
#: share of the free memory that the default budget takes (room for other workers and the rest)
BUDGET_SHARE = 0.25

T = TypeVar("T")

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("estbench_budget",
                                                                     default=None)


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory: the CUDA driver's free bytes on a GPU, ``MemAvailable`` on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # no /proc (macOS): free physical pages
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def budget_bytes(mb: float = 0, device: torch.device | str = "cpu") -> int:
    """``mb`` megabytes (MiB) in bytes, or for ``mb = 0`` a quarter of the free memory."""
    if mb < 0:
        raise EstbenchError(f"memory_budget_mb must be >= 0 (0: automatic), got {mb}")
    if mb:
        return int(mb * MIB)
    return int(BUDGET_SHARE * available_bytes(device))


def megabytes(nbytes: float) -> str:
    """``nbytes`` for a message: ``'0.004 MB'``, ``'3.2 MB'``, ``'5698 MB'``."""
    mb = nbytes / MIB
    return f"{mb:.0f} MB" if mb >= 100 else f"{mb:.2g} MB"


def resident_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``; 0 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def headroom_bytes(budget: int, device: torch.device | str = "cpu") -> int:
    """What a budget leaves for new work: on CPU the budget bounds the whole process, so what
    it already holds (torch, data, parameters) is taken off; on CUDA the budget is already a
    share of the free device memory."""
    if torch.device(device).type == "cuda":
        return budget
    return max(0, budget - resident_bytes())


@contextlib.contextmanager
def memory_budget(nbytes: int) -> Iterator[int]:
    """Make ``nbytes`` the current budget of the code inside the block."""
    token = _BUDGET.set(int(nbytes))
    try:
        yield int(nbytes)
    finally:
        _BUDGET.reset(token)


def current_budget(device: torch.device | str = "cpu") -> int:
    """The budget set by :func:`memory_budget`, else the machine default for ``device`` (read
    once per process and device, so that work sized by it is sized the same way each time)."""
    value = _BUDGET.get()
    return _default_budget(str(torch.device(device))) if value is None else value


@functools.lru_cache(maxsize=None)
def _default_budget(device: str) -> int:
    return budget_bytes(0, device)


class _TensorBytes(TorchDispatchMode):
    """Live bytes of the storages that operators create while the mode is active, and their
    maximum. Storages that existed before (inputs, parameters, views of them) are never counted."""

    def __init__(self) -> None:
        super().__init__()
        self.known: dict[int, StorageWeakRef] = {}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _key(self, t: torch.Tensor) -> int | None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._drop_freed()
        for t in tree_leaves((args, kwargs)):
            key = self._key(t)
            if key is not None and key not in self.live and key not in self.known:
                self.known[key] = StorageWeakRef(t.untyped_storage())
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            key = self._key(t)
            if key is not None and key not in self.known and key not in self.live:
                storage = t.untyped_storage()
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _drop_freed(self) -> None:
        """Forget storages freed since the last operator (their addresses may be reused)."""
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for key in [k for k, ref in self.known.items() if ref.expired()]:
            del self.known[key]


def peak_bytes(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """``(fn(), peak)``: the most bytes that ``fn`` held allocated at once, beyond what was
    allocated when it started (see the module docstring for how, per device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - before)
    with _TensorBytes() as tracker:
        result = fn()
    return result, tracker.peak


def bytes_of(*tensors: Any) -> int:
    """Total bytes of the tensors among ``tensors`` (nested containers allowed)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(tensors)
               if isinstance(t, torch.Tensor))
