"""The quantized linear layer as two ``torch.library`` custom ops, for ``torch.compile``.

Eager training runs :class:`~rayfp4.precision.linear.QuantizedLinear` through an autograd
function whose Python (operand roles, random streams, telemetry, ``Tensor.item()`` in the
reference quantizers) Dynamo cannot trace: a compiled model broke its graph at every such layer.
Under ``torch.compile`` the layer calls these ops instead, which Dynamo and AOTAutograd see as two
opaque nodes with known output shapes (their fake implementations):

- ``rayfp4::quantized_linear(x, weight, bias, handle)``: the Fprop GEMM, ``y`` of ``[T, N_out]``;
- ``rayfp4::quantized_linear_backward(dy, x, weight, has_bias, handle, needs_x, needs_w, needs_b)``:
  ``(dx, dW, db)``.

Inside, both run the layer's own code (:func:`~rayfp4.precision.linear._forward`,
:func:`~rayfp4.precision.linear._backward`), so a compiled step computes what an eager step
computes, bit for bit (tests/test_compile.py). The difference is what is kept for the backward:
the op saves x and the weight and quantizes the backward's operands (x^T, the weight's tiles) in
the backward, where eager saves them packed from the forward. That is the same quantization work,
moved, and x's activation memory in its own dtype instead of ~0.28x of it.

``handle`` names the layer: an integer each layer gets when it is built (and again when copied or
unpickled), looked up in a registry that holds the layers weakly.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(layer) -> int:
    """A fresh handle for ``layer`` (its ops find it by this number)."""
    handle = next(_NEXT)
    _LAYERS[handle] = layer
    return handle


def _layer(handle: int):
    layer = _LAYERS.get(handle)
    if layer is None:
        raise RuntimeError(f"rayfp4: no quantized linear layer with handle {handle} (the layer was freed)")
    return layer


@torch.library.custom_op("rayfp4::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    from .linear import _forward

    # No backward operands here (the backward op builds them): the same y, whose Fprop operands
    # measure their own amax instead of sharing the read of x^T's (equal values).
    y, _, _, _ = _forward(_layer(handle), x, weight, bias, backward_needed=False)
    return y


@quantized_linear.register_fake
def _(x, weight, bias, handle):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("rayfp4::quantized_linear_backward", mutates_args=())
def quantized_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, handle: int,
                              needs_x: bool, needs_w: bool, needs_b: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .linear import _backward, _forward

    layer = _layer(handle)
    _, saved, quantize_bwd, finite = _forward(layer, x, weight, None, backward_needed=True, for_backward_only=True)
    dx, dw, db = _backward(layer, saved, dy, (needs_x, needs_w, needs_b), quantize_bwd=quantize_bwd, finite=finite,
                           x_dtype=x.dtype, tokens=x.shape[0], has_bias=has_bias)
    # A custom op returns tensors: an empty one stands for a gradient not asked for.
    return (x.new_empty(0) if dx is None else dx, weight.new_empty(0) if dw is None else dw,
            weight.new_empty(0, dtype=torch.float32) if db is None else db)


@quantized_linear_backward.register_fake
def _(dy, x, weight, has_bias, handle, needs_x, needs_w, needs_b):
    return (x.new_empty(x.shape) if needs_x else x.new_empty(0),
            weight.new_empty(weight.shape) if needs_w else weight.new_empty(0),
            weight.new_empty((weight.shape[0],) if needs_b and has_bias else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, handle = inputs
    ctx.save_for_backward(x, weight)
    ctx.handle, ctx.has_bias = handle, bias is not None


def _backward_formula(ctx, dy):
    x, weight = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    nb = bool(nb and ctx.has_bias)
    dx, dw, db = quantized_linear_backward(dy, x, weight, ctx.has_bias, ctx.handle, nx, nw, nb)
    return (dx if nx else None), (dw if nw else None), (db if nb else None), None


quantized_linear.register_autograd(_backward_formula, setup_context=_setup_context)
