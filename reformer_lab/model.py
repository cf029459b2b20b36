"""A decoder-only language model with the Reformer's switches.

``ReformerLM(config)`` is token embedding + learned positional embedding, a
stack of ``n_layers`` blocks, a final LayerNorm and a linear LM head tied to
the token embedding. Each block has an attention sub-layer and a feed-forward
sub-layer, both pre-norm (LayerNorm before the sub-layer).

The switches of ``ReformerConfig`` turn an ordinary Transformer into the
Reformer (Kitaev, Kaiser and Levskaya, "Reformer: The Efficient Transformer",
ICLR 2020) one idea at a time:

* ``attention="full"``: exact causal softmax attention. ``attention="lsh"``:
  LSH attention (``reformer_lab.lsh.LSHSelfAttention``), which always shares
  the query and key projection.
* ``shared_qk``: full attention with one projection for queries and keys, as
  LSH attention needs. Keys are unit-normalised and a token does not attend to
  itself unless no other key is allowed (the first position of a causal
  sequence), as Kitaev et al. 2020 describe under "Causal masking for
  shared-QK attention".
* ``reversible``: the blocks form a reversible residual network
  y1 = x1 + Attention(x2), y2 = x2 + FeedForward(y1), whose inputs are
  recomputed in the backward pass instead of stored. The stack starts from
  x1 = x2 = embedding and its output is (y1 + y2) / 2.
* ``ff_chunks``: the feed-forward layer runs on that many chunks of the
  sequence, one at a time, to bound its activation memory.

With ``attention="full"``, ``reversible=False`` and ``shared_qk=False`` the
model is an ordinary pre-norm decoder-only Transformer, the baseline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import naive_attention
from .lsh import LSHSelfAttention, full_shared_qk_attention
from .feedforward import ChunkedFeedForward, FeedForward
from .reversible import ReversibleBlock, ReversibleSequence

__all__ = ["ReformerConfig", "ReformerLM"]


@dataclass
class ReformerConfig:
    """Sizes and switches of ``ReformerLM``. Defaults give a model that trains on a CPU in minutes."""

    vocab_size: int = 256
    """Number of token ids. 256 covers any byte-level text; set it from the tokenizer."""

    max_seq_len: int = 256
    """Maximum input length in tokens; sizes the learned positional embedding. 256
    characters span a few sentences of English text."""

    d_model: int = 128
    """Width of the residual stream in features. With the other defaults and a character
    vocabulary the model has about 0.4 M parameters, small enough to train on a CPU."""

    n_layers: int = 2
    """Number of blocks (attention + feed-forward). Two is the smallest stack that
    can compose attention lookups; add layers on a GPU."""

    n_heads: int = 4
    """Attention heads; each head has d_model / n_heads features (32 by default)."""

    d_ff: int = 512
    """Hidden width of the feed-forward layer, 4 x d_model as in the original Transformer."""

    attention: str = "full"
    """"full" for exact attention, "lsh" for LSH attention."""

    reversible: bool = False
    """Reversible residual blocks: activation memory independent of n_layers, one
    extra forward per block in the backward pass."""

    shared_qk: bool = False
    """One projection for queries and keys in full attention (always on for LSH)."""

    ff_chunks: int = 1
    """Sequence chunks the feed-forward layer runs on one at a time; 1 means no chunking."""

    n_hashes: int = 2
    """LSH hash rounds. More rounds miss fewer neighbours and cost time and memory
    linearly. Kitaev et al. 2020 compare 1, 2, 4 and 8 rounds; 2 keeps CPU runs cheap."""

    chunk_length: int = 64
    """LSH attention chunk in tokens: each query attends within its chunk and the one
    before it. 64 is the Reformer's default."""

    n_buckets: Optional[int] = None
    """LSH buckets per round (even). None picks 2 L / chunk_length rounded up to a power
    of two on each call, so an average bucket fills at most half a chunk."""

    causal: bool = True
    """Causal masking: token t attends to tokens s <= t. A language model needs it."""

    dropout: float = 0.0
    """Dropout probability after the embedding, attention and feed-forward. 0 because
    short runs underfit rather than overfit."""

    hash_seed: Optional[int] = None
    """Seed of the LSH rotations. An int makes every forward pass draw the same
    rotations (layer i uses hash_seed + i), so evaluation is reproducible. None draws
    fresh rotations each pass, as in training; reversible recompute replays them."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff",
                     "ff_chunks", "n_hashes", "chunk_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}, "
                f"because each head gets d_model / n_heads features"
            )
        if self.attention not in ("full", "lsh"):
            raise ValueError(f"attention must be 'full' or 'lsh', got {self.attention!r}")
        if self.n_buckets is not None and (self.n_buckets < 2 or self.n_buckets % 2):
            raise ValueError(f"n_buckets must be None or an even integer >= 2, got {self.n_buckets!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        """Return the fields as a plain dict, for checkpoints and results files."""
        return asdict(self)


class FullSelfAttention(nn.Module):
    """Multi-head exact self-attention, softmax(Q K^T / sqrt(d_head)) V, optionally with shared QK.

    Input and output ``(B, L, d_model)``. With ``shared_qk`` the keys are the
    queries scaled to unit length, and the score of a token with itself is set
    to -1e5 so it only wins when nothing else is allowed
    (``reformer_lab.lsh.full_shared_qk_attention``, the dense reference of LSH
    attention).
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, shared_qk: bool, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.shared_qk = shared_qk
        n_projections = 2 if shared_qk else 3
        self.in_projection = nn.Linear(d_model, n_projections * d_model, bias=False)
        self.out_projection = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)  # (B, H, L, dh)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        batch, length, width = x.shape
        projections = self.in_projection(x).chunk(2 if self.shared_qk else 3, dim=-1)
        heads = [self._split_heads(p) for p in projections]  # each (B, H, L, dh)
        padding = None if key_padding_mask is None else key_padding_mask[:, None, :]  # (B, 1, L)

        if self.shared_qk:
            shared, value = heads
            output = full_shared_qk_attention(shared, value, causal=self.causal, key_padding_mask=padding)
        else:
            query, key, value = heads
            output = naive_attention(query, key, value, causal=self.causal, key_padding_mask=padding)

        output = output.transpose(1, 2).reshape(batch, length, width)  # (B, L, d_model)
        return self.dropout(self.out_projection(output))


