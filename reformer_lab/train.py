"""Train a ``ReformerLM`` on a text corpus, evaluate it, save and load checkpoints.

Library use::

    history = train(model, train_ids, valid_ids, steps=300, batch_size=16, seq_len=128)

Command line (the default corpus is Python's reference documentation)::

    python -m reformer_lab.train --steps 500 --attention lsh --reversible
    python -m reformer_lab.train --text-file book.txt
    python -m reformer_lab.train --enwik8 data/enwik8.zip --seq-len 1024
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data import (
    ByteTokenizer,
    CharTokenizer,
    IGNORE_INDEX,
    default_splits,
    evaluation_windows,
    read_enwik8,
    read_text_file,
    split_text,
    tokenizer_from_state_dict,
    training_batches,
)
from .metrics import NLLAccumulator
from .model import ReformerConfig, ReformerLM
from .utils import default_device, seed_all

__all__ = ["evaluate", "train", "train_variants", "ABLATION_VARIANTS", "learning_rate_at", "save_checkpoint", "load_checkpoint", "main"]

Tokenizer = Union[CharTokenizer, ByteTokenizer]


@torch.no_grad()
def evaluate(
    model: ReformerLM,
    tokens: Tensor,
    seq_len: int,
    *,
    batch_size: int = 16,
    max_tokens: Optional[int] = None,
) -> Dict[str, float]:
    """Score ``tokens`` (1-D ids) in windows of ``seq_len``, each target once.

    Only the first ``max_tokens`` tokens are used when it is set. Returns
    ``{"nll": nats per character, "perplexity", "bpc", "n_targets"}``. Runs in
    eval mode (no dropout) on the model's device and restores the previous mode.
    """
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    inputs, targets = evaluation_windows(tokens, seq_len)  # (n_windows, seq_len) each
    device = next(model.parameters()).device
    accumulator = NLLAccumulator(ignore_index=IGNORE_INDEX)

    was_training = model.training
    model.eval()
    for first in range(0, len(inputs), batch_size):
        batch_inputs = inputs[first : first + batch_size].to(device)
        batch_targets = targets[first : first + batch_size].to(device)
        accumulator.update(model(batch_inputs), batch_targets)
    model.train(was_training)

    return {
        "nll": accumulator.mean_nll,
        "perplexity": accumulator.perplexity,
        "bpc": accumulator.bits_per_character,
        "n_targets": accumulator.count,
    }


def learning_rate_at(step: int, steps: int, peak: float, warmup_steps: int) -> float:
    """Return the learning rate at ``step``: linear warm-up to ``peak``, then cosine decay to peak / 10."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train(
    model: ReformerLM,
    train_tokens: Tensor,
    valid_tokens: Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    seq_len: int = 128,
    learning_rate: float = 3e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    eval_every: int = 100,
    eval_tokens: Optional[int] = 20_000,
    generator: Optional[torch.Generator] = None,
    checkpoint_path: Optional[str] = None,
    tokenizer: Optional[Tokenizer] = None,
    progress: bool = True,
) -> List[Dict[str, float]]:
    """Train ``model`` with AdamW for ``steps`` steps and return the validation history.

    Batches of ``batch_size`` windows of ``seq_len + 1`` tokens come from
    ``data.training_batches`` with ``generator``. Every ``eval_every`` steps
    and after the last step, the first ``eval_tokens`` validation tokens (all
    when None) are scored. Each history entry contains ``step``, ``train_loss``
    (mean of the steps since the last entry, nats), ``valid_nll``,
    ``valid_bpc``, ``valid_perplexity``, ``tokens_seen``, ``elapsed_s`` and
    ``tokens_per_second`` (training steps only, evaluation time excluded).
    When ``checkpoint_path`` is set, a checkpoint is written after each
    evaluation. The model must already be on the device to train on.
    """
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got steps={steps}, eval_every={eval_every}")
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    batches = training_batches(train_tokens, batch_size, seq_len, generator=generator)
    history: List[Dict[str, float]] = []
    train_time, recent_losses = 0.0, []

    model.train()
    bar = tqdm(range(steps), desc="train", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, learning_rate, warmup_steps)
        started = time.perf_counter()
        loss = _training_step(model, optimizer, next(batches).to(device), grad_clip)
        train_time += _synchronized_elapsed(started, device)
        recent_losses.append(loss)

        if (step + 1) % eval_every == 0 or step + 1 == steps:
            metrics = evaluate(model, valid_tokens, seq_len, batch_size=batch_size, max_tokens=eval_tokens)
            tokens_seen = (step + 1) * batch_size * seq_len
            history.append({
                "step": step + 1,
                "train_loss": sum(recent_losses) / len(recent_losses),
                "valid_nll": metrics["nll"],
                "valid_bpc": metrics["bpc"],
                "valid_perplexity": metrics["perplexity"],
                "tokens_seen": tokens_seen,
                "elapsed_s": train_time,
                "tokens_per_second": tokens_seen / train_time,
            })
            recent_losses = []
            bar.set_postfix(valid_bpc=f"{metrics['bpc']:.3f}")
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, model, tokenizer=tokenizer, step=step + 1, history=history)
    return history


