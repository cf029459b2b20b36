"""Reversible residual layers (RevNet; Gomez et al. 2017), as used in the Reformer.

A reversible block maps a pair of activations to a pair (Kitaev et al. 2020,
section 3, equations 7 and 8):

    y1 = x1 + F(x2)            x2 = y2 - G(y1)
    y2 = x2 + G(y1)            x1 = y1 - F(x2)

Because each block's inputs can be rebuilt from its outputs, a stack of blocks
needs to keep only the outputs of the last block for the backward pass. The
backward pass walks the stack from the top, and for every block it

1. recomputes G(y1) with autograd on, rebuilds x2 = y2 - G(y1) and
   backpropagates through G;
2. recomputes F(x2) with autograd on, rebuilds x1 = y1 - F(x2) and
   backpropagates through F.

So the activations stored for backward do not grow with the number of blocks,
at the cost of one extra forward pass of every F and G.

F and G may draw random numbers (dropout masks, LSH rotations). The forward
pass records the state of the random number generators before every F and G
call, and the recompute runs from that recorded state, so it draws the same
dropout masks and the same LSH rotations. Recorded are torch's CPU generator,
the CUDA generator of the inputs' device when they are on a GPU, and any
``torch.Generator`` passed to F or G through ``f_kwargs`` / ``g_kwargs``.

NOTE: the recompute runs on the rebuilt inputs, which differ from the forward
pass's inputs by rounding. A hash that lies within that rounding of an LSH
bucket boundary can land in another bucket in the recompute, and the
gradients for that position then differ from ordinary backpropagation's.
The tests use sizes where this does not happen.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["ReversibleBlock", "ReversibleSequence"]


class _RNGSnapshot:
    """States of the random number generators that F or G may draw from."""

    def __init__(self, device: torch.device, generators: Sequence[torch.Generator] = ()) -> None:
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.generator_states = [(generator, generator.get_state()) for generator in generators]

    def restore(self) -> None:
        """Set every recorded generator back to its recorded state."""
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        for generator, state in self.generator_states:
            generator.set_state(state)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from the recorded states, then put the generators back as they were."""
        current = _RNGSnapshot(self.device, [generator for generator, _ in self.generator_states])
        self.restore()
        try:
            yield
        finally:
            current.restore()


def _generators_in(kwargs: Dict[str, Any]) -> List[torch.Generator]:
    return [value for value in kwargs.values() if isinstance(value, torch.Generator)]


def _trainable_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def _check_kwargs(name: str, kwargs: Dict[str, Any]) -> None:
    for key, value in kwargs.items():
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(
                f"{name}[{key!r}] requires grad, but the reversible backward pass "
                f"differentiates only x1, x2 and the blocks' parameters. Pass it "
                f"detached, or run the sequence with reversible=False"
            )


