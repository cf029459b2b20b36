"""Peak memory and time of one training step of ordinary and reversible stacks.

Each block is a Reformer layer: F = layer norm + multi-head causal
self-attention, G = layer norm + feed-forward (d_ff = 4 d_model) run in
chunks. The same blocks run as an ordinary residual stack (every block's
activations stored) and as a reversible one (inputs rebuilt in backward).

A step is forward + backward of ``(y1 + y2).mean()`` on one batch. Peak memory
is what the step adds on top of the parameters and their gradients, which are
allocated before it, as after the first step of a training loop that zeroes
gradients in place. On CPU it is the peak resident set size (see
``reformer_lab.memory``), on CUDA the allocator's peak. Time is the median of
``--repeats`` steps after one warm-up step.

With ``--reformer-pytorch`` the script also measures reformer-pytorch's
``Reformer`` (reversible, LSH attention with ``--n-hashes`` rounds, bucket
size 64, causal) when that package is importable.

Usage:
    python benchmarks/reversible.py                      # d_model 256, L 2048, depths 2 4 8 12
    python benchmarks/reversible.py --length 256 --depths 2 4 --repeats 1   # quick check
    .venv-bench/bin/python benchmarks/reversible.py --reformer-pytorch --attention lsh

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from reformer_lab.attention import chunked_attention
from reformer_lab.feedforward import ChunkedFeedForward, FeedForward
from reformer_lab.memory import measure_peak_memory
from reformer_lab.reversible import ReversibleBlock, ReversibleSequence

MIB = 2**20


class ChunkedSelfAttention(nn.Module):
    """Multi-head causal self-attention over ``(B, L, d_model)`` with ``chunked_attention``."""

    def __init__(self, d_model: int, n_heads: int, query_chunk_size: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query_chunk_size = query_chunk_size
        self.to_qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        head_dim = d_model // self.n_heads
        qkv = self.to_qkv(x).view(batch, length, 3, self.n_heads, head_dim)  # (B, L, 3, H, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, dh)
        output = chunked_attention(
            q, k, v, causal=True, query_chunk_size=self.query_chunk_size, key_chunk_size=length
        )  # (B, H, L, dh)
        output = output.transpose(1, 2).reshape(batch, length, d_model)  # (B, L, d_model)
        return self.to_out(output)


def build_attention(args: argparse.Namespace) -> nn.Module:
    if args.attention == "exact":
        return ChunkedSelfAttention(args.d_model, args.heads, args.query_chunk)
    from reformer_lab.lsh import LSHSelfAttention

    return LSHSelfAttention(args.d_model, args.heads, n_hashes=args.n_hashes, chunk_length=64, causal=True)


def build_stack(depth: int, reversible: bool, args: argparse.Namespace) -> ReversibleSequence:
    blocks = []
    for _ in range(depth):
        f = nn.Sequential(nn.LayerNorm(args.d_model), build_attention(args))
        feedforward = nn.Sequential(nn.LayerNorm(args.d_model), FeedForward(args.d_model, 4 * args.d_model))
        g = ChunkedFeedForward(feedforward, args.ff_chunks)
        blocks.append(ReversibleBlock(f, g))
    return ReversibleSequence(blocks, reversible=reversible)


def build_reformer_pytorch(depth: int, args: argparse.Namespace) -> Optional[nn.Module]:
    try:
        from reformer_pytorch import Reformer
    except ImportError:
        return None
    return Reformer(
        dim=args.d_model, depth=depth, heads=args.heads, bucket_size=64, n_hashes=args.n_hashes, causal=True
    )


@dataclass
class Row:
    implementation: str
    depth: int
    reversible: bool
    peak_bytes: int
    step_seconds: float
    parameter_bytes: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str, depth: int, reversible: bool, model: nn.Module, step: Callable[[], None], args: argparse.Namespace
) -> Row:
    """Warm up, then measure the peak memory of one step and the median time of several."""
    device = torch.device(args.device)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    step()
    peak = measure_peak_memory(step, device=device)

    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Row(name, depth, reversible, peak, statistics.median(times), parameter_bytes)


def run_ours(depth: int, reversible: bool, args: argparse.Namespace) -> Row:
    device = torch.device(args.device)
    torch.manual_seed(0)
    stack = build_stack(depth, reversible, args).to(device)
    x = torch.randn(args.batch, args.length, args.d_model, device=device, requires_grad=True)

    def step() -> None:
        y1, y2 = stack(x, x)
        (y1 + y2).mean().backward()
        x.grad = None

    name = f"reformer_lab ({args.attention} attention)"
    return measure(name, depth, reversible, stack, step, args)


def run_reformer_pytorch(depth: int, args: argparse.Namespace) -> Optional[Row]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_reformer_pytorch(depth, args)
    if model is None:
        return None
    model = model.to(device)
    x = torch.randn(args.batch, args.length, args.d_model, device=device, requires_grad=True)

    def step() -> None:
        model(x).mean().backward()
        x.grad = None

    name = f"reformer-pytorch (LSH, {args.n_hashes} rounds)"
    return measure(name, depth, True, model, step, args)


def format_table(rows: List[Row]) -> str:
    """Render the rows as markdown, with each peak relative to the 2-layer (or shallowest) peak."""
    lines = [
        "| implementation | depth | reversible | peak MiB | peak / shallowest | step s | time / ordinary | params + grads MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = [r for r in rows if r.implementation == row.implementation and r.reversible == row.reversible]
        shallowest = min(same, key=lambda r: r.depth)
        ordinary = [
            r for r in rows if r.implementation == row.implementation and r.depth == row.depth and not r.reversible
        ]
        time_ratio = f"{row.step_seconds / ordinary[0].step_seconds:.2f}" if ordinary else "-"
        peak_ratio = row.peak_bytes / shallowest.peak_bytes if shallowest.peak_bytes else math.nan
        lines.append(
            f"| {row.implementation} | {row.depth} | {'yes' if row.reversible else 'no'} "
            f"| {row.peak_bytes / MIB:.1f} | {peak_ratio:.2f} | {row.step_seconds:.3f} | {time_ratio} "
            f"| {2 * row.parameter_bytes / MIB:.1f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256, help="model width d_model (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--length", type=int, default=2048, help="sequence length L in tokens (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12], help="numbers of layers")
    parser.add_argument(
        "--attention", choices=["exact", "lsh"], default="exact",
        help="exact chunked attention or LSH attention in F (default exact)",
    )
    parser.add_argument("--query-chunk", type=int, default=256, help="queries per block of exact attention")
    parser.add_argument("--n-hashes", type=int, default=4, help="LSH hash rounds (default 4)")
    parser.add_argument("--ff-chunks", type=int, default=8, help="chunks of the feed-forward layer (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--reformer-pytorch", action="store_true",
        help="also measure reformer_pytorch.Reformer at depths 6 and 12 when it is installed",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows = []
    for reversible in (False, True):
        for depth in args.depths:
            rows.append(run_ours(depth, reversible, args))
    if args.reformer_pytorch:
        for depth in (6, 12):
            row = run_reformer_pytorch(depth, args)
            if row is None:
                print("reformer_pytorch is not installed; skipping it")
                break
            rows.append(row)

    print(
        f"d_model {args.d_model}, heads {args.heads}, L {args.length}, batch {args.batch}, "
        f"d_ff {4 * args.d_model} in {args.ff_chunks} chunks; device {args.device}; "
        f"torch {torch.__version__}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
