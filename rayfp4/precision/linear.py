"""The quantized linear layer: the three GEMMs of the NVFP4 recipe as one autograd function.

For ``y = x W^T`` with x [T, K_in] (tokens, input features) and W [N_out, K_in]:

=====  ======================  ==========================================  ================
GEMM   computes                operands, quantized along the GEMM's K       rounding / RHT
=====  ======================  ==========================================  ================
Fprop  y  = x W^T              x: 1x16 along K_in; W: 16x16 tiles            RTNE, RTNE
Dgrad  dx = dy W               dy: 1x16 along N_out; W^T: the same codes     SR, -
Wgrad  dW = dy^T x             dy^T, x^T: 1x16 along tokens                  SR / RTNE, RHT
=====  ======================  ==========================================  ================

(32 instead of 16 for MXFP4.) Each GEMM accumulates in FP32 and applies the tensor factors once in
FP32 (the backend's ``gemm``); outputs come back in the input's dtype, weight gradients in the
weight's dtype (FP32 master weights). Every switch of the policy changes exactly its operand:
``weight_2d_scaling`` the weight tiles (and whether Dgrad reuses the Fprop codes),
``stochastic_rounding_grads`` the rounding of both dY operands, ``rht_wgrad`` the transform of
both Wgrad operands. The table is data: :class:`OperandRoles`, one :class:`OperandRole` per
operand (``fprop.x``, ``fprop.w``, ``dgrad.dy``, ``dgrad.w``, ``wgrad.dy``, ``wgrad.x``), built
once from the policy.

What backward needs is saved quantized: the Wgrad operand x^T (packed, ~0.28x of BF16) and, with
2-D weight scaling, the packed weight (its transpose is Dgrad's operand). No high-precision copy
of x is kept unless the late switch has moved the backward pass to BF16.

Non-finite inputs or gradients propagate as NaN instead of raising, so the training loop can
detect the step and skip it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import ms_eden
from ..kernels import resolve
from . import ops
from .fsdp import gathered_quantized
from .policy import PolicyError, PrecisionPolicy
from .runtime import PrecisionRuntime
from .telemetry import operand_stats

#: The backends whose NVFP4 quantizer takes a device seed in place of a generator (both quantize
#: with the Triton kernels; the reference needs a generator).
DEVICE_SEED_BACKENDS = frozenset({"triton", "cutlass"})


@dataclass(frozen=True)
class OperandRole:
    """How one operand of one GEMM is quantized: a row of the table above.

    name:       "<gemm>.<operand>", e.g. "dgrad.dy": the key of ``capture`` and of telemetry
    tile:       (1, block) blocks or (block, block) tiles along the GEMM's K
    stochastic: whether stochastic rounding applies (else RTNE); its stream is the GEMM's name
    rht:        whether the 16x16 random Hadamard transform applies first
    write_gemm_operand: whether a fast quantizer should also write the BF16 GEMM operand in the
                same pass (True: the GEMM uses it at once; False: the operand is saved packed
                for later; None: the backend's default)
    scale_selection: NVFP4 block-scale rule, "max6" (the recipe) or "four_over_six"
    ms_eden:    the Hadamard size of MS-EDEN quantization (16 or 128), or 0 when the operand is
                quantized as above (``stochastic`` and ``rht`` are then off)
    """

    name: str
    tile: tuple[int, int]
    stochastic: bool = False
    rht: bool = False
    write_gemm_operand: bool | None = None
    scale_selection: str = "max6"
    ms_eden: int = 0

    @property
    def gemm(self) -> str:
        """"fprop", "dgrad" or "wgrad"."""
        return self.name.partition(".")[0]

    @property
    def rounding(self) -> str:
        return "ms_eden" if self.ms_eden else "stochastic" if self.stochastic else "nearest"


@dataclass(frozen=True)
class OperandRoles:
    """The six operand roles of a layer's three GEMMs, from its policy."""

    fprop_x: OperandRole
    fprop_w: OperandRole
    dgrad_dy: OperandRole
    dgrad_w: OperandRole
    wgrad_dy: OperandRole
    wgrad_x: OperandRole

    @classmethod
    def from_policy(cls, policy: PrecisionPolicy) -> OperandRoles:
        blocks = (1, policy.block)
        sr, rht = policy.stochastic_rounding_grads, policy.rht_wgrad
        sel = policy.selection_for
        if policy.backward_rounding == "ms_eden":
            # Every backward operand is rotated and MS-EDEN-quantized from the Fprop operands'
            # values (Quartet II): dY along N_out and along the tokens, W^T along N_out, x^T along
            # the tokens.
            n = policy.ms_eden_hadamard
            return cls(
                fprop_x=OperandRole("fprop.x", blocks, scale_selection=sel("fprop.x")),
                fprop_w=OperandRole("fprop.w", policy.weight_tile, scale_selection=sel("fprop.w")),
                dgrad_dy=OperandRole("dgrad.dy", blocks, ms_eden=n),
                dgrad_w=OperandRole("dgrad.w", blocks, ms_eden=n),
                wgrad_dy=OperandRole("wgrad.dy", blocks, ms_eden=n),
                wgrad_x=OperandRole("wgrad.x", blocks, ms_eden=n),
            )
        return cls(
            fprop_x=OperandRole("fprop.x", blocks, scale_selection=sel("fprop.x")),
            fprop_w=OperandRole("fprop.w", policy.weight_tile, scale_selection=sel("fprop.w")),
            dgrad_dy=OperandRole("dgrad.dy", blocks, stochastic=sr, scale_selection=sel("dgrad.dy")),
            # W^T in the weight's tiles. With 2-D tiles those codes are Fprop's, transposed: the
            # layer reuses them instead of quantizing W^T (recipe section 5).
            dgrad_w=OperandRole("dgrad.w", policy.weight_tile, scale_selection=sel("dgrad.w")),
            wgrad_dy=OperandRole("wgrad.dy", blocks, stochastic=sr, rht=rht, write_gemm_operand=True,
                                 scale_selection=sel("wgrad.dy")),
            # Saved packed for backward: a BF16 operand would be activation memory meanwhile.
            wgrad_x=OperandRole("wgrad.x", blocks, rht=rht, write_gemm_operand=False,
                                scale_selection=sel("wgrad.x")),
        )


#: Saved quantized tensors whose BF16 GEMM operand (``gemm_operand``) is kept across
#: save_for_backward: only the weight's (weight-sized, not activation memory).
_KEEP_GEMM_OPERAND = frozenset({"wq_t", "wq"})


_GEMM_MODE_BACKENDS: dict = {}


def backend_for(policy: PrecisionPolicy, device):
    """The policy's backend on ``device`` (``rayfp4.kernels.resolve``), the triton backend's
    GEMM applying alpha as ``policy.gemm_mode`` says (one shared instance per mode)."""
    be = resolve(policy.backend, device)
    if be.name == "triton" and getattr(be, "gemm_mode", policy.gemm_mode) != policy.gemm_mode:
        if policy.gemm_mode not in _GEMM_MODE_BACKENDS:
            _GEMM_MODE_BACKENDS[policy.gemm_mode] = type(be)(gemm_mode=policy.gemm_mode)
        be = _GEMM_MODE_BACKENDS[policy.gemm_mode]
    return be


def _save(ctx, items: dict) -> None:
    """save_for_backward every tensor in ``items``, including the tensors of quantized tensors."""
    tensors, layout = [], {}
    for key, val in items.items():
        if isinstance(val, torch.Tensor):
            layout[key] = ("tensor", len(tensors))
            tensors.append(val)
        else:
            parts = val.tensor_fields()
            operand = val.gemm_operand if key in _KEEP_GEMM_OPERAND else None
            # The tensors travel through save_for_backward, the rest as a template without them.
            template = dataclasses.replace(val, **dict.fromkeys(parts, None))
            layout[key] = ("quantized", template, len(tensors), tuple(parts), operand is not None)
            tensors.extend(parts.values())
            if operand is not None:
                tensors.append(operand)
    ctx.layout = layout
    ctx.save_for_backward(*tensors)


def _load(ctx) -> dict:
    saved = ctx.saved_tensors
    out = {}
    for key, entry in ctx.layout.items():
        if entry[0] == "tensor":
            out[key] = saved[entry[1]]
        else:
            _, template, start, names, has_operand = entry
            q = dataclasses.replace(template, **{n: saved[start + i] for i, n in enumerate(names)})
            if has_operand:
                q.gemm_operand = saved[start + len(names)]
            out[key] = q
    return out


def _pad_tokens(t: torch.Tensor, block: int) -> torch.Tensor:
    """Zero rows up to a whole number of blocks: they add nothing to dW = dy^T x."""
    pad = -t.shape[0] % block
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _finite(layer, *tensors: torch.Tensor) -> bool:
    """Whether every value is finite, asked only where the quantizer raises on non-finite input.

    The fast quantizers (NVFP4, MXFP4 and MS-EDEN on Triton, which the CUTLASS backend quantizes
    with) propagate NaN/Inf through their scales instead (NaN out), which needs no host
    synchronisation; the reference raises, so its inputs are checked here first.
    """
    if layer.backend.propagates_nonfinite:
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _forward(layer, x, weight, bias, backward_needed: bool, *, for_backward_only: bool = False,
             amaxes: tuple | None = None):
    """The forward GEMM and what its backward needs: ``(y, saved, quantize_bwd, finite)``.

    ``for_backward_only``: only ``saved``, built from the same inputs with the same quantizations
    (bit for bit what the forward would have saved; ``y`` is None and the Fprop operands are not
    recorded again). The compiled path (``rayfp4.precision.ops``) saves x and the weight and builds
    the rest in its backward, so that its forward op returns one tensor.
    ``amaxes``: ``(x padded to whole blocks of tokens, amax of x, amax of x^T's Wgrad operand)``
    from the pass that produced x (the fused SwiGLU, :meth:`QuantizedLinear.fuses_swiglu`) in
    place of the layer's own amax pass; only where both directions quantize and x^T is not
    MS-EDEN's.
    """
    pol, rt, be, roles = layer.policy, layer.runtime, layer.backend, layer.roles
    b = pol.block
    # Without a backward pass to come (eval, generation) its operands are not quantized.
    quantize_fwd, quantize_bwd = not rt.forward_bf16, not rt.backward_bf16 and backward_needed
    # MS-EDEN quantizes the backward operands from the Fprop operands' values (or from x and
    # W where Fprop ran in BF16), so nothing of x^T is quantized here.
    eden = bool(roles.wgrad_x.ms_eden)
    if amaxes is not None and not (quantize_fwd and quantize_bwd and not eden):
        raise RuntimeError("_forward: precomputed amaxes are for a layer quantizing x and x^T (not MS-EDEN)")
    # Under FSDP2 with the 4-bit weight gather, the weight arrives quantized (its amax says
    # whether it is finite); Fprop and Dgrad use those codes, which equal quantizing it here.
    gathered = gathered_quantized(weight)
    finite = _finite(layer, x, weight if gathered is None else gathered.amax)
    record = (lambda *a: None) if for_backward_only else layer.record
    wq = xq = y = am_xt = None
    if not finite:
        if not for_backward_only:
            y = torch.full((x.shape[0], weight.shape[0]), float("nan"), device=x.device)
        quantize_bwd = False
    elif quantize_fwd:
        if amaxes is not None:  # x, padded, and its amaxes came from the pass that produced x
            x_pad, am_x, am_xt = amaxes
            xt_src = x_pad.t()
        else:
            # One read of x gives the tensor amax of both of its operands (x and x^T's RHT).
            xt_src = _pad_tokens(x, b).t() if quantize_bwd and not eden else None
            am_x, am_xt = layer.amaxes(xt_src, roles.wgrad_x) if xt_src is not None else (None, None)
        if not for_backward_only or (quantize_bwd and eden):
            xq = layer.quantize(x, roles.fprop_x, amax=am_x)
        if not for_backward_only or (quantize_bwd and (eden or pol.weight_2d_scaling)):
            wq = layer.quantize(weight, roles.fprop_w) if gathered is None else gathered
        if not for_backward_only:
            record(roles.fprop_x, x, xq)
            record(roles.fprop_w, weight if gathered is None else None, wq)
            # Without a bias the GEMM rounds straight to the output dtype (one rounding either way).
            y = be.gemm(xq, wq, torch.float32 if bias is not None else x.dtype)
    elif not for_backward_only:
        y = F.linear(x, weight.to(x.dtype)).float()
    if y is not None and bias is not None:
        y = y.float() + bias.float()

    saved = {"weight": weight}  # a parameter: saving it costs no activation memory
    if quantize_bwd and eden:
        saved["xsrc"] = xq if quantize_fwd else x  # packed: ~0.28x of BF16
        if wq is not None:
            saved["wq"] = wq
    elif quantize_bwd:
        if not quantize_fwd:
            xt_src = _pad_tokens(x, b).t()
        saved["xt"] = layer.quantize(xt_src, roles.wgrad_x, amax=am_xt if quantize_fwd else None)
        layer.record(roles.wgrad_x, xt_src, saved["xt"])
        if pol.weight_2d_scaling:
            if wq is None:
                wq = layer.quantize(weight, roles.fprop_w)
            saved["wq_t"] = wq.transpose()  # Dgrad's operand: the Fprop codes, transposed
    else:
        saved["x"] = x
    return (None if y is None else y.to(x.dtype)), saved, quantize_bwd, finite


def _backward(layer, s: dict, dy: torch.Tensor, needs: tuple, *, quantize_bwd: bool, finite: bool,
              x_dtype: torch.dtype, tokens: int, has_bias: bool):
    """``(dx, dW, db)`` from the saved operands ``s`` of :func:`_forward`; ``needs``: which of
    x, W, bias need a gradient."""
    pol, be, roles = layer.policy, layer.backend, layer.roles
    b = pol.block
    weight = s["weight"]
    handed = layer.take_dy(dy)  # taken in every case: a handed-over dY is not kept past this backward
    dy = dy.contiguous()
    dx = dw = db = None
    if not finite or not _finite(layer, dy):
        nan = float("nan")
        dx = torch.full((tokens, weight.shape[1]), nan, dtype=x_dtype, device=dy.device)
        dw = torch.full_like(weight, nan)
        db = torch.full((weight.shape[0],), nan, device=dy.device) if has_bias else None
        return dx, dw, db
    if quantize_bwd and roles.dgrad_dy.ms_eden:
        dx, dw = _ms_eden_backward(needs, layer, s, dy, x_dtype)
    elif quantize_bwd:
        if handed is not None:  # dY, padded, and its amaxes came from the pass that produced dY
            dy_pad, am_dy, am_dyt = handed
            dyt_src = dy_pad.t() if needs[1] else None
        else:
            dyt_src = _pad_tokens(dy, b).t() if needs[1] else None
            am_dy = am_dyt = None
            if needs[0] and needs[1]:
                am_dy, am_dyt = layer.amaxes(dyt_src, roles.wgrad_dy)  # both operands of dy from one read
        if needs[0]:
            dyq = layer.quantize(dy, roles.dgrad_dy, amax=am_dy)
            wt_src = weight.t() if gathered_quantized(weight) is None else None  # None: gathered in 4 bits
            wt = s["wq_t"] if pol.weight_2d_scaling else layer.quantize(wt_src, roles.dgrad_w)
            layer.record(roles.dgrad_dy, dy, dyq)
            layer.record(roles.dgrad_w, wt_src, wt)
            dx = be.gemm(dyq, wt, x_dtype)
        if needs[1]:
            dyt = layer.quantize(dyt_src, roles.wgrad_dy, amax=am_dyt)
            layer.record(roles.wgrad_dy, dyt_src, dyt)
            dw = be.gemm(dyt, s["xt"], torch.float32).to(weight.dtype)
    else:
        x = s["x"]
        if needs[0]:
            dx = (dy.float() @ weight.float()).to(x_dtype)
        if needs[1]:
            dw = (dy.float().t() @ x.float()).to(weight.dtype)
    if has_bias and needs[2]:
        db = dy.float().sum(0)
    return dx, dw, db


def _forward_saving(ctx, layer, x, weight, bias, backward_needed: bool, amaxes=None, extra: dict | None = None):
    """:func:`_forward` inside an autograd Function's forward: saves what the backward needs
    (with ``extra``, the tensors a fused producer's own backward needs) and returns y."""
    y, saved, quantize_bwd, finite = _forward(layer, x, weight, bias, backward_needed, amaxes=amaxes)
    _save(ctx, {**saved, **(extra or {})})
    ctx.layer, ctx.quantize_bwd, ctx.has_bias = layer, quantize_bwd, bias is not None
    ctx.x_dtype, ctx.tokens, ctx.finite = x.dtype, x.shape[0], finite
    return y


def _backward_saved(ctx, s: dict, dy: torch.Tensor, needs: tuple):
    """:func:`_backward` of what :func:`_forward_saving` saved (``s``, loaded once by the caller)."""
    return _backward(ctx.layer, s, dy, needs, quantize_bwd=ctx.quantize_bwd, finite=ctx.finite,
                     x_dtype=ctx.x_dtype, tokens=ctx.tokens, has_bias=ctx.has_bias)


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, backward_needed):
        return _forward_saving(ctx, layer, x, weight, bias, backward_needed)

    @staticmethod
    def backward(ctx, dy):
        dx, dw, db = _backward_saved(ctx, _load(ctx), dy, tuple(ctx.needs_input_grad[:3]))
        return dx, dw, db, None, None