ABLATION_VARIANTS: Dict[str, Dict[str, object]] = {
    "full attention": {},
    "shared QK": {"shared_qk": True},
    "LSH": {"attention": "lsh"},
    "reversible": {"reversible": True},
    "LSH + reversible": {"attention": "lsh", "reversible": True},
}
"""Config switches of the ablation variants, each applied to one base config.
"full attention" is the ordinary Transformer baseline; LSH attention always
shares QK, and "LSH + reversible" is the Reformer."""


def train_variants(
    base_config: ReformerConfig,
    variants: Mapping[str, Mapping[str, object]],
    train_tokens: Tensor,
    valid_tokens: Tensor,
    *,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    **train_kwargs,
) -> Dict[str, Dict[str, object]]:
    """Train one model per variant, each from the same seed, and return their results.

    Each variant is ``base_config`` with the variant's fields replaced. Every
    model draws its initial weights from ``seed`` and trains on the same
    batches (a generator seeded with ``seed`` each time). ``train_kwargs`` go to
    ``train``. Returns ``{name: {"config", "n_parameters", "history", "model"}}``;
    the models are on ``device`` (default: CUDA when available).
    """
    device = torch.device(device) if device is not None else default_device()
    results: Dict[str, Dict[str, object]] = {}
    for name, overrides in variants.items():
        config = replace(base_config, **overrides)
        model = ReformerLM(config, generator=torch.Generator().manual_seed(seed)).to(device)
        history = train(
            model, train_tokens, valid_tokens, generator=torch.Generator().manual_seed(seed), **train_kwargs
        )
        results[name] = {
            "config": config.to_dict(),
            "n_parameters": model.num_parameters(),
            "history": history,
            "model": model,
        }
    return results


