"""Train the ablation variants on the default corpus, write a results file and print a table.

Each variant (``reformer_lab.train.ABLATION_VARIANTS``: full attention,
shared QK, LSH, reversible, LSH + reversible) is trained from the same initial
weights on the same batches. The table lists parameters, training throughput
(tokens per second, training steps only) and the bits per character and
perplexity on the whole validation split, beside the uniform and unigram
baselines. The results file (JSON) also stores the settings, the machine, the
validation curves and a greedy text sample per variant; notebook 07 plots it.

    python benchmarks/ablation.py                      # writes results/ablation.json
    python benchmarks/ablation.py --steps 100 --output quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

from reformer_lab.data import CharTokenizer, default_splits
from reformer_lab.metrics import bits_per_character, unigram_log_probs
from reformer_lab.model import ReformerConfig
from reformer_lab.train import ABLATION_VARIANTS, evaluate, train_variants
from reformer_lab.utils import default_device, seed_all

DEFAULT_OUTPUT = os.path.join(os.path.dirname(__file__), "..", "results", "ablation.json")
SAMPLE_PROMPT = "The "


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per variant (default: 300)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    parser.add_argument("--d-model", type=int, default=64, help="residual width (default: 64)")
    parser.add_argument("--n-layers", type=int, default=2, help="blocks (default: 2)")
    parser.add_argument("--n-heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--n-hashes", type=int, default=2, help="LSH hash rounds (default: 2)")
    parser.add_argument("--chunk-length", type=int, default=32, help="LSH chunk length in tokens (default: 32, so 16 buckets at L = 256)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validations (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batches (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument(
        "--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS),
        metavar="NAME", help=f"variants to train (default: all of {list(ABLATION_VARIANTS)})",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="results file (default: results/ablation.json)")
    return parser.parse_args()


def baseline_bpc(train_ids: torch.Tensor, valid_ids: torch.Tensor, vocab_size: int) -> dict:
    """Return the uniform and unigram models' bits per character on the validation split."""
    unigram = unigram_log_probs(train_ids, vocab_size)
    targets = valid_ids[1:]
    return {
        "uniform": math.log2(vocab_size),
        "unigram": bits_per_character(unigram.expand(len(targets), -1), targets),
    }


def environment(device: torch.device) -> dict:
    """Describe the machine and software the numbers were measured on."""
    description = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def main() -> None:
    args = parse_arguments()
    seed_all(args.seed)
    device = torch.device(args.device) if args.device else default_device()

    train_text, valid_text, _ = default_splits()
    tokenizer = CharTokenizer(train_text, unknown_token=True)
    train_ids = torch.tensor(tokenizer.encode(train_text))
    valid_ids = torch.tensor(tokenizer.encode(valid_text))
    base_config = ReformerConfig(
        vocab_size=tokenizer.vocab_size, max_seq_len=args.seq_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, d_ff=4 * args.d_model,
        n_hashes=args.n_hashes, chunk_length=args.chunk_length,
    )

    started = time.perf_counter()
    results = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "output"},
                     "corpus": "default (pydoc_data.topics)", "validation_characters": len(valid_ids)},
        "environment": environment(device),
        "baselines": baseline_bpc(train_ids, valid_ids, tokenizer.vocab_size),
        "runs": {},
    }
    # One variant at a time, writing the file after each, so an interrupted run keeps what finished.
    for name in args.variants:
        runs = train_variants(
            base_config, {name: ABLATION_VARIANTS[name]}, train_ids, valid_ids, seed=args.seed, device=device,
            steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
            eval_every=args.eval_every,
        )
        results["runs"][name] = summarize_run(runs[name], tokenizer, valid_ids, args, device)
        results["total_seconds"] = time.perf_counter() - started
        write_results(results, args.output)

    print_table(results)
    print(f"\nwrote {os.path.relpath(args.output)} in {results['total_seconds']:.0f} s")


def summarize_run(run: dict, tokenizer: CharTokenizer, valid_ids: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> dict:
    """Evaluate a trained variant on the whole validation split and draw a greedy text sample."""
    model = run.pop("model")
    final = evaluate(model, valid_ids, args.seq_len, batch_size=args.batch_size)
    prompt = torch.tensor(tokenizer.encode(SAMPLE_PROMPT), device=device)
    return {
        **run,
        "final": final,
        "tokens_per_second": run["history"][-1]["tokens_per_second"],
        "greedy_sample": tokenizer.decode(model.generate(prompt, 200, greedy=True)),
    }


def write_results(results: dict, path: str) -> None:
    """Write the results as indented JSON, creating the folder when needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


def print_table(results: dict) -> None:
    """Print the results as a markdown table."""
    environment_ = results["environment"]
    settings = results["settings"]
    print(
        f"\nDefault corpus, {settings['steps']} steps of {settings['batch_size']} x {settings['seq_len']} "
        f"characters, d_model {settings['d_model']}, {settings['n_layers']} layers; "
        f"{environment_['device']}, {environment_['cpu_count']} CPUs, torch {environment_['torch']}\n"
    )
    print("| variant | parameters | training tokens/s | validation bpc | validation perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, run in results["runs"].items():
        print(
            f"| {name} | {run['n_parameters']:,} | {run['tokens_per_second']:,.0f} | "
            f"{run['final']['bpc']:.3f} | {run['final']['perplexity']:.2f} |"
        )
    for name, bpc in results["baselines"].items():
        print(f"| {name} baseline | - | - | {bpc:.3f} | {2 ** bpc:.2f} |")


if __name__ == "__main__":
    main()
