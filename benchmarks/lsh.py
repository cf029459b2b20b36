"""Time and peak memory of LSH attention against exact attention and public Reformers.

Compares, on the same inputs (batch 1, one head, d = 64 by default, causal):

* ``lsh``: ``reformer_lab.lsh.lsh_attention``, 4 rounds, chunk 64, bucket count
  from ``default_n_buckets`` split into two factors by ``factorise_n_buckets``;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (exact);
* ``chunked``: ``reformer_lab.attention.chunked_attention`` (exact);
* ``reformer-pytorch``: ``reformer_pytorch.LSHAttention`` (bucket_size 64, so
  chunks of 64), when installed;
* ``transformers``: ``LSHSelfAttention`` of transformers' Reformer with its own
  bucket choice (``num_buckets=None``), when installed. It includes its two
  input projections.

Each (method, length, mode) runs in a fresh subprocess: a warm-up at a short
length, then up to ``--repeats`` timed calls, whose median is reported. One
more call runs inside ``reformer_lab.memory.measure_peak_memory``, which
reports the peak resident size the call adds on the CPU and the allocator's
peak on CUDA. A case stops repeating once its calls have taken
``--case-budget`` seconds, so slow exact attention at long lengths is timed
once.

Usage (the optional packages are in benchmarks/requirements.txt):

    python benchmarks/lsh.py                      # L = 1024 ... 65536
    python benchmarks/lsh.py --lengths 1024 2048  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

METHODS = ("lsh", "sdpa", "chunked", "reformer-pytorch", "transformers")
PUBLIC_METHODS = ("reformer-pytorch", "transformers")
MODES = ("forward", "forward+backward")
WARM_UP_LENGTH = 512


# --- one measured case (runs in the worker subprocess) -------------------------------------


def _make_forward(
    method: str, length: int, args: argparse.Namespace, device: torch.device
) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Callable]:
    """Return (inputs, forward), where forward(*inputs) is one attention call on ``length`` positions."""
    # (batch, heads, L, d): SDPA's CPU flash kernel needs 4-D inputs, else it
    # falls back to a kernel that stores the L x L scores.
    generator = torch.Generator().manual_seed(0)
    qk = torch.randn(1, 1, length, args.dim, generator=generator).to(device)
    v = torch.randn(1, 1, length, args.dim, generator=generator).to(device)

    if method == "lsh":
        from reformer_lab.lsh import default_n_buckets, factorise_n_buckets, lsh_attention

        n_buckets = factorise_n_buckets(default_n_buckets(length, args.chunk_length))
        rotations_generator = torch.Generator().manual_seed(1)

        def forward(qk, v):
            return lsh_attention(qk, v, n_buckets=n_buckets, n_hashes=args.n_hashes, chunk_length=args.chunk_length,
                                 causal=True, generator=rotations_generator)

        return (qk, v), forward

    if method == "sdpa":
        def forward(qk, v):
            return torch.nn.functional.scaled_dot_product_attention(qk, qk, v, is_causal=True)

        return (qk, v), forward

    if method == "chunked":
        from reformer_lab.attention import chunked_attention

        def forward(qk, v):
            return chunked_attention(qk, qk, v, causal=True)

        return (qk, v), forward

    if method == "reformer-pytorch":
        from reformer_pytorch import LSHAttention

        attention = LSHAttention(bucket_size=args.chunk_length, n_hashes=args.n_hashes, causal=True).to(device)

        def forward(qk, v):
            return attention(qk[:, 0], v[:, 0])[0]  # (batch, L, d)

        return (qk, v), forward

    if method == "transformers":
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention

        config = ReformerConfig(
            hidden_size=args.dim, num_attention_heads=1, attention_head_size=args.dim,
            num_hashes=args.n_hashes, lsh_attn_chunk_length=args.chunk_length, num_buckets=None,
            is_decoder=True, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
            max_position_embeddings=length, lsh_attention_probs_dropout_prob=0.0,
        )
        attention = LSHSelfAttention(config).to(device).eval()

        def forward(hidden, _unused):
            return attention(hidden[:, 0]).hidden_states  # (batch, L, d)

        return (qk, v), forward

    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _make_step(method: str, length: int, mode: str, args: argparse.Namespace, device: torch.device) -> Callable:
    inputs, forward = _make_forward(method, length, args, device)
    if mode == "forward":
        def step():
            with torch.no_grad():
                return forward(*inputs)

        return step

    inputs = tuple(tensor.requires_grad_(True) for tensor in inputs)

    def step():
        for tensor in inputs:
            tensor.grad = None
        forward(*inputs).sum().backward()

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(method: str, length: int, mode: str, args: argparse.Namespace) -> Dict[str, object]:
    """Measure one (method, length, mode): warm up, time repeated calls, then measure one call's peak memory."""
    from reformer_lab.memory import measure_peak_memory

    device = torch.device(args.device)
    warm_up = _make_step(method, min(WARM_UP_LENGTH, length), mode, args, device)
    warm_up()
    _synchronize(device)
    del warm_up

    step = _make_step(method, length, mode, args, device)
    seconds: List[float] = []
    while len(seconds) < args.repeats and sum(seconds) < args.case_budget:
        start = time.perf_counter()
        step()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)

    # Last, because on the CPU the measurement makes large blocks use mmap,
    # which would slow every later call by its page faults.
    peak = measure_peak_memory(step, device=device)
    return {"seconds": statistics.median(seconds), "peak_bytes": peak, "calls": len(seconds)}