class _SwiGLUQuantizedLinearFn(torch.autograd.Function):
    """The layer of h = ``F.silu(gate) * up`` (gate, up = ``gu.chunk(2, -1)``, gu the gate_up
    projection's output) with h computed in the backend's amax pass over it
    (:meth:`QuantizedLinear.fuses_swiglu`): what ``_QuantizedLinearFn`` of the product computes,
    bit for bit. Backward computes gu's gradient (autograd's silu and product backward, and the
    split's concatenation) in the pass that measures its amaxes
    (``swiglu_backward_amaxes``) and hands those to ``producer``, the gate_up projection, when its
    backward quantizes that dY (:meth:`QuantizedLinear.wants_dy`); autograd would have saved
    silu(gate) as well, and read and written gu's gradient many times over."""

    @staticmethod
    def forward(ctx, gu, weight, bias, layer, backward_needed, producer):
        f = gu.shape[1] // 2
        h, am_x, am_xt = layer.backend.swiglu_amaxes(gu[:, :f], gu[:, f:], layer.roles.wgrad_x.rht)
        ctx.producer = producer
        return _forward_saving(ctx, layer, h[:gu.shape[0]], weight, bias, backward_needed, (h, am_x, am_xt),
                               {"gu": gu})

    @staticmethod
    def backward(ctx, dy):
        s = _load(ctx)
        needs = ctx.needs_input_grad
        dh, dw, db = _backward_saved(ctx, s, dy, tuple(needs[:3]))
        dgu = None
        if needs[0]:
            gu, producer = s["gu"], ctx.producer
            f = gu.shape[1] // 2
            rht = producer.wants_dy() if isinstance(producer, QuantizedLinear) else None
            dgu_pad, am, am_t = ctx.layer.backend.swiglu_backward_amaxes(gu[:, :f], gu[:, f:], dh, bool(rht))
            if rht is not None:
                producer.hand_dy(dgu_pad, am, am_t)
            dgu = dgu_pad[:gu.shape[0]]
        return dgu, dw, db, None, None, None