class ReversibleBlock(nn.Module):
    """One reversible residual block: y1 = x1 + F(x2), y2 = x2 + G(y1).

    In the Reformer, F is layer norm + attention and G is layer norm + a
    (chunked) feed-forward layer. Both must map a ``(..., L, d)`` tensor to a
    tensor of the same shape.

    Args:
        f: the module F.
        g: the module G.
    """

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        f_kwargs: Optional[Dict[str, Any]] = None,
        g_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Compute y1 = x1 + F(x2) and y2 = x2 + G(y1), each ``(..., L, d)``.

        ``f_kwargs`` and ``g_kwargs`` are passed to F and G as keyword arguments
        (for example a ``key_padding_mask``).
        """
        y1 = x1 + self.f(x2, **(f_kwargs or {}))
        y2 = x2 + self.g(y1, **(g_kwargs or {}))
        return y1, y2

    def inverse(
        self,
        y1: Tensor,
        y2: Tensor,
        f_kwargs: Optional[Dict[str, Any]] = None,
        g_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Rebuild the inputs from the outputs: x2 = y2 - G(y1), then x1 = y1 - F(x2).

        The result equals the inputs up to floating-point rounding only when F
        and G compute what they computed in the forward pass. This is the case in
        ``eval()`` mode for deterministic F and G. When F or G draw random
        numbers, set the generators back to their state before the forward
        pass first.
        """
        x2 = y2 - self.g(y1, **(g_kwargs or {}))
        x1 = y1 - self.f(x2, **(f_kwargs or {}))
        return x1, x2

    def forward_recording_rng(
        self,
        x1: Tensor,
        x2: Tensor,
        f_kwargs: Dict[str, Any],
        g_kwargs: Dict[str, Any],
    ) -> Tuple[Tensor, Tensor, _RNGSnapshot, _RNGSnapshot]:
        """Run ``forward`` and also return the generator states before F and before G."""
        f_rng = _RNGSnapshot(x2.device, _generators_in(f_kwargs))
        y1 = x1 + self.f(x2, **f_kwargs)
        g_rng = _RNGSnapshot(y1.device, _generators_in(g_kwargs))
        y2 = x2 + self.g(y1, **g_kwargs)
        return y1, y2, f_rng, g_rng

    def backward_from_outputs(
        self,
        y1: Tensor,
        y2: Tensor,
        grad_y1: Tensor,
        grad_y2: Tensor,
        f_rng: _RNGSnapshot,
        g_rng: _RNGSnapshot,
        f_kwargs: Dict[str, Any],
        g_kwargs: Dict[str, Any],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, List[Tuple[nn.Parameter, Tensor]]]:
        """Rebuild this block's inputs from its outputs and backpropagate through it.

        Implements the backward pass of reversible residual networks
        (Gomez et al. 2017):

            x2 = y2 - G(y1)     dL/dx1 = dL/dy1 + (dG/dy1)^T dL/dy2
            x1 = y1 - F(x2)     dL/dx2 = dL/dy2 + (dF/dx2)^T dL/dx1

        Returns ``(x1, x2, grad_x1, grad_x2, parameter_gradients)``, where
        ``parameter_gradients`` pairs each trainable parameter of F and G with
        its gradient (a parameter that F and G share appears twice).
        """
        # 1. Recompute G(y1), rebuild x2 and backpropagate dL/dy2 through G.
        y1 = y1.detach().requires_grad_(True)
        g_parameters = _trainable_parameters(self.g)
        with torch.enable_grad(), g_rng.replay():
            g_y1 = self.g(y1, **g_kwargs)
        grad_y1_through_g, g_gradients = _backpropagate(g_y1, y1, g_parameters, grad_y2)
        with torch.no_grad():
            x2 = y2 - g_y1
            grad_x1 = grad_y1 if grad_y1_through_g is None else grad_y1 + grad_y1_through_g
        del g_y1

        # 2. Recompute F(x2), rebuild x1 and backpropagate dL/dx1 through F.
        x2 = x2.requires_grad_(True)
        f_parameters = _trainable_parameters(self.f)
        with torch.enable_grad(), f_rng.replay():
            f_x2 = self.f(x2, **f_kwargs)
        grad_x2_through_f, f_gradients = _backpropagate(f_x2, x2, f_parameters, grad_x1)
        with torch.no_grad():
            x1 = y1 - f_x2
            grad_x2 = grad_y2 if grad_x2_through_f is None else grad_y2 + grad_x2_through_f

        return x1, x2.detach(), grad_x1, grad_x2, g_gradients + f_gradients


def _backpropagate(
    output: Tensor,
    input: Tensor,
    parameters: List[nn.Parameter],
    grad_output: Tensor,
) -> Tuple[Optional[Tensor], List[Tuple[nn.Parameter, Tensor]]]:
    """Return the vector-Jacobian products of ``output`` with ``input`` and ``parameters``.

    Entries that ``output`` does not depend on are None (input) or left out
    (parameters).
    """
    if not output.requires_grad:
        return None, []
    gradients = torch.autograd.grad(
        output, [input, *parameters], grad_outputs=grad_output, allow_unused=True
    )
    parameter_gradients = [
        (parameter, gradient)
        for parameter, gradient in zip(parameters, gradients[1:])
        if gradient is not None
    ]
    return gradients[0], parameter_gradients


class _BackwardChain:
    """Outputs of the block whose backward pass runs next, passed down the stack.

    Each block's backward pass rebuilds the block's inputs, which are the
    outputs of the block below it, and leaves them here for that block.
    """

    def __init__(self) -> None:
        self.outputs: Optional[Tuple[Tensor, Tensor]] = None


