"""Position-wise feed-forward layers, whole or one chunk of positions at a time.

The feed-forward layer of a Transformer,

    FFN(x) = W2 dropout(activation(W1 x + b1)) + b2,

acts on every position separately, so it can run on chunks of the sequence
and give the same result (Kitaev et al. 2020, section 3, equation 10). Run
whole, it keeps an ``(..., L, d_ff)`` hidden activation in memory, usually 4x
the size of its input. Run in c chunks, it keeps ``(..., L / c, d_ff)`` at a
time.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["FeedForward", "ChunkedFeedForward"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class FeedForward(nn.Module):
    """FFN(x) = W2 dropout(activation(W1 x + b1)) + b2, for ``x`` of shape ``(..., L, d_model)``.

    Args:
        d_model: input and output features.
        d_ff: hidden features.
        dropout: probability of zeroing a hidden unit during training.
        activation: ``"gelu"`` (the Reformer's choice), ``"relu"``, or any
            callable applied elementwise to the hidden activation.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: Union[str, Callable[[Tensor], Tensor]] = "gelu",
    ) -> None:
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("d_ff", d_ff)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(
                    f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}"
                )
            activation = _ACTIVATIONS[activation]()
        elif not callable(activation):
            raise ValueError(f"activation must be a string or a callable, got {activation!r}")

        self.linear_in = nn.Linear(d_model, d_ff)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)
        self.linear_out = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(..., L, d_model)`` to ``(..., L, d_model)``."""
        hidden = self.dropout(self.activation(self.linear_in(x)))  # (..., L, d_ff)
        return self.linear_out(hidden)  # (..., L, d_model)


class ChunkedFeedForward(nn.Module):
    """Apply a position-wise module to ``n_chunks`` chunks of the sequence (dim -2), one at a time.

    The output and the gradients equal those of ``feedforward(x)``, also when
    L is not a multiple of ``n_chunks`` (chunk lengths then differ by at most
    one, as ``torch.tensor_split`` makes them).

    When autograd records, each chunk runs under non-reentrant activation
    checkpointing (``torch.utils.checkpoint``): the forward pass keeps no hidden
    activation of the chunk, and the backward pass recomputes one chunk at a
    time, replaying its dropout masks (checkpointing restores the CPU and CUDA
    generator states). So the whole ``(..., L, d_ff)`` hidden activation
    exists neither in forward nor in backward; at most one chunk's does. The
    price is one extra forward pass of the module in training.

    Args:
        feedforward: a module that acts on each position separately, mapping
            ``(..., L, d_in)`` to ``(..., L, d_out)``, such as ``FeedForward``
            or ``nn.Sequential(nn.LayerNorm(d), FeedForward(d, d_ff))``.
        n_chunks: number of chunks; 1 calls ``feedforward`` on the whole input.
    """

    def __init__(self, feedforward: nn.Module, n_chunks: int) -> None:
        super().__init__()
        _positive_int("n_chunks", n_chunks)
        self.feedforward = feedforward
        self.n_chunks = n_chunks

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(..., L, d_in)`` to ``(..., L, d_out)``, one chunk of positions at a time."""
        if x.dim() < 2:
            raise ValueError(f"x must have shape (..., L, d), got shape {tuple(x.shape)}")
        if self.n_chunks == 1 or x.shape[-2] <= 1:
            return self.feedforward(x)

        chunks = [chunk for chunk in x.tensor_split(self.n_chunks, dim=-2) if chunk.shape[-2] > 0]
        if torch.is_grad_enabled():
            outputs = [checkpoint(self.feedforward, chunk, use_reentrant=False) for chunk in chunks]
        else:
            outputs = [self.feedforward(chunk) for chunk in chunks]
        return torch.cat(outputs, dim=-2)  # (..., L, d_out)