class _RMSNormQuantizedLinearFn(torch.autograd.Function):
    """The layer of y = ``norm(x)`` (the model's RMSNorm) with the norm's products computed in the
    backend's amax pass over y (:meth:`QuantizedLinear.fuses_rmsnorm`): the reduction (rstd) is
    torch's own ops, as in the norm; then one read of x and one BF16 write of y. What
    ``_QuantizedLinearFn`` of ``norm(x)`` computes, bit for bit, the backward included
    (:func:`rmsnorm_backward` applies autograd's formulas with the same torch ops). Saves x and
    rstd, where autograd would also have saved the FP32 product x * rstd.

    x comes in twice (``x_sq``: the norm's second use of it, in its square): for an FP32 x, torch's
    norm uses x itself twice, and autograd adds the two gradients to x's one by one, after the
    residual connection's; returning them on two inputs keeps that order of additions, hence the
    bits. A BF16 x enters the norm through one cast, whose gradient is the sum of the two."""

    @staticmethod
    def forward(ctx, x, x_sq, norm_weight, weight, bias, layer, norm, backward_needed):
        rstd = norm.rstd(x.float())
        d = x.shape[-1]
        y_pad, am_x, am_xt = layer.backend.rmsnorm_amaxes(x.reshape(-1, d), rstd.reshape(-1), norm_weight,
                                                           layer.roles.wgrad_x.rht)
        return _forward_saving(ctx, layer, y_pad[:x.numel() // d], weight, bias, backward_needed, (y_pad, am_x, am_xt),
                               {"norm_x": x, "norm_rstd": rstd, "norm_weight": norm_weight})

    @staticmethod
    def backward(ctx, dy):
        s = _load(ctx)
        needs = ctx.needs_input_grad
        needs_x = needs[0] or needs[1]
        dnorm, dw, db = _backward_saved(ctx, s, dy, (needs_x or needs[2], needs[3], needs[4]))
        x = s["norm_x"]
        dx_prod, dx_sq, dnw = rmsnorm_backward(dnorm.reshape(x.shape), x, s["norm_rstd"], s["norm_weight"],
                                               (needs_x, needs[2]))
        if needs_x and x.dtype != torch.float32:  # x.float()'s backward: the sum, cast back
            dx_prod, dx_sq = (dx_prod + dx_sq).to(x.dtype), None
        return dx_prod, dx_sq, dnw, dw, db, None, None, None


def rmsnorm_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                     needs: tuple = (True, True)):
    """``(dx_prod, dx_sq, dweight)`` of ``rayfp4.model.RMSNorm`` (y = ((xf * rstd) * weight.float())
    cast to the input's dtype, xf = x.float(), rstd = rsqrt(mean(xf^2) + eps)) for the gradient
    ``grad`` of y, as autograd computes them from the norm's graph: the same torch ops in the same
    order, so the same bits (each node's formula, the broadcast reductions the engine applies).
    xf's gradient comes in its two parts, FP32, in the order autograd adds them: through the
    product xf * rstd, then through the square. ``needs``: whether x and weight need one (None
    otherwise)."""
    xf, wf = x.float(), weight.float()
    g = grad.float()  # the casts' backward: to the norm's FP32 output
    dx_prod = dx_sq = dw = None
    if needs[1]:  # y = a * wf, a = xf * rstd: d wf = g * a, summed over the broadcast dims
        dw = (g * (xf * rstd)).sum(tuple(range(x.dim() - 1)), keepdim=True).view(weight.shape).to(weight.dtype)
    if needs[0]:
        ga = g * wf
        dx_prod = ga * rstd  # a = xf * rstd, the xf side
        dr = (ga * xf).sum((x.dim() - 1,), keepdim=True)  # ... and the rstd side
        dm = -0.5 * dr * rstd.pow(3)  # rsqrt's backward (the + eps passes it on)
        dp = dm.expand(xf.shape) / x.shape[-1]  # mean's backward
        dx_sq = dp * (2.0 * xf)  # pow(2)'s backward
    return dx_prod, dx_sq, dw


