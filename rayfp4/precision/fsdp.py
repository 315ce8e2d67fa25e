"""FSDP2 that all-gathers NVFP4 weights: quantize the shards once, gather 4-bit codes and scales.

Without this, FSDP2 all-gathers each FP32 master weight (32 bits an element) and every rank then
quantizes the same full weight. With it, each rank quantizes only its own rows, in the weight's
16x16 tiles, against the amax of the *whole* weight (one all-reduce of a scalar), and FSDP2
all-gathers the E2M1 codes (4 bits an element) and the tiles' E4M3 scales (8 bits per 256
elements): about 4.03 bits an element, 7.9x fewer bytes than FP32.

Why the gathered weight is bit-identical to quantizing the unsharded one: a tile's scale and
codes depend only on the tile's own values and the tensor amax (NVFP4_RECIPE section 3), so when
every shard boundary falls between tiles (rows per rank a multiple of 16) and all ranks use the
global amax, the concatenated shards *are* the quantization of the full weight. Dgrad reuses
those codes transposed (2-D weight scaling), so neither GEMM needs the high-precision weight.

The mechanism is FSDP2's own extension point: the sharded parameter's local tensor is a
:class:`NVFP4ShardedWeight` (a wrapper of the FP32 shard that the optimizer updates in place),
whose ``fsdp_pre_all_gather`` returns (codes, tile scales) and whose ``fsdp_post_all_gather``
builds the unsharded parameter, a :class:`NVFP4GatheredWeight`: a tensor of the weight's shape
and dtype that holds only the quantized weight. ``QuantizedLinear`` takes its operand from it.

When it cannot apply to a layer, the layer gathers FP32 as before and the policy summary says why
(:func:`enable_fp4_weight_gather`): MXFP4 layers, 1x16 weight blocks (Dgrad would need W^T
quantized from the FP32 weight), a late switch to BF16 (it needs the FP32 weight after the
switch), and row counts that do not split into whole 16-row tiles per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from ..formats.nvfp4 import BLOCK, NVFP4Tensor, check_scale_selection

aten = torch.ops.aten

#: Ops FSDP2 applies to a parameter while sharding, padding and moving it, and after which the
#: result is still the sharded weight (a view or copy of the FP32 shard). Every other op (the
#: optimizer's arithmetic, zeros_like for its state) returns plain tensors.
_KEEP_SHARDED = {
    aten.view, aten._unsafe_view, aten.as_strided, aten.slice, aten.split, aten.split_with_sizes,
    aten.chunk, aten.narrow, aten.detach, aten.alias, aten.clone, aten.copy_, aten._to_copy,
    aten.new_zeros, aten.new_empty, aten.empty_like, aten._pin_memory, aten.contiguous,
}
#: Ops FSDP2 applies to the unsharded parameter that keep it what it is (same values, same shape).
_KEEP_GATHERED = {aten.as_strided, aten.detach, aten.alias, aten.view, aten._unsafe_view}


class NVFP4ShardedWeight(torch.Tensor):
    """The FP32 shard of an NVFP4 layer's master weight, as FSDP2 holds it: behaves as the shard
    (the optimizer updates it in place), and gathers as 4-bit codes and 16x16-tile scales."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, tensor.size(), strides=tensor.stride(), storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype, layout=tensor.layout, device=tensor.device, requires_grad=tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"NVFP4ShardedWeight({self._tensor!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t._tensor if isinstance(t, cls) else t  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func.overloadpacket not in _KEEP_SHARDED:
            return out
        return tree_map(lambda t: cls(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return NVFP4ShardedWeight(inner["_tensor"])

    # -- FSDP2's all-gather extension ----------------------------------------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """(codes [rows, K/2] uint8, tile scales [rows/16, K/16] uint8) of this rank's rows,
        quantized in 16x16 tiles against the global amax; the amax travels as metadata."""
        shard = self._tensor
        amax = shard.abs().amax().float() if shard.numel() else torch.zeros((), device=shard.device)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        # The layer's block-scale rule (Four Over Six picks per tile, from the tile and the amax
        # alone, so the shards still concatenate to the full weight's quantization).
        selection = module.selection_kwargs(module.roles.fprop_w)
        return quantize_shard(shard, amax, module.backend, **selection), (amax, selection)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        # The unsharded parameter has FSDP2's param_dtype (FP32, or BF16 under mixed precision), so
        # that the layer's weight gradient has the dtype FSDP2 reduces all of a group's gradients in.
        codes, tiles = outputs
        amax, selection = metadata
        q = assemble(codes, tiles, amax, param_dtype, **selection)
        if out is not None:  # later steps: FSDP2 reuses the unsharded parameter object
            out._quantized = q
            return None
        return NVFP4GatheredWeight(q, param_dtype), (codes, tiles)


def quantize_shard(shard: torch.Tensor, amax: torch.Tensor, backend, **selection) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [rows, K/2] uint8, tile scales [rows/16, K/16] uint8) of a row shard of a weight,
    quantized in 16x16 tiles against ``amax``, the whole weight's: what each rank all-gathers.
    ``selection``: the layer's block-scale rule (``QuantizedLinear.selection_kwargs``)."""
    if not backend.propagates_nonfinite and not bool(torch.isfinite(amax)):
        # The reference quantizer raises on NaN/Inf; the layer's output becomes NaN through the
        # amax instead (the GEMM's alpha), as on the fast backends, and the loop skips the step.
        rows, k = shard.shape
        return (torch.zeros(rows, k // 2, dtype=torch.uint8, device=shard.device),
                torch.zeros(rows // BLOCK, k // BLOCK, dtype=torch.uint8, device=shard.device))
    q = backend.quantize_nvfp4(shard, (BLOCK, BLOCK), "nearest", False, None, amax, False, **selection)
    return q.data.contiguous(), q.tile_scales().view(torch.uint8).contiguous()


def assemble(codes: torch.Tensor, tiles: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype,
             **selection) -> NVFP4Tensor:
    """The quantized weight from the gathered codes and tile scales (rows in rank order);
    ``selection`` as given to :func:`quantize_shard` (its cap sets the decode factor)."""
    rule = selection.get("scale_selection", "max6")
    cap = check_scale_selection(rule, selection.get("error_metric", "mse"), selection.get("scale_cap"), "assemble")
    return NVFP4Tensor(data=codes, scale=tiles.repeat_interleave(BLOCK, dim=0).view(torch.float8_e4m3fn),
                       amax=amax, shape=(codes.shape[0], codes.shape[1] * 2), tile=(BLOCK, BLOCK),
                       orig_dtype=dtype, scale_cap=cap, scale_selection=rule)


class NVFP4GatheredWeight(torch.Tensor):
    """An NVFP4 layer's unsharded weight after a 4-bit all-gather: shaped and typed like the FP32
    weight (autograd gives it an FP32 gradient, which FSDP2 reduce-scatters), holding only the
    quantized weight (:attr:`quantized`), which ``QuantizedLinear`` uses as its GEMM operand."""

    @staticmethod
    def __new__(cls, quantized: NVFP4Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, quantized.shape, dtype=dtype, device=quantized.device)

    def __init__(self, quantized: NVFP4Tensor, dtype: torch.dtype):
        self._quantized = quantized

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def quantized(self) -> NVFP4Tensor:
        return self._quantized

    def __repr__(self):
        return f"NVFP4GatheredWeight(shape={tuple(self.shape)}, amax={float(self._quantized.amax):.4g})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        me = next(a for a in args if isinstance(a, cls))
        if func.overloadpacket in _KEEP_GATHERED:
            return cls(me._quantized, me.dtype)
        if func.overloadpacket in (aten.full_like, aten.zeros_like, aten.empty_like, aten.ones_like):
            plain = torch.empty(me.shape, dtype=me.dtype, device=me.device)
            return func(plain, *args[1:], **(kwargs or {}))
        raise NotImplementedError(
            f"{func}: the weight gathered in NVFP4 (precision.fp4_weight_gather) holds only its 4-bit "
            f"codes, for the layer's GEMMs; set precision.fp4_weight_gather: false to use the FP32 weight")


def gathered_quantized(weight: torch.Tensor) -> NVFP4Tensor | None:
    """The quantized weight a 4-bit all-gather produced, or None for an ordinary weight."""
    return weight.quantized if isinstance(weight, NVFP4GatheredWeight) else None


@dataclass
class WeightGather:
    """What :func:`enable_fp4_weight_gather` did: the layers gathered in 4 bits, and the others
    with the reason."""

    fp4: list[str]
    fp32: dict[str, str]

    def describe(self) -> str:
        if not self.fp32:
            return f"nvfp4 for all {len(self.fp4)} quantized layers"
        reasons = sorted(set(self.fp32.values()))
        return (f"nvfp4 for {len(self.fp4)} layers, fp32 for {len(self.fp32)}: " + "; ".join(reasons))[:6000]


def fp4_gather_obstacle(layer, world: int) -> str | None:
    """Why ``layer`` cannot gather its weight in NVFP4 over ``world`` ranks, or None if it can."""
    pol = layer.policy
    if not pol.weight_2d_scaling:
        return "weight_2d_scaling is off (Dgrad would quantize W^T from the FP32 weight)"
    if pol.late_switch is not None:
        return "late_switch is set (the BF16 passes after the switch need the FP32 weight)"
    rows = layer.out_features
    if rows % (BLOCK * world):
        return (f"{layer.layer_name or 'a layer'}: {rows} rows do not split into whole {BLOCK}-row tiles "
                f"over {world} ranks")
    return None


def enable_fp4_weight_gather(model: torch.nn.Module, world: int) -> WeightGather:
    """Before ``fully_shard``: make each NVFP4 layer's weight gather in 4 bits where it can."""
    from .linear import NVFP4Linear

    result = WeightGather([], {})
    for name, module in model.named_modules():
        if not isinstance(module, NVFP4Linear):
            continue
        why = fp4_gather_obstacle(module, world)
        if why is not None:
            result.fp32[name] = why
            continue
        w = module.weight
        module.weight = torch.nn.Parameter(NVFP4ShardedWeight(w.data), requires_grad=w.requires_grad)
        result.fp4.append(name)
    return result


def plain_local(t: torch.Tensor) -> torch.Tensor:
    """The FP32 tensor behind a (possibly DTensor-wrapped) sharded weight, for checkpoints."""
    if isinstance(t, NVFP4ShardedWeight):
        return t._tensor
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, NVFP4ShardedWeight):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local._tensor, t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return t


class AllGatherBytes:
    """Counts the bytes this rank's all-gathers receive while it is active (a context manager):
    FSDP2's parameter gathers, for what the 4-bit gather saves (bench.scaling, tests). ``take()``
    returns the count so far and starts again from 0.

    FSDP2 calls the collective through ``torch.distributed``'s module attribute, which this swaps
    for a counting wrapper and restores on exit: ``all_gather_single`` in newer torch (2.13),
    ``all_gather_into_tensor`` before (2.11)."""

    def __init__(self):
        self.name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        self.bytes = 0
        self._original = None

    def __enter__(self) -> "AllGatherBytes":
        self._original = original = getattr(dist, self.name)

        def counting(output_tensor, input_tensor, *args, **kwargs):
            self.bytes += output_tensor.numel() * output_tensor.element_size()
            return original(output_tensor, input_tensor, *args, **kwargs)

        setattr(dist, self.name, counting)
        return self

    def __exit__(self, *exc) -> None:
        setattr(dist, self.name, self._original)

    def take(self) -> int:
        n, self.bytes = self.bytes, 0
        return n