class _ReversibleBlockFunction(torch.autograd.Function):
    """One reversible block that stores no activations for backward.

    Only the top block of a stack saves its outputs. Every other block gets
    its outputs in backward from the ``_BackwardChain``, filled in by the
    block above it, which autograd runs first because it consumes this block's
    outputs. The block's trainable parameters are inputs after the settings,
    so autograd receives their gradients one block at a time and adds them to
    ``.grad`` as it would for an ordinary layer. This also makes the outputs
    require grad when a parameter does, even if x1 and x2 do not.
    """

    @staticmethod
    def forward(ctx, x1, x2, block, chain, is_top, f_kwargs, g_kwargs, *parameters):
        y1, y2, f_rng, g_rng = block.forward_recording_rng(x1, x2, f_kwargs, g_kwargs)
        if is_top:
            ctx.save_for_backward(y1, y2)
        ctx.block = block
        ctx.chain = chain
        ctx.is_top = is_top
        ctx.rng = (f_rng, g_rng)
        ctx.kwargs = (f_kwargs, g_kwargs)
        ctx.parameters = parameters
        return y1, y2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y1, grad_y2):
        y1, y2 = ctx.saved_tensors if ctx.is_top else ctx.chain.outputs
        ctx.chain.outputs = None
        f_rng, g_rng = ctx.rng
        f_kwargs, g_kwargs = ctx.kwargs
        x1, x2, grad_x1, grad_x2, parameter_gradients = ctx.block.backward_from_outputs(
            y1, y2, grad_y1, grad_y2, f_rng, g_rng, f_kwargs, g_kwargs
        )
        ctx.chain.outputs = (x1, x2)

        # A parameter that F and G share gets the sum of its two gradients.
        gradient_sums: Dict[int, Tensor] = {}
        for parameter, gradient in parameter_gradients:
            key = id(parameter)
            gradient_sums[key] = gradient if key not in gradient_sums else gradient_sums[key] + gradient
        grad_parameters = tuple(gradient_sums.get(id(parameter)) for parameter in ctx.parameters)
        return (grad_x1, grad_x2, None, None, None, None, None, *grad_parameters)


class ReversibleSequence(nn.Module):
    """A stack of ``ReversibleBlock``s, called as ``sequence(x1, x2) -> (y1, y2)``.

    With ``reversible=True`` and autograd recording, each block runs as a
    custom ``torch.autograd.Function`` that stores no activations, except that
    the top block stores its outputs. The backward pass rebuilds every block's
    inputs from its outputs and recomputes F and G, replaying their random
    numbers. The activations
    kept for backward are then two ``(..., L, d)`` tensors whatever the depth.

    With ``reversible=False`` the very same blocks run with ordinary autograd,
    which stores every block's activations: the reference that the reversible
    gradients are tested against.

    Under ``torch.no_grad()``, or when neither the inputs nor any parameter
    requires grad, both settings run the blocks plainly, without recording
    generator states.

    Args:
        blocks: the reversible blocks, applied in order.
        reversible: use the memory-saving backward pass.

    The reversible backward pass supports one derivative: double backward
    raises an error.

    NOTE: modules that change state in their forward pass (batch norm running
    statistics) are updated twice per step when ``reversible=True``, because
    the backward pass runs F and G again.
    """

    def __init__(self, blocks: Iterable[ReversibleBlock], reversible: bool = True) -> None:
        super().__init__()
        blocks = list(blocks)
        for index, block in enumerate(blocks):
            if not isinstance(block, ReversibleBlock):
                raise ValueError(
                    f"blocks[{index}] must be a ReversibleBlock, got {type(block).__name__}. "
                    f"Wrap your modules as ReversibleBlock(f, g)"
                )
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        f_kwargs: Optional[Dict[str, Any]] = None,
        g_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Apply every block in order to the pair ``(x1, x2)``, each ``(..., L, d)``.

        ``f_kwargs`` / ``g_kwargs`` are passed as keyword arguments to every F /
        G call. Tensors among them must not require grad when
        ``reversible=True``, because their gradients are not computed.
        """
        if x1.shape != x2.shape:
            raise ValueError(
                f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}. "
                f"The Reformer starts from x1 = x2 = the embeddings"
            )
        f_kwargs = dict(f_kwargs or {})
        g_kwargs = dict(g_kwargs or {})
        parameters = _trainable_parameters(self)
        needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or bool(parameters))

        if self.reversible and needs_grad and len(self.blocks) > 0:
            _check_kwargs("f_kwargs", f_kwargs)
            _check_kwargs("g_kwargs", g_kwargs)
            return self._forward_reversible(x1, x2, f_kwargs, g_kwargs)

        for block in self.blocks:
            x1, x2 = block(x1, x2, f_kwargs, g_kwargs)
        return x1, x2

    def _forward_reversible(
        self, x1: Tensor, x2: Tensor, f_kwargs: Dict[str, Any], g_kwargs: Dict[str, Any]
    ) -> Tuple[Tensor, Tensor]:
        chain = _BackwardChain()
        top = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            parameters = _trainable_parameters(block)
            x1, x2 = _ReversibleBlockFunction.apply(
                x1, x2, block, chain, index == top, f_kwargs, g_kwargs, *parameters
            )
        return x1, x2

    def inverse(
        self,
        y1: Tensor,
        y2: Tensor,
        f_kwargs: Optional[Dict[str, Any]] = None,
        g_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Rebuild the stack's inputs from its outputs, last block first.

        Exact up to floating-point rounding, which accumulates over the blocks;
        see ``ReversibleBlock.inverse`` for when F and G draw random numbers.
        """
        for block in reversed(self.blocks):
            y1, y2 = block.inverse(y1, y2, f_kwargs, g_kwargs)
        return y1, y2