def _ms_eden_backward(needs: tuple, layer, s: dict, dy: torch.Tensor, x_dtype: torch.dtype):
    """Dgrad and Wgrad with MS-EDEN operands (Quartet II): each GEMM draws one set of random
    Hadamard signs for both of its operands; W and x enter as the values Fprop multiplied."""
    roles, be = layer.roles, layer.backend
    n = roles.dgrad_dy.ms_eden
    weight = s["weight"]
    dx = dw = None
    if needs[0]:
        signs = layer.hadamard_signs("dgrad", n, dy.device)
        dyq = layer.quantize(dy, roles.dgrad_dy, signs=signs)
        w_vals = be.dequantize(s["wq"]) if "wq" in s else weight.float()
        wt = layer.quantize(w_vals.t(), roles.dgrad_w, signs=signs)
        layer.record(roles.dgrad_dy, None, dyq)
        layer.record(roles.dgrad_w, None, wt)
        dx = be.gemm(dyq, wt, x_dtype)
    if needs[1]:
        signs = layer.hadamard_signs("wgrad", n, dy.device)
        dyt = layer.quantize(_pad_tokens(dy, n).t(), roles.wgrad_dy, signs=signs)
        xsrc = s["xsrc"]
        x_vals = xsrc if isinstance(xsrc, torch.Tensor) else be.dequantize(xsrc)
        xt = layer.quantize(_pad_tokens(x_vals, n).t(), roles.wgrad_x, signs=signs)
        layer.record(roles.wgrad_dy, None, dyt)
        layer.record(roles.wgrad_x, None, xt)
        dw = be.gemm(dyt, xt, torch.float32).to(weight.dtype)
    return dx, dw