# --- the driver ---------------------------------------------------------------------------


def is_available(method: str) -> bool:
    """Return False for a public implementation that cannot be imported."""
    module = {"reformer-pytorch": "reformer_pytorch", "transformers": "transformers"}.get(method)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_in_subprocess(method: str, length: int, mode: str, args: argparse.Namespace) -> Optional[Dict[str, object]]:
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", method, str(length), mode,
        "--dim", str(args.dim), "--n-hashes", str(args.n_hashes), "--chunk-length", str(args.chunk_length),
        "--repeats", str(args.repeats), "--case-budget", str(args.case_budget), "--device", args.device,
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no error output"])[-1]
        print(f"  {method} L={length} {mode} failed (exit {completed.returncode}): {last_line}", file=sys.stderr)
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_description(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def _format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def markdown_tables(
    results: Dict, lengths: List[int], methods: List[str], modes: List[str], args: argparse.Namespace
) -> str:
    """Format one markdown table per mode: time and peak memory per method, and the LSH time ratios."""
    from reformer_lab.memory import format_bytes

    lines = []
    for mode in modes:
        lines += [f"### {mode}", ""]
        header = ["L"] + [f"{m} time" for m in methods] + [f"{m} peak" for m in methods]
        header += ["LSH / SDPA time", "LSH / fastest public time"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for length in lengths:
            row = [str(length)]
            cases = {m: results.get((m, length, mode)) for m in methods}
            row += [_format_seconds(c["seconds"]) if c else "-" for c in cases.values()]
            row += [format_bytes(c["peak_bytes"]) if c else "-" for c in cases.values()]
            lsh, sdpa = cases.get("lsh"), cases.get("sdpa")
            row.append(f"{lsh['seconds'] / sdpa['seconds']:.3f}" if lsh and sdpa else "-")
            public = [cases[m]["seconds"] for m in PUBLIC_METHODS if cases.get(m)]
            row.append(f"{lsh['seconds'] / min(public):.2f}" if lsh and public else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append(
        f"LSH logits per call: n_hashes x L x 2 x chunk_length floats = "
        f"{args.n_hashes} x L x {2 * args.chunk_length} x 4 B; the L x L score matrix that SDPA and "
        f"chunked attention never store would be L^2 x 4 B."
    )
    return "\n".join(lines)


def parse_arguments(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2 ** p for p in range(10, 17)],
                        help="sequence lengths L (default: 1024 ... 65536)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="what to measure; public implementations that are not installed are skipped")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="forward only (under no_grad), and/or forward plus backward")
    parser.add_argument("--dim", type=int, default=64, help="feature size d of the one head (default: 64)")
    parser.add_argument("--n-hashes", type=int, default=4, help="LSH hash rounds (default: 4)")
    parser.add_argument("--chunk-length", type=int, default=64, help="LSH chunk length (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="measured calls per case after the warm-up")
    parser.add_argument("--case-budget", type=float, default=10.0,
                        help="seconds after which a case stops repeating (default: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "LENGTH", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_arguments(argv)
    if args.worker:
        method, length, mode = args.worker
        print(json.dumps(run_case(method, int(length), mode, args)))
        return

    methods = []
    for method in args.methods:
        if is_available(method):
            methods.append(method)
        else:
            print(f"skipping {method}: not installed (see benchmarks/requirements.txt)", file=sys.stderr)

    results = {}
    started = time.perf_counter()
    for length in args.lengths:
        for mode in args.modes:
            for method in methods:
                result = run_in_subprocess(method, length, mode, args)
                if result is not None:
                    results[(method, length, mode)] = result
                    print(f"  {method:>16} L={length:<6} {mode:<16} {_format_seconds(result['seconds']):>9} "
                          f"{result['peak_bytes'] / 2**20:9.1f} MiB  ({result['calls']} calls)", file=sys.stderr)

    modes = [mode for mode in MODES if mode in args.modes]
    print(f"## LSH attention: {args.n_hashes} rounds, chunk {args.chunk_length}, causal, d = {args.dim}, batch 1, "
          f"one head, on {args.device}\n")
    print(f"Machine: {machine_description(args.device)}\n")
    print(f"Command: `python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:] if argv is None else argv)}`"
          f" (total {time.perf_counter() - started:.0f} s)\n")
    print(markdown_tables(results, args.lengths, methods, modes, args))


if __name__ == "__main__":
    main()