class PreNorm(nn.Module):
    """LayerNorm followed by a sub-layer: x -> sublayer(LayerNorm(x))."""

    def __init__(self, d_model: int, sublayer: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.sublayer = sublayer

    def forward(self, x: Tensor) -> Tensor:
        return self.sublayer(self.norm(x))


def _make_attention(config: ReformerConfig, layer: int) -> nn.Module:
    if config.attention == "full":
        return FullSelfAttention(
            config.d_model, config.n_heads, causal=config.causal,
            shared_qk=config.shared_qk, dropout=config.dropout,
        )

    return LSHSelfAttention(
        config.d_model, config.n_heads, n_hashes=config.n_hashes, chunk_length=config.chunk_length,
        n_buckets=config.n_buckets, causal=config.causal, dropout=config.dropout,
        hash_seed=None if config.hash_seed is None else config.hash_seed + layer,
    )


def _make_feedforward(config: ReformerConfig) -> nn.Module:
    feedforward = FeedForward(config.d_model, config.d_ff, config.dropout)
    if config.ff_chunks == 1:
        return feedforward
    return ChunkedFeedForward(feedforward, config.ff_chunks)


class ResidualBlock(nn.Module):
    """Ordinary pre-norm block: x = x + Attention(LN(x)); x = x + FeedForward(LN(x))."""

    def __init__(self, attention: nn.Module, feedforward: nn.Module, d_model: int) -> None:
        super().__init__()
        self.attention = PreNorm(d_model, attention)
        self.feedforward = PreNorm(d_model, feedforward)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(x)
        return x + self.feedforward(x)


class ReformerLM(nn.Module):
    """Decoder-only language model configured by ``ReformerConfig``.

    ``forward(tokens (B, L)) -> logits (B, L, vocab_size)``, where the logits
    at position t predict token t + 1; any L from 1 to ``max_seq_len``.
    Parameters are drawn from ``generator`` (normal, std 0.02, as in GPT-2)
    when one is given, else from torch's default generator.
    """

    def __init__(self, config: ReformerConfig, *, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = self._make_blocks(config)
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied input and output embeddings
        self._init_parameters(generator)

    def _make_blocks(self, config: ReformerConfig) -> nn.Module:
        attentions = [_make_attention(config, layer) for layer in range(config.n_layers)]
        feedforwards = [_make_feedforward(config) for _ in range(config.n_layers)]
        if not config.reversible:
            return nn.ModuleList(
                ResidualBlock(a, f, config.d_model) for a, f in zip(attentions, feedforwards)
            )

        blocks = [
            ReversibleBlock(PreNorm(config.d_model, a), PreNorm(config.d_model, f))
            for a, f in zip(attentions, feedforwards)
        ]
        return ReversibleSequence(blocks, reversible=True)

    def _init_parameters(self, generator: Optional[torch.Generator]) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.normal_(0.0, 0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Return the logits ``(B, L, vocab_size)`` for token ids ``(B, L)``."""
        self._check_tokens(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, L, d_model)
        x = self.embedding_dropout(x)

        if self.config.reversible:
            y1, y2 = self.blocks(x, x)
            x = (y1 + y2) / 2  # (B, L, d_model)
        else:
            for block in self.blocks:
                x = block(x)

        return self.lm_head(self.final_norm(x))  # (B, L, vocab_size)

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be an integer tensor of shape (B, L), got shape {tuple(tokens.shape)} "
                f"and dtype {tokens.dtype}; add a batch dimension with tokens[None]"
            )
        length = tokens.shape[1]
        if not 1 <= length <= self.config.max_seq_len:
            raise ValueError(
                f"sequence length {length} must be between 1 and max_seq_len="
                f"{self.config.max_seq_len}; cut the input or raise max_seq_len"
            )

    def loss(self, tokens: Tensor, *, ignore_index: int = -100) -> Tensor:
        """Return the mean next-token cross-entropy in nats for windows ``(B, L + 1)``.

        The model reads ``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``.
        Targets equal to ``ignore_index`` are skipped, and where such a padding
        value is an input the model reads id 0 instead.
        """
        inputs = tokens[:, :-1].masked_fill(tokens[:, :-1] == ignore_index, 0)
        logits = self(inputs)  # (B, L, vocab_size)
        targets = tokens[:, 1:]  # (B, L)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Extend ``prompt`` ``(B, P)`` or ``(P,)`` by ``max_new_tokens`` tokens, one at a time.

        ``greedy=True`` takes the most likely token. Otherwise the next token is
        sampled from softmax(logits / temperature), restricted to the ``top_k``
        most likely tokens when ``top_k`` is set; samples are drawn from
        ``generator``, which must be on the model's device. The model sees at
        most the last ``max_seq_len`` tokens. Returns prompt and continuation
        with the prompt's number of dimensions. Runs in eval mode and restores
        the previous mode.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; use greedy=True for argmax")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be None or in [1, {self.config.vocab_size}], got {top_k}")
        single = prompt.dim() == 1
        tokens = prompt[None] if single else prompt  # (B, P)
        if tokens.shape[1] == 0:
            raise ValueError("prompt must contain at least one token")

        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.config.max_seq_len:])[:, -1, :]  # (B, vocab_size)
            next_token = self._pick_next(logits, greedy, temperature, top_k, generator)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)  # (B, P + step + 1)
        self.train(was_training)
        return tokens[0] if single else tokens

    @staticmethod
    def _pick_next(
        logits: Tensor, greedy: bool, temperature: float, top_k: Optional[int],
        generator: Optional[torch.Generator],
    ) -> Tensor:
        if greedy:
            return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        logits = logits / temperature
        if top_k is not None:
            threshold = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1)  # (B, vocab_size)
        return torch.multinomial(probabilities, 1, generator=generator)  # (B, 1)

    def num_parameters(self) -> int:
        """Number of trainable parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