class QuantizedLinear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in the policy's 4-bit format (NVFP4 or MXFP4).

    Same parameters and state dict as ``nn.Linear``; the weight stays in its own (FP32 master)
    dtype and is quantized on every forward. ``capture`` (a dict, or None) receives the quantized
    operands of the last forward/backward under the keys ``fprop.x``, ``fprop.w``, ``dgrad.dy``,
    ``dgrad.w``, ``wgrad.dy``, ``wgrad.x``, for inspection and tests.
    """

    format = "nvfp4"
    #: Whether the SwiGLU product may be fused into the layer's amax pass where that is bit for bit
    #: the same (:meth:`fuses_swiglu`). Off unless asked: the training loop sets it per layer from
    #: ``train.fusions`` (:func:`rayfp4.precision.set_producer_fusions`; on where the steps replay
    #: CUDA graphs, where the H200 measured them faster, BENCHMARKS.md). Bit-identical either way.
    fuse_swiglu = False
    #: Whether a preceding RMSNorm's products may be fused into the layer's amax pass where that is
    #: bit for bit the same (:meth:`fuses_rmsnorm`). Set as ``fuse_swiglu``.
    fuse_rmsnorm = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, policy: PrecisionPolicy,
                 runtime: PrecisionRuntime | None = None, layer_index: int = 0, name: str = "",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if policy.format != self.format:
            raise PolicyError(f"precision.format: {type(self).__name__} needs format={self.format}, got {policy.format}")
        b = policy.block
        for dim, size in (("in_features", in_features), ("out_features", out_features)):
            if size % b:
                raise PolicyError(
                    f"precision.format: layer {name or '(unnamed)'} has {dim}={size}, not a multiple of the "
                    f"{self.format} block size {b} (its GEMMs quantize along both dimensions); keep it in BF16 "
                    f"with precision.bf16_modules"
                )
        if policy.backward_rounding == "ms_eden" and out_features % policy.ms_eden_hadamard:
            raise PolicyError(
                f"precision.ms_eden_hadamard: layer {name or '(unnamed)'} has out_features={out_features}, not a "
                f"multiple of the Hadamard size {policy.ms_eden_hadamard} (Dgrad rotates along it); use "
                f"ms_eden_hadamard: 16, or keep the layer in BF16 with precision.bf16_modules")
        self.policy = policy
        self.roles = OperandRoles.from_policy(policy)
        self.runtime = runtime if runtime is not None else PrecisionRuntime(policy)
        self.layer_index = layer_index
        self.layer_name = name
        self.capture: dict | None = None
        self.telemetry: dict[str, dict[str, float]] = {}
        self.backend = backend_for(policy, self.weight.device) if self.weight.device.type != "meta" else None
        self.op_handle = ops.register(self)  # how the compiled path's custom ops find this layer

    def __setstate__(self, state):
        super().__setstate__(state)
        self.op_handle = ops.register(self)  # a copy is a layer of its own

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantizedLinear":
        """A quantized layer sharing ``linear``'s parameters (optimizers keep working)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        # On the meta device (a model built only to check a policy) there is no kernel to pick.
        new.backend = backend_for(new.policy, linear.weight.device) if linear.weight.device.type != "meta" else None
        return new

    def quantize(self, t: torch.Tensor, role: OperandRole, amax=None, signs: torch.Tensor | None = None):
        """Quantize ``t`` as ``role`` says with the layer's backend; ``amax`` (NVFP4 only) comes
        from :meth:`amaxes`. SR draws from this layer's stream of the role's GEMM for the step;
        MS-EDEN (``signs`` from :meth:`hadamard_signs`) rounds its scales from the role's own stream.

        With the runtime's device seeds enabled, NVFP4 SR on the Triton quantizers (the triton
        and cutlass backends) takes the stream's key from the runtime's device seed table, the
        same bits as its generator (what a CUDA graph of the step needs); the reference backend,
        MXFP4 and MS-EDEN keep drawing from generators."""
        if role.ms_eden:
            generator = self.runtime.generator(self.layer_index, role.name, t.device)
            return self.backend.quantize_ms_eden(t, role.ms_eden, signs, generator)
        if not role.stochastic:
            generator = None
        elif (self.format == "nvfp4" and self.runtime.device_seeds is not None
              and self.backend.name in DEVICE_SEED_BACKENDS):
            generator = self.runtime.device_seed(self.layer_index, role.gemm, t.device)
        else:
            generator = self.runtime.generator(self.layer_index, role.gemm, t.device)
        if self.format == "nvfp4":
            return self.backend.quantize_nvfp4(t, role.tile, role.rounding, role.rht, generator, amax,
                                               role.write_gemm_operand, **self.selection_kwargs(role))
        return self.backend.quantize_mxfp4(t, role.tile, role.rounding, role.rht, generator,
                                           self.policy.mxfp4_scale_rule)

    def hadamard_signs(self, gemm: str, n: int, device) -> torch.Tensor:
        """The random signs of MS-EDEN's rotation for this layer's ``gemm`` at this step and
        micro-batch, shared by both of its operands (a stream of their own)."""
        return ms_eden.random_signs(n, self.runtime.generator(self.layer_index, f"{gemm}.signs", device), device)

    def selection_kwargs(self, role: OperandRole) -> dict:
        """The block-scale selection arguments of ``quantize_nvfp4`` for ``role``: none for the
        recipe's max6 (the backends' default), else the rule, its metric and its cap."""
        if role.scale_selection == "max6":
            return {}
        p = self.policy
        return {"scale_selection": role.scale_selection, "error_metric": p.scale_selection_metric,
                "scale_cap": float(p.scale_selection_cap)}

    def amaxes(self, xt: torch.Tensor, role: OperandRole):
        """(amax of x, amax of ``xt`` = x^T quantized as ``role``) from one read of x where the
        backend has such a pass (NVFP4 on a fast backend); else (None, None) and each quantization
        measures its own (MXFP4 has no tensor amax)."""
        if self.format != "nvfp4":
            return None, None
        return self.backend.amaxes(xt, role.rht)

    def wants_dy(self) -> bool | None:
        """Whether this layer's backward can take its dY with both amaxes from the pass that
        produced dY (the fused SwiGLU's backward, for the gate_up projection): None where it would
        not use them (dY not quantized as NVFP4 with the recipe's operands: MXFP4, MS-EDEN, BF16
        after the late switch, a backend without the Triton quantizers); else whether dY's Wgrad
        operand takes the RHT, which that pass applies before its second amax."""
        rt = self.runtime
        if (self.format != "nvfp4" or self.policy.backward_rounding == "ms_eden" or rt.backward_bf16
                or rt.all_bf16 or self.policy.block != 16 or not hasattr(self.backend, "swiglu_backward_amaxes")):
            return None
        return self.roles.wgrad_dy.rht

    def hand_dy(self, dy_pad: torch.Tensor, am_dy: torch.Tensor, am_dyt: torch.Tensor) -> None:
        """Keeps dY (its rows padded with zeros to whole blocks of 16) and its two amaxes (of dY,
        of dY^T's Wgrad operand) for this layer's next backward (:meth:`take_dy`)."""
        self._dy_handed = (dy_pad, am_dy, am_dyt)

    def take_dy(self, dy: torch.Tensor) -> tuple | None:
        """What :meth:`hand_dy` kept, if ``dy`` (the gradient this backward got) is its tensor: the
        same memory, shape and strides, the padding rows aside; else None. Clears it either way."""
        handed = self.__dict__.pop("_dy_handed", None)
        if handed is None:
            return None
        pad = handed[0]
        if (dy.data_ptr() != pad.data_ptr() or dy.dim() != 2 or dy.shape[1] != pad.shape[1]
                or not 0 <= pad.shape[0] - dy.shape[0] < 16 or dy.stride() != pad.stride() or dy.dtype != pad.dtype):
            return None
        return handed

    def record(self, role: OperandRole, src: torch.Tensor | None, q) -> None:
        """``src`` None: the operand arrived quantized (a weight gathered in 4 bits), so there is no
        high-precision source to measure telemetry against."""
        if self.capture is not None:
            self.capture[role.name] = q
        if self.runtime.telemetry_due and src is not None:
            self.telemetry[role.name] = operand_stats(src, q)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.weight.device.type != "meta":
            self.backend = backend_for(self.policy, self.weight.device)
        return out

    def _fusable(self, enabled: bool, backend_method: str, *inputs: torch.Tensor) -> bool:
        """What both producer fusions need: switched on; eager (checked first: a traced step must
        not read the runtime's step); an NVFP4 layer on a backend with ``backend_method``; both
        directions quantized with the recipe's operands (not MS-EDEN, not in BF16 after the late
        switch); a backward to come (``inputs``: the producer's tensors that may need gradients)."""
        if not enabled or torch.compiler.is_compiling():
            return False
        rt = self.runtime
        backward_needed = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (*inputs, self.weight, self.bias))
        return (self.format == "nvfp4" and hasattr(self.backend, backend_method)
                and self.policy.backward_rounding != "ms_eden" and not rt.forward_bf16 and not rt.backward_bf16
                and backward_needed)

    def fuses_swiglu(self, gu: torch.Tensor) -> bool:
        """Whether ``self(gu, swiglu=True)`` computes its input h = ``F.silu(gate) * up`` (gate, up
        = ``gu.chunk(2, -1)``) itself, in the pass that measures h's amax, and gu's gradient in
        the pass that measures that gradient's amaxes (``_SwiGLUQuantizedLinearFn``: no silu(gate)
        in memory, one write of h and of gu's gradient), rather than taking h from torch; the
        model's SwiGLU asks before it calls. Where the bits are the same: an NVFP4 layer on a
        backend with the Triton quantizers (``swiglu_amaxes``: triton, cutlass); a BF16 gu, not
        cast by autocast afterwards (the kernels match torch's silu after its rounding to BF16,
        not in FP32); both directions quantized with the recipe's operands (not MS-EDEN, not in
        BF16 after the late switch, a backward to come); eagerly (the compiled path has its own op)."""
        bf16 = torch.bfloat16
        return (self._fusable(self.fuse_swiglu, "swiglu_amaxes", gu)
                and gu.dtype == bf16 and gu.shape[-1] == 2 * self.in_features
                and (not torch.is_autocast_enabled(gu.device.type)
                     or torch.get_autocast_dtype(gu.device.type) == bf16))

    def fuses_rmsnorm(self, x: torch.Tensor, norm: nn.Module) -> bool:
        """Whether ``self(x, norm=norm)`` computes its input y = ``norm(x)`` itself (the model's
        RMSNorm: its rstd reduction by torch, then x * rstd * weight and the rounding to BF16 in the
        pass that measures y's amax, ``_RMSNormQuantizedLinearFn``) rather than taking y from
        torch; the model asks before it calls (``rayfp4.model.transformer.normed_projection``).
        Where the bits are the same: an NVFP4 layer on a backend with the Triton quantizers
        (``rmsnorm_amaxes``: triton, cutlass); x and the norm's weight in FP32 or BF16; the layer's
        input in BF16 (autocast to BF16, or BF16 x without autocast); both directions quantized
        with the recipe's operands (not MS-EDEN, not in BF16 after the late switch, a backward to
        come); eagerly (the compiled path traces the norm as torch ops)."""
        bf16, fp = torch.bfloat16, (torch.float32, torch.bfloat16)
        w = getattr(norm, "weight", None)
        if not (callable(getattr(norm, "rstd", None)) and isinstance(w, torch.Tensor)):
            return False
        autocast = torch.is_autocast_enabled(x.device.type)
        return (self._fusable(self.fuse_rmsnorm, "rmsnorm_amaxes", x, w)
                and x.dtype in fp and w.dtype in fp and x.shape[-1] == self.in_features and w.shape == (self.in_features,)
                and (torch.get_autocast_dtype(x.device.type) == bf16 if autocast else x.dtype == bf16))

    def forward(self, x: torch.Tensor, *, swiglu: bool = False, producer: nn.Module | None = None,
                norm: nn.Module | None = None) -> torch.Tensor:
        """The layer of x or, with ``swiglu``, of ``F.silu(gate) * up`` (gate, up = ``x.chunk(2,
        -1)``: x a gate_up projection's output), the product and its backward fused into the
        layer's amax passes where :meth:`fuses_swiglu` says so (``producer``: the projection that
        computed x, which then takes its dY's amaxes from that backward, :meth:`wants_dy`); with
        ``norm``, of ``norm(x)``, the norm's products fused into that pass where
        :meth:`fuses_rmsnorm` says so."""
        if norm is not None:
            if swiglu:
                raise ValueError(f"{self.layer_name or type(self).__name__}: norm and swiglu do not combine")
            if self.fuses_rmsnorm(x, norm):
                lead = x.shape[:-1]
                y = _RMSNormQuantizedLinearFn.apply(x, x, norm.weight, self.weight, self.bias, self, norm, True)
                return y.reshape(*lead, self.out_features)
            x = norm(x)
        if swiglu:
            if x.shape[-1] != 2 * self.in_features:
                raise ValueError(f"{self.layer_name or type(self).__name__}: SwiGLU input of shape {tuple(x.shape)} "
                                 f"does not end in 2 * in_features={2 * self.in_features}")
            if self.fuses_swiglu(x):
                lead = x.shape[:-1]
                y = _SwiGLUQuantizedLinearFn.apply(x.reshape(-1, 2 * self.in_features), self.weight, self.bias, self,
                                                   True, producer)
                return y.reshape(*lead, self.out_features)
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        rt = self.runtime
        if rt.all_bf16:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.layer_name or type(self).__name__}: input of shape {tuple(x.shape)} does not "
                             f"end in in_features={self.in_features}")
        lead = x.shape[:-1]
        if torch.compiler.is_compiling():  # one opaque node for Dynamo (rayfp4.precision.ops)
            y = torch.ops.rayfp4.quantized_linear(x.reshape(-1, self.in_features), self.weight, self.bias,
                                                  self.op_handle)
            return y.reshape(*lead, self.out_features)
        backward_needed = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias))
        y = _QuantizedLinearFn.apply(x.reshape(-1, self.in_features), self.weight, self.bias, self, backward_needed)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        p = self.policy
        extra = "" if p.scale_selection == "max6" else f", scale_selection={p.scale_selection}"
        if p.backward_rounding != "sr":
            extra += f", backward_rounding={p.backward_rounding}/{p.ms_eden_hadamard}"
        return (f"{super().extra_repr()}, format={self.format}, weight_tile={p.weight_tile}, "
                f"sr_grads={p.stochastic_rounding_grads}, rht_wgrad={p.rht_wgrad}{extra}")


class NVFP4Linear(QuantizedLinear):
    """The NVFP4 recipe's linear layer (E2M1 + E4M3 scales per 16 + FP32 tensor scale)."""

    format = "nvfp4"


class MXFP4Linear(QuantizedLinear):
    """The same recipe with MXFP4 operands (E2M1 + power-of-two scales per 32), for comparison."""

    format = "mxfp4"