def _training_step(model: ReformerLM, optimizer: torch.optim.Optimizer, batch: Tensor, grad_clip: float) -> float:
    loss = model.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def _synchronized_elapsed(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def save_checkpoint(
    path: str,
    model: ReformerLM,
    *,
    tokenizer: Optional[Tokenizer] = None,
    step: int = 0,
    history: Optional[List[Dict[str, float]]] = None,
) -> None:
    """Write the model's config and weights, the tokenizer's vocabulary, the step and the history."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    torch.save(
        {
            "config": model.config.to_dict(),
            "model": model.state_dict(),
            "tokenizer": None if tokenizer is None else tokenizer.state_dict(),
            "step": step,
            "history": history or [],
        },
        path,
    )


def load_checkpoint(path: str, *, device: Optional[Union[str, torch.device]] = None) -> dict:
    """Read a checkpoint written by ``save_checkpoint``.

    Returns ``{"model": ReformerLM on device (default: CUDA when available),
    "tokenizer": tokenizer or None, "step": int, "history": list}``.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path!r}")
    device = torch.device(device) if device is not None else default_device()
    state = torch.load(path, map_location=device, weights_only=True)
    model = ReformerLM(ReformerConfig(**state["config"])).to(device)
    model.load_state_dict(state["model"])
    tokenizer = None if state["tokenizer"] is None else tokenizer_from_state_dict(state["tokenizer"])
    return {"model": model, "tokenizer": tokenizer, "step": state["step"], "history": state["history"]}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reformer_lab.train",
        description="Train a small Reformer language model and print validation perplexity and bits per character.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text-file", help="UTF-8 text file to train on, split 90/5/5 %% (default: Python's reference documentation)")
    source.add_argument("--enwik8", metavar="PATH", help="enwik8 or enwik8.zip, split 90M/5M/5M bytes, modelled as bytes")

    sizes = parser.add_argument_group("model sizes")
    sizes.add_argument("--d-model", type=int, default=128, help="residual width (default: 128)")
    sizes.add_argument("--n-layers", type=int, default=2, help="number of blocks (default: 2)")
    sizes.add_argument("--n-heads", type=int, default=4, help="attention heads (default: 4)")
    sizes.add_argument("--d-ff", type=int, default=512, help="feed-forward hidden width (default: 512)")

    switches = parser.add_argument_group("Reformer switches")
    switches.add_argument("--attention", choices=("full", "lsh"), default="full", help="attention kind (default: full)")
    switches.add_argument("--reversible", action="store_true", help="use reversible residual blocks")
    switches.add_argument("--shared-qk", action="store_true", help="share the query and key projection (full attention)")
    switches.add_argument("--ff-chunks", type=int, default=1, help="sequence chunks for the feed-forward layer (default: 1)")
    switches.add_argument("--n-hashes", type=int, default=2, help="LSH hash rounds (default: 2)")
    switches.add_argument("--chunk-length", type=int, default=64, help="LSH chunk length in tokens (default: 64)")
    switches.add_argument("--n-buckets", type=int, default=None, help="LSH buckets per round (default: picked from the length)")
    switches.add_argument("--dropout", type=float, default=0.0, help="dropout probability (default: 0)")

    run = parser.add_argument_group("training")
    run.add_argument("--steps", type=int, default=500, help="optimizer steps (default: 500)")
    run.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    run.add_argument("--seq-len", type=int, default=128, help="tokens per window, also max_seq_len (default: 128)")
    run.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    run.add_argument("--eval-every", type=int, default=100, help="steps between validations (default: 100)")
    run.add_argument("--eval-tokens", type=int, default=20_000, help="validation tokens scored during training; 0 for all (default: 20000)")
    run.add_argument("--seed", type=int, default=0, help="random seed for weights, batches and hashing (default: 0)")
    run.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda when available)")
    run.add_argument("--checkpoint", default=None, help="path to write the checkpoint to after each validation")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _load_corpus(args: argparse.Namespace):
    if args.enwik8:
        train_text, valid_text, test_text = read_enwik8(args.enwik8)
        return ByteTokenizer(), train_text, valid_text
    if args.text_file:
        train_text, valid_text, test_text = split_text(read_text_file(args.text_file))
    else:
        train_text, valid_text, test_text = default_splits()
    return CharTokenizer(train_text, unknown_token=True), train_text, valid_text


def _token_ids(tokenizer: Tokenizer, text: Union[str, bytes]) -> Tensor:
    """Encode text to a 1-D int64 tensor; bytes are viewed directly, without a Python list per byte."""
    if isinstance(text, bytes):
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    return torch.tensor(tokenizer.encode(text))


def main(argv: Optional[List[str]] = None) -> List[Dict[str, float]]:
    """Run the command line; returns the validation history."""
    args = _build_parser().parse_args(argv)
    generator = seed_all(args.seed)
    device = torch.device(args.device) if args.device else default_device()

    tokenizer, train_text, valid_text = _load_corpus(args)
    train_ids = _token_ids(tokenizer, train_text)
    valid_ids = _token_ids(tokenizer, valid_text)
    config = ReformerConfig(
        vocab_size=tokenizer.vocab_size, max_seq_len=args.seq_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff, attention=args.attention,
        reversible=args.reversible, shared_qk=args.shared_qk, ff_chunks=args.ff_chunks,
        n_hashes=args.n_hashes, chunk_length=args.chunk_length, n_buckets=args.n_buckets,
        dropout=args.dropout,
    )
    model = ReformerLM(config, generator=generator).to(device)
    print(f"{model.num_parameters():,} parameters, {len(train_ids):,} training tokens, device {device.type}")

    history = train(
        model, train_ids, valid_ids, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        learning_rate=args.lr, eval_every=args.eval_every, eval_tokens=args.eval_tokens or None,
        generator=generator, checkpoint_path=args.checkpoint, tokenizer=tokenizer,
        progress=not args.no_progress,
    )
    final = evaluate(model, valid_ids, args.seq_len, batch_size=args.batch_size)
    print(f"step {history[-1]['step']}: {history[-1]['tokens_per_second']:,.0f} training tokens/s")
    print(f"validation ({final['n_targets']:,} characters): perplexity {final['perplexity']:.3f}, bpc {final['bpc']:.3f}")
    return history


if __name__ == "__main__":
    main()
