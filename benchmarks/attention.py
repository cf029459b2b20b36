"""Time and peak memory of exact attention: naive, chunked and PyTorch's SDPA.

Prints a markdown table, one row per (method, L), for one head, d = 64,
float32, on the CPU or the GPU.

    python benchmarks/attention.py                      # L = 1024 ... 16384, forward
    python benchmarks/attention.py --backward --causal  # forward + backward, causal

Memory is reformer_lab.memory.measure_peak_memory: the peak resident memory
added by one call on the CPU, the allocator's peak on CUDA. Time is the median
of --repeats calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from reformer_lab.attention import chunked_attention, naive_attention
from reformer_lab.memory import measure_peak_memory

MIB = 1024 * 1024


def methods(causal: bool) -> Dict[str, Callable]:
    return {
        "naive": lambda q, k, v: naive_attention(q, k, v, causal=causal),
        "chunked": lambda q, k, v: chunked_attention(q, k, v, causal=causal),
        "SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }


def make_step(attend: Callable, q, k, v, backward: bool) -> Callable[[], None]:
    def step():
        if backward:
            inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
            attend(*inputs).sum().backward()
        else:
            with torch.no_grad():
                attend(q, k, v)
        if q.is_cuda:
            torch.cuda.synchronize()
    return step


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths L to measure")
    parser.add_argument("--dim", type=int, default=64, help="feature size d per head")
    parser.add_argument("--causal", action="store_true", help="causal masking")
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()

    print(f"# exact attention, d={args.dim}, one head, float32, causal={args.causal}, "
          f"{'forward+backward' if args.backward else 'forward'}")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print("| L | method | time (s) | peak memory (MiB) | time / SDPA | memory / naive |")
    print("|---:|---|---:|---:|---:|---:|")
    # Every time is taken before any memory measurement: on the CPU the
    # measurement leaves glibc serving large blocks by mmap, which slows later calls.
    seconds, peaks = {}, {}
    for phase in ("time", "memory"):
        generator = torch.Generator().manual_seed(0)
        for length in args.lengths:
            # (B, H, L, d), because SDPA's fused CPU kernel needs 4-D inputs. With
            # 3-D ones PyTorch 2.13 falls back to a path that builds the score matrix.
            shape = (1, 1, length, args.dim)
            q, k, v = (torch.randn(shape, generator=generator).to(args.device) for _ in range(3))
            for name, attend in methods(args.causal).items():
                step = make_step(attend, q, k, v, args.backward)
                if phase == "time":
                    seconds[length, name] = median_seconds(step, args.repeats)
                else:
                    peaks[length, name] = measure_peak_memory(step, device=args.device)

    for length, name in seconds:
        time_ratio = seconds[length, name] / seconds[length, "SDPA"]
        memory_ratio = peaks[length, name] / peaks[length, "naive"]
        print(f"| {length} | {name} | {seconds[length, name]:.4f} | {peaks[length, name] / MIB:.1f} | "
              f"{time_ratio:.2f} | {memory_ratio:.3f} |")


if __name__ == "__main__":
    main()
