"""Measured peak memory of one call, and the analytic sizes it is compared with.

Two measurements, one per device:

* CUDA: the caching allocator's peak statistics
  (``torch.cuda.reset_peak_memory_stats`` / ``torch.cuda.max_memory_allocated``),
  exact to the byte for tensors allocated on that device.
* CPU, method ``"rss"`` (default on Linux): the peak resident set size of this
  process. Before the call, free heap memory is returned to the operating
  system (``malloc_trim``). Blocks of 64 KiB and more are then served by
  ``mmap`` (``mallopt``), so freeing them lowers the resident size again.
  Last, the kernel's high-water mark is reset (``/proc/self/clear_refs``). The result is
  ``VmHWM - VmRSS`` read from ``/proc/self/status``. Resolution: one page
  (4 KiB) plus whatever other threads of the process allocate meanwhile,
  usually well under 1 MiB. It counts everything the process touches,
  including allocator overhead and memory outside PyTorch.
  The first call of an operator also maps its code into memory, so warm the
  call up once before measuring it. The mmap setting stays for the rest of
  the process and makes later large allocations slower (a page fault per
  fresh block), so take timings before the first memory measurement.
* CPU, method ``"profiler"`` (fallback where ``/proc`` is missing): the
  PyTorch profiler's record of CPU tensor allocations and frees, replayed in
  time order. Its resolution is one operator: a temporary that an operator
  allocates and frees inside itself is not seen. It is blind to memory outside
  PyTorch, and the profiler slows long loops of small operations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "measure_peak_memory",
    "attention_scores_bytes",
    "format_bytes",
    "cpu_rss_supported",
    "max_seq_len_for_memory",
    "peak_memory_by_length",
]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
_MMAP_THRESHOLD_BYTES = 64 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def attention_scores_bytes(
    seq_len: int,
    batch: int = 1,
    heads: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Return the size in bytes of the score matrix Q K^T: batch * heads * L^2 * bytes per element.

    For seq_len 65536 in float32 with one sequence and one head this is
    65536^2 * 4 = 17,179,869,184 bytes, i.e. 16 GiB.
    """
    for name, value in (("seq_len", seq_len), ("batch", batch), ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    element_size = torch.empty((), dtype=dtype).element_size()
    return batch * heads * seq_len * seq_len * element_size


def format_bytes(num_bytes: float) -> str:
    """Format a byte count with a binary unit, e.g. 17179869184 -> '16.0 GiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def cpu_rss_supported() -> bool:
    """Return True where the ``"rss"`` method works (Linux with a writable clear_refs)."""
    return os.access(_CLEAR_REFS, os.W_OK) and os.path.exists(_STATUS)


def _status_kib(field: str) -> int:
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in {_STATUS}")


def _prepare_heap() -> None:
    gc.collect()
    libc = _libc()
    if libc is None:
        return
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _peak_cpu_rss(fn: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    _prepare_heap()
    with open(_CLEAR_REFS, "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current VmRSS
    baseline_kib = _status_kib("VmRSS")
    result = fn(*args, **kwargs)
    peak_kib = _status_kib("VmHWM")
    del result
    return max(0, peak_kib - baseline_kib) * 1024


def _peak_cpu_profiler(fn: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    gc.collect()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        result = fn(*args, **kwargs)
    del result
    # Each event carries the bytes it allocated net of what it freed, not
    # counting nested operators; "[memory]" events are frees outside any operator.
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage) for event in profiler.events()
    )
    live = peak = 0
    for _, delta in changes:
        live += delta
        peak = max(peak, live)
    return peak


def _peak_cuda(fn: Callable[..., Any], args: tuple, kwargs: dict, device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - baseline)


def _infer_device(args: tuple, kwargs: dict) -> torch.device:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def measure_peak_memory(
    fn: Callable[..., Any],
    *args: Any,
    device: Optional[torch.device | str] = None,
    method: Optional[str] = None,
    **kwargs: Any,
) -> int:
    """Run ``fn(*args, **kwargs)`` once and return the peak memory it adds, in bytes.

    The peak is measured from just before the call to its end, and includes the
    returned value. Memory that already existed (the arguments) is not counted.

    Args:
        fn: the callable to measure.
        device: where to measure; by default the device of the first tensor
            argument, else the CPU.
        method: CPU only: ``"rss"`` (peak resident size, default where
            supported) or ``"profiler"`` (PyTorch allocations only). See the
            module docstring for what each counts and its resolution.

    Returns:
        Bytes added at the peak, never negative.
    """
    device = torch.device(device) if device is not None else _infer_device(args, kwargs)
    if device.type == "cuda":
        if method is not None:
            raise ValueError(f"method applies to CPU measurements only, got method={method!r} on {device}")
        return _peak_cuda(fn, args, kwargs, device)
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")

    if method is None:
        method = "rss" if cpu_rss_supported() else "profiler"
    if method == "rss":
        if not cpu_rss_supported():
            raise ValueError(
                f"method='rss' needs Linux with a writable {_CLEAR_REFS}; use method='profiler'"
            )
        return _peak_cpu_rss(fn, args, kwargs)
    if method == "profiler":
        return _peak_cpu_profiler(fn, args, kwargs)
    raise ValueError(f"method must be 'rss' or 'profiler', got {method!r}")


def max_seq_len_for_memory(
    memory_bytes: int,
    batch: int = 1,
    heads: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Return the longest L whose score matrix fits in ``memory_bytes``.

    Solves batch * heads * L^2 * bytes_per_element <= memory_bytes for L. Only
    the score matrix is counted, so a real model runs out sooner.
    """
    if not isinstance(memory_bytes, int) or isinstance(memory_bytes, bool) or memory_bytes < 0:
        raise ValueError(f"memory_bytes must be a non-negative integer, got {memory_bytes!r}")
    per_position_pair = attention_scores_bytes(1, batch=batch, heads=heads, dtype=dtype)
    if per_position_pair == 0:
        raise ValueError(f"batch and heads must be positive, got batch={batch}, heads={heads}")
    length = math.isqrt(memory_bytes // per_position_pair)
    return length


def peak_memory_by_length(
    attend: Callable[..., Any],
    lengths: Sequence[int],
    dim: int = 64,
    *,
    batch_shape: Tuple[int, ...] = (1,),
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    **attend_kwargs: Any,
) -> List[int]:
    """Measure the peak memory, in bytes, of ``attend(q, k, v)`` for each length.

    q, k and v are random ``batch_shape + (L, dim)`` tensors, made before the
    measurement starts so they are not counted. The call runs under
    ``torch.no_grad()`` once to warm up and once to measure.
    """
    results = []
    for length in lengths:
        shape = tuple(batch_shape) + (length, dim)
        q, k, v = (torch.randn(shape, generator=generator).to(device or "cpu") for _ in range(3))
        with torch.no_grad():
            attend(q[..., :16, :], k[..., :16, :], v[..., :16, :], **attend_kwargs)
            results.append(measure_peak_memory(attend, q, k, v, **attend_kwargs))
        del q, k, v
    return results
