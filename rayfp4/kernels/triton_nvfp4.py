"""The ``triton`` backend: Triton NVFP4 quantization kernels and the exact emulated NVFP4 GEMM.

On a GPU without FP4 tensor cores (Hopper) NVFP4 training is emulated exactly: quantize, take the
unscaled dequantized operands ``e2m1 * s_b`` in BF16 (exact), multiply them in BF16 with FP32
accumulation and apply ``alpha = amax_a * amax_b / 2688^2`` once in FP32 before the one rounding
(``/ 1536`` for an operand of Four Over Six's cap 256: each operand's own decode factor), in a
separate pass after cuBLAS's FP32-output GEMM or, with ``gemm_mode="lt"``, in cuBLASLt's epilogue
(:mod:`.cublaslt`, ``GEMM_MODES``).

The quantizers here produce the reference's :class:`NVFP4Tensor` bit for bit (codes, scales, amax),
two passes over memory each: a tensor-amax pass (an integer atomic max, exact) and a quantize pass.
The quantizers can write the BF16 GEMM operand in the same pass (the tensor's ``gemm_operand``),
so the GEMM needs no separate dequantization, and the 16x16 quantizer the quantized transpose
(``transposed``, which ``transpose()`` returns). The column-wise quantization of a transposed
view (the Wgrad operands, with the RHT fused) reads the original tensor with coalesced loads and
never materialises the transpose.

Kernels run compiled on CUDA tensors, or on CPU tensors through the Triton interpreter when
TRITON_INTERPRET=1 is set before triton is first imported (the CPU test suite does this), so CI
checks the very same device code. The backend registers for CUDA only; on the CPU the module-level
functions (:func:`quantize_nvfp4`, :func:`dequantize_unscaled`, :func:`gemm`) are what tests call.

Four Over Six block-scale selection (``scale_selection="four_over_six"``) runs in the same kernels
(both candidates and their errors in registers, FMA contraction off for those launches).

Non-finite input is outside the contract. The reference raises; raising here would cost a host
sync per quantization, so instead a NaN/Inf anywhere makes the tensor amax non-finite, every
block scale NaN (E4M3 0x7F) and every dequantized value NaN: the error propagates visibly to the
GEMM output. Pass ``check_finite=True`` to :func:`quantize_nvfp4` to raise like the reference.

MXFP4 quantization has its own Triton kernels (:mod:`.triton_mxfp4`, bit for bit the reference's);
``TritonBackend.quantize_mxfp4`` calls them.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from ..formats import nvfp4
from ..formats._blocks import check_amax, check_input, check_rounding, check_tile
from ..formats.hadamard import DEFAULT_SIGNS
from ..formats.nvfp4 import NVFP4Tensor
from ..formats.quantized import check_gemm_operands, fp32_gemm, gemm_alpha

#: The FP32 value of the constant 1/6 the reference multiplies S_enc by (rounded once, RNE).
ONE_SIXTH_F32 = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))
#: The recipe's RHT sign vector as a bit mask (bit j set: sign j is -1), a compile-time constant.
DEFAULT_SIGN_MASK = sum(1 << j for j, s in enumerate(DEFAULT_SIGNS) if s < 0)
_ROUND_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: Launch parameters of each kernel (tile, warps, packing variant); none of them changes a bit of
#: the output. Keys: "amax"; "amax_rht" (amax + amax of the RHT, one read); "swiglu" (the same
#: with h = silu(gate) * up computed and written on the way); "rmsnorm" (the same with an
#: RMSNorm's output computed and written on the way); "rows", "rows_sr"
#: (1x16 blocks along a contiguous K), "rows_tile" (16x16 tiles, + the transpose); "groups",
#: "groups_rht", "groups_rht_sr", "groups_sr", "groups_deq" (along a strided K: the column-wise
#: quantizations);
#: "dequant". bench/tune_quantize.py times the candidates on the H200.
LAUNCH = {  # H200, 2026-11-28 (BENCHMARKS.md): fastest bit-identical candidate of bench/tune_quantize.py
    "amax": dict(BM=32, BK=256, num_warps=4),
    "amax_rht": dict(BM=64, G=4, num_warps=4),
    "swiglu": dict(BM=64, G=4, num_warps=4),  # not swept: amax_rht's
    "rmsnorm": dict(BM=64, G=4, num_warps=4),  # not swept: amax_rht's
    "swiglu_backward": dict(BM=64, G=4, num_warps=4),  # swept 2026-12-03: as fast as the fastest
    "rows": dict(BM=16, G=16, num_warps=4, PACK=0),
    "rows_sr": dict(BM=16, G=8, num_warps=4, PACK=1),
    "rows_tile": dict(BM=32, G=8, num_warps=4, PACK=1),
    "groups": dict(BM=128, G=4, num_warps=4),
    "groups_sr": dict(BM=64, G=4, num_warps=4),  # not swept: as groups_rht_sr
    "groups_rht": dict(BM=128, G=8, num_warps=8),
    "groups_rht_sr": dict(BM=64, G=4, num_warps=4),
    # "groups" writing the BF16 operand too: the BM=128 tile spills registers then (sm_90 SASS).
    "groups_deq": dict(BM=64, G=4, num_warps=4),
    "dequant": dict(BM=16, G=16, num_warps=4),
}
#: The view of the int64 [M, K/16] word buffer each PACK variant of quant_rows_kernel stores to.
_PACK_DTYPE = {0: torch.int64, 1: torch.uint8}

def kernel_loader(module: str):
    """A function returning the device-code module ``rayfp4.kernels.<module>``, imported (and
    triton with it) on its first call and kept.

    Triton decides when it is imported whether ``@triton.jit`` compiles or interprets (the
    variable TRITON_INTERPRET; its own library functions are decorated then too), so one process
    runs either compiled kernels on CUDA tensors or interpreted kernels on CPU tensors, never both.
    Importing lazily keeps ``import rayfp4.kernels`` from fixing that choice for a test session.
    """
    loaded = []

    def kernels():
        if not loaded:
            if not triton_installed():
                raise RuntimeError("triton is not installed")
            loaded.append(importlib.import_module(f"{__package__}.{module}"))
        return loaded[0]

    return kernels


_kernel_module = kernel_loader("_triton_nvfp4_kernels")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------- amax


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x itself if its K (last) or M (first) dim is contiguous, else a contiguous copy; and which."""
    if x.stride(1) == 1:
        return x, "rows"
    if x.stride(0) == 1:
        return x, "cols"
    return x.contiguous(), "rows"


def tensor_amax(x: torch.Tensor, rht: bool = False, signs: int = DEFAULT_SIGN_MASK) -> torch.Tensor:
    """FP32 tensor [2]: max |x| and (when ``rht``) max |RHT_K(x)| after rounding to x's dtype.

    One read of x for both; the second entry is 0 when ``rht`` is False. No host sync.
    """
    x, _ = _layout(x)
    m, k = x.shape
    out = torch.zeros(2, dtype=torch.int32, device=x.device)
    kern = _kernel_module()
    if rht:
        cfg = LAUNCH["amax_rht"]
        grid = (_cdiv(m, cfg["BM"]), _cdiv(k // 16, cfg["G"]))
        kern.amax_groups_kernel[grid](x, out, m, k, x.stride(0), x.stride(1), RHT=True, SIGNS=signs,
                                      ROUND=_ROUND_CODE[x.dtype], **cfg)
    else:
        # Plain amax ignores the orientation: reduce over the physical layout, K-contiguous.
        phys = x if x.stride(1) == 1 else x.t()
        pm, pk = phys.shape
        cfg = LAUNCH["amax"]
        grid = (_cdiv(pm, cfg["BM"]), _cdiv(pk, cfg["BK"]))
        kern.amax_kernel[grid](phys, out, pm, pk, phys.stride(0), phys.stride(1), **cfg)
    return out.view(torch.float32)


def swiglu_amax(gate: torch.Tensor, up: torch.Tensor, rht: bool,
                signs: int = DEFAULT_SIGN_MASK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, amax)``: h = ``F.silu(gate) * up`` of BF16 [T, F] tensors (any strides), bit for bit
    as torch computes it, written once as a row-major [T', F] tensor whose rows T..T'-1 are zeros
    (T' = T rounded up to a multiple of 16: x padded for its Wgrad operand, as the linear layer
    pads it), and ``tensor_amax(h.t(), rht)`` from the same registers. One read of gate and up,
    one write of h, where torch's silu and product and the amax pass make three reads and two
    writes of that size. The MLP's down projection quantizes ``h[:T]`` and ``h.t()`` next."""
    what = "triton.swiglu_amax"
    if gate.dtype != torch.bfloat16 or up.dtype != torch.bfloat16 or gate.dim() != 2 or gate.shape != up.shape:
        raise ValueError(f"{what}: gate and up must be BF16 matrices of one shape, got {gate.dtype} "
                         f"{tuple(gate.shape)} and {up.dtype} {tuple(up.shape)}")
    return _launch_producer("swiglu", (gate, up), gate.shape, (*gate.stride(), *up.stride()),
                            RHT=bool(rht), SIGNS=signs, LIBDEVICE=gate.device.type == "cuda")


def swiglu_backward_amax(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, rht: bool,
                         signs: int = DEFAULT_SIGN_MASK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgu, amax)``: the gradient of gate_up = [gate | up] for the gradient ``dh`` of h =
    ``F.silu(gate) * up`` (BF16 [T, F] tensors, any strides), bit for bit as autograd computes it
    (``silu_backward(dh * up, gate)`` and ``dh * F.silu(gate)``, then the split's backward, a
    concatenation), written once as a row-major [T', 2F] tensor whose rows T..T'-1 are zeros
    (T' = T rounded up to a multiple of 16: dY padded for its Wgrad operand, as the linear layer
    pads it), and ``tensor_amax(dgu.t(), rht)`` from the same registers: the gate_up projection's
    dY and both of its amaxes in one pass, where torch's five elementwise kernels, the
    concatenation and the amax pass read and write that size about fifteen times."""
    what = "triton.swiglu_backward_amax"
    tensors = (gate, up, dh)
    if any(t.dtype != torch.bfloat16 or t.dim() != 2 or t.shape != gate.shape for t in tensors):
        raise ValueError(f"{what}: gate, up and dh must be BF16 matrices of one shape, got "
                         + ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in tensors))
    return _launch_producer("swiglu_backward", tensors, gate.shape, (*gate.stride(), *up.stride(), *dh.stride()),
                            width=2 * gate.shape[1], RHT=bool(rht), SIGNS=signs,
                            LIBDEVICE=gate.device.type == "cuda")


def _launch_producer(name: str, inputs: tuple, shape: tuple, strides: tuple, width: int | None = None, **kw):
    """Runs ``{name}_amax_kernel`` (a producer fused with the amax pass) over ``inputs`` of the
    [T, W] ``shape``: it writes the BF16 output ([T', width], default W), padded with zero rows to
    T' (a multiple of 16), and the two amaxes; returns ``(output, amaxes)``."""
    t, w = shape
    tp = t + (-t % 16)
    dev = inputs[0].device
    y = torch.empty(tp, w if width is None else width, dtype=torch.bfloat16, device=dev)
    out = torch.zeros(2, dtype=torch.int32, device=dev)
    cfg = LAUNCH[name]
    grid = (_cdiv(w, cfg["BM"]), _cdiv(tp // 16, cfg["G"]))
    getattr(_kernel_module(), f"{name}_amax_kernel")[grid](*inputs, y, out, t, tp, w, *strides, **kw, **cfg)
    return y, out.view(torch.float32)


def rmsnorm_amax(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, rht: bool,
                 signs: int = DEFAULT_SIGN_MASK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, amax)``: y = an RMSNorm's output rounded to BF16, ``((x * rstd) * weight)`` in FP32 as
    ``rayfp4.model.RMSNorm`` computes it, for x [T, D] (FP32 or BF16, any strides), rstd [T] (FP32,
    torch's reduction over x, computed before) and weight [D] (FP32 or BF16); written once as a
    row-major [T', D] BF16 tensor whose rows T..T'-1 are zeros (T' = T rounded up to a multiple of
    16, as the linear layer pads x for its Wgrad operand), with ``tensor_amax(y.t(), rht)`` from
    the same registers. One read of x and one write of y, where torch's two products, its cast to
    BF16 and the amax pass write and read FP32 copies of x first."""
    what = "triton.rmsnorm_amax"
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{what}: x must be an FP32 or BF16 matrix, got {x.dtype} {tuple(x.shape)}")
    t, d = x.shape
    if rstd.shape != (t,) or rstd.dtype != torch.float32:
        raise ValueError(f"{what}: rstd must be FP32 of shape ({t},) for x {tuple(x.shape)}, got {rstd.dtype} "
                         f"{tuple(rstd.shape)}")
    if weight.shape != (d,) or weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{what}: weight must be FP32 or BF16 of shape ({d},), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    return _launch_producer("rmsnorm", (x, rstd.contiguous(), weight.contiguous()), x.shape, x.stride(),
                            RHT=bool(rht), SIGNS=signs)


def _selection_args(selection: tuple[str, str, float] | None) -> dict:
    """Kernel arguments of a block-scale selection (rule, metric, cap); none for the recipe's
    max6 with cap 448 (the kernels' defaults, so those launches are exactly as before). Four Over
    Six launches turn FMA contraction off: its error ``e2m1 * s_b - x * S_enc`` must round the
    product and the difference separately, as the reference does."""
    if selection is None:
        return {}
    rule, metric, cap = selection
    args = {} if cap == 448.0 else {"GMAX": 6.0 * cap}
    if rule == "four_over_six":
        args.update(FOUR6=True, MAE=metric == "mae", enable_fp_fusion=False)
    return args


def _seed_args(seed, dummy: torch.Tensor) -> tuple[int, torch.Tensor, dict]:
    """The kernels' (seed, seed_ptr, extra) arguments for ``seed``: a host int (seed_ptr unused:
    ``dummy``; the launch exactly as before device seeds existed) or a device seed, a 1-element
    int64 tensor the kernel loads the key from (SEED_PTR=True, seed 0)."""
    if isinstance(seed, torch.Tensor):
        return 0, seed, {"SEED_PTR": True}
    return seed, dummy, {}


def launch_quant_rows(x, words, scale, deq, am, words_t, scale_t, seed, tile_rows, sr, cfg=None, selection=None):
    """quant_rows_kernel over a K-contiguous [M, K] x into the int64 [M, K/16] ``words`` (and the
    optional BF16 ``deq`` and transposed ``words_t``/``scale_t``) with the launch parameters
    ``cfg`` (default: this module's LAUNCH entry); ``seed``: SR's Philox key, a host int or a
    device seed (see :func:`quantize_nvfp4`); ``selection``: (rule, metric, cap) or None for the
    recipe's."""
    if cfg is None:
        cfg = LAUNCH["rows_tile" if tile_rows == 16 else "rows_sr" if sr else "rows"]
    m, k = x.shape
    write_t = words_t is not None
    grid = (_cdiv(m, cfg["BM"]), _cdiv(k // 16, cfg["G"]))
    seed, seed_ptr, seed_kw = _seed_args(seed, am)
    _kernel_module().quant_rows_kernel[grid](
        x, words.view(_PACK_DTYPE[cfg.get("PACK", 0)]), scale, deq if deq is not None else words, am,
        words_t if write_t else words, scale_t if write_t else scale,
        m, k, x.stride(0), seed, seed_ptr, ONE_SIXTH_F32,
        TILE_ROWS=tile_rows, SR=sr, WRITE_DEQ=deq is not None, WRITE_T=write_t, **cfg,
        **_selection_args(selection), **seed_kw)


def launch_quant_groups(x, words, scale, am, seed, rht, sr, signs=DEFAULT_SIGN_MASK, cfg=None, deq=None,
                        selection=None):
    """quant_groups_kernel over a strided [M, K] view x (1x16 blocks along K, optional RHT); with
    ``deq`` (an [M, K] view, best with x's strides) also the unscaled dequantized operand;
    ``seed`` and ``selection`` as for :func:`launch_quant_rows`."""
    write_deq = deq is not None
    if cfg is None:
        key = "groups" + ("_rht" if rht else "") + ("_sr" if sr else "")
        cfg = LAUNCH["groups_deq" if key == "groups" and write_deq else key]
    m, k = x.shape
    grid = (_cdiv(m, cfg["BM"]), _cdiv(k // 16, cfg["G"]))
    seed, seed_ptr, seed_kw = _seed_args(seed, am)
    _kernel_module().quant_groups_kernel[grid](
        x, words, scale, am, deq if write_deq else words, m, k, x.stride(0), x.stride(1),
        deq.stride(0) if write_deq else 0, deq.stride(1) if write_deq else 0, seed, seed_ptr, ONE_SIXTH_F32,
        RHT=bool(rht), SIGNS=signs, ROUND=_ROUND_CODE[x.dtype], SR=sr, WRITE_DEQ=write_deq, **cfg,
        **_selection_args(selection), **seed_kw)


# ---------------------------------------------------------------------------------- quantize


def _sr_seed(generator: torch.Generator | torch.Tensor | None, device: torch.device) -> int | torch.Tensor:
    """A 63-bit Philox key drawn from ``generator`` without a device sync; a device seed (a
    1-element int64 tensor, see :func:`quantize_nvfp4`) is the key itself and comes back as it is.

    CPU generators give a random integer directly. A CUDA generator's state is (seed, offset): we
    mix both and advance the offset, so successive calls on one generator get distinct streams and
    a freshly seeded generator (one per step, layer, rank and stream in the recipe) reproduces.
    """
    if isinstance(generator, torch.Tensor):
        return generator
    if generator is None:
        generator = torch.default_generator if device.type == "cpu" else torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()]
    if generator.device.type == "cpu":
        return int(torch.randint(0, 2**62, (1,), generator=generator).item())
    seed, off = generator.initial_seed(), generator.get_offset()
    generator.set_offset(off + 4)
    return _mix_key(seed, off)


def _mix_key(seed: int, offset: int) -> int:
    """The 63-bit key of a CUDA generator's state (seed, offset): splitmix64 of both."""
    z = (seed * 0x9E3779B97F4A7C15 + offset + 0x632BE59BD9B4E019) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


def generator_seed(seed: int, device) -> int:
    """The key :func:`_sr_seed` draws from a fresh generator on ``device`` seeded with ``seed``
    (``torch.Generator(device).manual_seed(seed)``), computed without creating a CUDA generator:
    what a device seed must hold to reproduce the generator path bit for bit (the runtime's
    device seed table, :meth:`rayfp4.precision.runtime.PrecisionRuntime.device_seed`).

    ``manual_seed`` on CUDA keeps the seed as the uint64 it is given with offset 0, so the key
    is the splitmix64 of (seed, 0), pure host arithmetic. A CPU generator's key is its first
    draw, so one is created (cheap, no device involved). ``seed``: 0 <= seed < 2**64.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"generator_seed: seed must be in [0, 2**64), got {seed}")
    device = torch.device(device)
    if device.type == "cpu":
        return _sr_seed(torch.Generator().manual_seed(seed), device)
    return _mix_key(seed, 0)


def _check_device_seed(seed: torch.Tensor, device: torch.device, what: str) -> None:
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        raise ValueError(f"{what}: a device seed must be a 1-element int64 tensor on {device}, got "
                         f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}")


def _check(x: torch.Tensor, tile: tuple[int, int], what: str) -> None:
    # The reference's checks, less the finiteness scan (NaN/Inf propagate here, no host sync).
    check_input(x, tile, what, finite=False)


def quantize_nvfp4(x: torch.Tensor, tile=(1, 16), rounding: str = "nearest", rht: bool = False,
                   generator: torch.Generator | torch.Tensor | None = None, amax=None, *,
                   rht_signs: torch.Tensor | None = None,
                   write_gemm_operand: bool | None = None, check_finite: bool = False,
                   trust_amax: bool = False, scale_selection: str = "max6", error_metric: str = "mse",
                   scale_cap: float | None = None) -> NVFP4Tensor:
    """:func:`rayfp4.formats.nvfp4.quantize` with Triton kernels (same arguments, same result).

    x may be any 2-D view whose K or M dimension is contiguous; a transposed view (M contiguous)
    is quantized along its K without copying. ``write_gemm_operand`` (default: for K-contiguous
    input without RHT) also writes the BF16 GEMM operand in the same pass, as the result's
    ``gemm_operand`` (for a transposed view it is written in x's memory order and kept as a view);
    16x16 tiles also write the quantized transpose, the result's ``transposed``.
    ``trust_amax``: ``amax`` is an FP32 device tensor from :func:`tensor_amax` of this very tensor,
    used as it is (the checks of a caller-supplied amax would synchronise with the host).
    SR streams come from ``generator`` (a seed drawn from it) and differ from the reference's.
    In place of a generator, ``generator`` may be a device seed: a 1-element int64 tensor on x's
    device holding the Philox key (0 <= key < 2**63), which the kernel reads from device memory
    at run time, so a captured CUDA graph draws fresh streams when the tensor is rewritten between
    replays; holding :func:`generator_seed` (s, device) it gives the bits of a fresh generator
    seeded with s.
    ``scale_selection``, ``error_metric``, ``scale_cap``: the block-scale rule (Four Over Six), in
    the same kernels, bit for bit as the reference.
    """
    what = "triton.quantize_nvfp4"
    tile = check_tile(tile, nvfp4.TILES, what)
    rounding = check_rounding(rounding, what)
    cap = nvfp4.check_scale_selection(scale_selection, error_metric, scale_cap, what)
    selection = None if scale_selection == "max6" and cap == 448.0 else (scale_selection, error_metric, cap)
    _check(x, tile, what)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: input of shape {tuple(x.shape)} contains NaN/Inf values")
    signs = DEFAULT_SIGN_MASK
    if rht_signs is not None:
        s = torch.as_tensor(rht_signs).flatten().tolist()
        if len(s) != 16 or any(v not in (1, -1) for v in s):
            raise ValueError(f"{what}: RHT signs must be 16 entries of +-1")
        signs = sum(1 << j for j, v in enumerate(s) if v < 0)
    if rht and tile != (1, 16):
        raise ValueError(f"{what}: the RHT is only defined here for 1x16 blocks (the Wgrad operands)")

    m, k = x.shape
    dev = x.device
    x, orient = _layout(x)
    if amax is None:
        am = tensor_amax(x, rht=rht, signs=signs)[1 if rht else 0]
    elif trust_amax and isinstance(amax, torch.Tensor) and amax.dtype == torch.float32 and amax.device == dev:
        am = amax.reshape(())
    else:
        am = check_amax(amax, dev, what).reshape(())
    if isinstance(generator, torch.Tensor):
        _check_device_seed(generator, dev, what)
    seed = _sr_seed(generator, dev) if rounding == "stochastic" else 0
    sr = rounding == "stochastic"

    words = torch.empty(m, k // 16, dtype=torch.int64, device=dev)
    scale = torch.empty(m, k // 16, dtype=torch.uint8, device=dev)
    if write_gemm_operand is None:
        write_gemm_operand = orient == "rows" and not rht
    deq = None
    transposed = None
    if orient == "rows" and not rht:
        write_t = tile == (16, 16)
        if write_gemm_operand:
            deq = torch.empty(m, k, dtype=torch.bfloat16, device=dev)
        if write_t:
            words_t = torch.empty(k, m // 16, dtype=torch.int64, device=dev)
            scale_t = torch.empty(k, m // 16, dtype=torch.uint8, device=dev)
        launch_quant_rows(x, words, scale, deq, am, words_t if write_t else None,
                          scale_t if write_t else None, seed, tile[0], sr, selection=selection)
        if write_t:
            transposed = NVFP4Tensor(
                data=words_t.view(torch.uint8), scale=scale_t.view(torch.float8_e4m3fn), amax=am,
                shape=(k, m), tile=tile, rht=False, rounding=rounding, orig_dtype=x.dtype,
                scale_cap=cap, scale_selection=scale_selection)
            if deq is not None:
                transposed.gemm_operand = deq.t()
    else:
        if write_gemm_operand:
            # The operand in x's memory order (a transposed view stays one): coalesced stores.
            phys = x.t() if orient == "cols" else x
            deq = torch.empty(phys.shape, dtype=torch.bfloat16, device=dev)
            deq = deq.t() if orient == "cols" else deq
        launch_quant_groups(x, words, scale, am, seed, rht, sr, signs, deq=deq, selection=selection)
    t = NVFP4Tensor(data=words.view(torch.uint8), scale=scale.view(torch.float8_e4m3fn), amax=am,
                    shape=(m, k), tile=tile, rht=bool(rht), rounding=rounding, orig_dtype=x.dtype,
                    scale_cap=cap, scale_selection=scale_selection)
    t.gemm_operand = deq
    t.transposed = transposed
    return t


# ---------------------------------------------------------------------------------- dequantize


def dequantize_words(data: torch.Tensor, scale: torch.Tensor, shape, dtype=torch.bfloat16) -> torch.Tensor:
    """Packed codes (any view of the [M, K/2] bytes) and scales [M, K/16] -> e2m1 * s_b, [M, K]."""
    m, k = shape
    data = data.contiguous().view(torch.uint8).view(torch.int64).view(m, k // 16)
    scale = scale.contiguous().view(torch.uint8)
    out = torch.empty(m, k, dtype=dtype, device=data.device)
    cfg = LAUNCH["dequant"]
    _kernel_module().dequant_rows_kernel[(_cdiv(m, cfg["BM"]), _cdiv(k // 16, cfg["G"]))](
        data, scale, out, m, k, **cfg)
    return out


def dequantize_unscaled(t: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``t.dequantize_unscaled(dtype)``: the quantizer's ``gemm_operand`` if it wrote one."""
    if t.gemm_operand is not None and t.gemm_operand.dtype == dtype:
        return t.gemm_operand
    return dequantize_words(t.data, t.scale, t.shape, dtype)


# ---------------------------------------------------------------------------------- GEMM

#: How :func:`gemm` applies alpha on CUDA: "lt" (the default: cuBLASLt with alpha read from
#: device memory by its epilogue, :mod:`.cublaslt`: one pass, no sync; falls back to "device"
#: where cuBLASLt cannot take the operands), "device" (cuBLAS FP32-output GEMM, then alpha from
#: device memory in a fused scale-and-cast pass; no sync; slower on the H200), "host" (cuBLAS with alpha as a host float in its
#: epilogue; one sync per GEMM) or "triton" (a Triton GEMM with the alpha epilogue; no sync).
#: All four are one FP32 product and one rounding; they differ only in the summation order.
#: ``precision.gemm_mode`` picks "lt" or "device" for a run; the others are kept for comparison
#: (bench/linear.py, bench/step.py --modes).
GEMM_MODES = ("lt", "device", "host", "triton")


def inv_decode(scale_cap: float) -> float:
    """FP32 1 / (6 * cap): torch divides a CUDA tensor by a Python scalar as a product with the
    reciprocal, so this is how ``NVFP4Tensor.decode_factor`` is computed on the GPU."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(6.0 * scale_cap, dtype=torch.float32))


#: FP32 1/2688, the recipe's (cap 448).
INV_FP4_FP8_MAX = inv_decode(448.0)
_INV = {448.0: INV_FP4_FP8_MAX, 256.0: inv_decode(256.0)}


def decode_inv(t: NVFP4Tensor) -> float:
    """The FP32 reciprocal of ``t``'s decode divisor 6 * cap (1/2688 for the recipe, 1/1536 for
    Four Over Six's cap 256): what the alpha kernels multiply its amax by."""
    return _INV[float(t.scale_cap)]


def alpha(a: NVFP4Tensor, b: NVFP4Tensor) -> torch.Tensor:
    """:func:`rayfp4.formats.quantized.gemm_alpha` as a 1-element FP32 CUDA tensor, in one kernel
    launch instead of three tiny torch kernels (bit for bit: tests/test_kernels_triton_gpu.py)."""
    out = torch.empty(1, dtype=torch.float32, device=a.amax.device)
    _kernel_module().alpha_kernel[(1,)](a.amax, b.amax, out, decode_inv(a), decode_inv(b))
    return out


def _operand(t) -> torch.Tensor:
    if isinstance(t, NVFP4Tensor):
        return dequantize_unscaled(t, torch.bfloat16)
    # MXFP4 (power-of-two scales, exact in BF16): one Triton pass over the packed codes, not the
    # reference's chain of torch ops
    from . import triton_mxfp4  # imports this module: bound at the first call

    return triton_mxfp4.dequantize_unscaled(t, torch.bfloat16)


def gemm(a, b, out_dtype: torch.dtype, mode: str = "lt") -> torch.Tensor:
    """``a @ b.T`` of two operands quantized along the same K: BF16 products (exact), FP32
    accumulation, alpha applied once in FP32, one rounding to ``out_dtype``.

    Agrees with :func:`rayfp4.formats.quantized.emulated_gemm` up to the FP32 summation order.
    """
    check_gemm_operands(a, b)
    A, B = _operand(a), _operand(b)
    if A.device.type != "cuda":
        # Interpreter/CPU path: the definition itself, on the (exact) BF16 operands.
        return fp32_gemm(A, B, gemm_alpha(a, b), out_dtype)
    nv = isinstance(a, NVFP4Tensor) and isinstance(b, NVFP4Tensor)
    if not isinstance(a, NVFP4Tensor) and not isinstance(b, NVFP4Tensor):
        # MXFP4: power-of-two scales only, alpha = 1: FP32 accumulation and output, one rounding.
        return torch.mm(A, B.t(), out_dtype=torch.float32).to(out_dtype)
    if mode == "lt" and nv:
        from . import cublaslt

        out = cublaslt.gemm_device_alpha(A, B, alpha(a, b), out_dtype)
        if out is not None:
            return out
        mode = "device"
    if mode == "device" and nv:
        # alpha is computed inside the epilogue kernel from both amaxes: two launches in all.
        acc = torch.mm(A, B.t(), out_dtype=torch.float32)
        out = acc if out_dtype == torch.float32 else torch.empty_like(acc, dtype=out_dtype)
        n = acc.numel()
        _kernel_module().scale_cast_kernel[(_cdiv(n, 4096),)](acc, out, a.amax, b.amax, decode_inv(a),
                                                              decode_inv(b), n, BLOCK=4096, num_warps=8)
        return out
    alpha_t = gemm_alpha(a, b).reshape(1)  # raises for an NVFP4 operand with an MXFP4 one
    if mode == "host":
        out = torch.empty(A.shape[0], B.shape[0], dtype=out_dtype, device=A.device)
        al = float(alpha_t)  # host sync
        if out_dtype == torch.float32:
            acc = torch.mm(A, B.t(), out_dtype=torch.float32)
            return acc.mul_(al)
        return torch.addmm(out, A, B.t(), beta=0.0, alpha=al)
    if mode == "triton":
        m, n = A.shape[0], B.shape[0]
        out = torch.empty(m, n, dtype=out_dtype, device=A.device)
        bm, bn, bk = 128, 256, 64
        grid = (_cdiv(m, bm) * _cdiv(n, bn),)
        _kernel_module().gemm_alpha_kernel[grid](
            A, B, out, alpha_t, m, n, A.shape[1], A.stride(0), A.stride(1), B.stride(0), B.stride(1),
            out.stride(0), out.stride(1), BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=8, num_stages=3)
        return out
    raise ValueError(f"unknown GEMM mode {mode!r}; expected one of {GEMM_MODES}")


# ---------------------------------------------------------------------------------- backend


class TritonBackend:
    """Registry entry: Triton quantizers and the emulated GEMM, on CUDA devices."""

    name = "triton"
    propagates_nonfinite = True  # NaN/Inf input gives NaN amax and scales, hence NaN out, no sync

    def __init__(self, gemm_mode: str = "lt"):
        if gemm_mode not in GEMM_MODES:
            raise ValueError(f"gemm_mode must be one of {GEMM_MODES}, got {gemm_mode!r}")
        self.gemm_mode = gemm_mode

    def unavailable_reason(self, device: torch.device) -> str | None:
        if not triton_installed():
            return "triton not installed"
        if torch.device(device).type != "cuda":
            return "no CUDA device"
        return None

    def quantize_nvfp4(self, x, tile, rounding, rht, generator, amax=None, write_gemm_operand=None, *,
                       scale_selection="max6", error_metric="mse", scale_cap=None):
        """``write_gemm_operand``: also write the BF16 GEMM operand (default: K-contiguous, no
        RHT); an ``amax`` tensor from :meth:`amaxes` is used without host-side checks;
        ``generator`` may be a device seed (see :func:`quantize_nvfp4`)."""
        return quantize_nvfp4(x, tile=tile, rounding=rounding, rht=rht, generator=generator, amax=amax,
                              write_gemm_operand=write_gemm_operand, trust_amax=True,
                              scale_selection=scale_selection, error_metric=error_metric, scale_cap=scale_cap)

    def amaxes(self, xt, rht: bool):
        """(amax of x, amax of x^T's Wgrad operand) for ``xt`` = x^T, from one read of x: the
        second is max |RHT(x^T)| when ``rht``, else the same value. Device tensors, no sync."""
        a = tensor_amax(xt, rht=rht)
        return a[0], (a[1] if rht else a[0])

    def swiglu_amaxes(self, gate, up, rht: bool):
        """``(h, amax of h, amax of h^T's Wgrad operand)`` for h = ``F.silu(gate) * up`` (BF16,
        bit for bit), its rows padded with zeros to whole blocks of 16: :meth:`amaxes` of the
        down projection's input with the product computed in the same pass
        (:func:`swiglu_amax`)."""
        h, a = swiglu_amax(gate, up, rht)
        return h, a[0], (a[1] if rht else a[0])

    def swiglu_backward_amaxes(self, gate, up, dh, rht: bool):
        """``(dgu, amax of dgu, amax of dgu^T's Wgrad operand)``: the gradient of gate_up = [gate |
        up] from the gradient ``dh`` of h = ``F.silu(gate) * up`` (BF16, bit for bit as autograd),
        its rows padded with zeros to whole blocks of 16: the amaxes of the gate_up projection's
        dY with the SwiGLU's backward computed in the same pass (:func:`swiglu_backward_amax`)."""
        dgu, a = swiglu_backward_amax(gate, up, dh, rht)
        return dgu, a[0], (a[1] if rht else a[0])

    def rmsnorm_amaxes(self, x, rstd, weight, rht: bool):
        """``(y, amax of y, amax of y^T's Wgrad operand)`` for y = an RMSNorm's output in BF16 (bit
        for bit, from x, its per-token rstd and the norm's weight), its rows padded with zeros to
        whole blocks of 16: :meth:`amaxes` of the projection's input with the norm's products
        computed in the same pass (:func:`rmsnorm_amax`)."""
        y, a = rmsnorm_amax(x, rstd, weight, rht)
        return y, a[0], (a[1] if rht else a[0])

    def quantize_mxfp4(self, x, tile, rounding, rht, generator, scale_rule="ceil"):
        """:func:`rayfp4.formats.mxfp4.quantize` with the Triton kernels (bit for bit; SR streams
        differ). No BF16 operand is written: the MXFP4 GEMM decodes the packed operand itself.
        NaN/Inf input gives NaN scales (0xFF) on the blocks holding it instead of an error."""
        from . import triton_mxfp4  # imports this module: bound at the first call

        return triton_mxfp4.quantize_mxfp4(x, tile=tile, rounding=rounding, rht=rht, generator=generator,
                                           scale_rule=scale_rule)

    def quantize_ms_eden(self, x, hadamard, signs, generator, amax=None):
        """:func:`rayfp4.formats.ms_eden.quantize` with the Triton kernels (bit for bit given the
        same uniform draws; the scale-rounding draws come from Philox)."""
        from . import triton_eden  # imports this module: bound at the first call

        return triton_eden.quantize_ms_eden(x, hadamard=hadamard, signs=signs, generator=generator, amax=amax)

    def dequantize(self, t):
        """``t.dequantize(torch.float32)`` bit for bit: e2m1 x block scale from the operand the
        quantizer wrote or from one dequantizing pass (exact in BF16), times the decode factor in
        FP32, as the reference multiplies; not the reference's chain of torch ops over the codes."""
        if not isinstance(t, NVFP4Tensor):
            return t.dequantize(torch.float32)
        return dequantize_unscaled(t, torch.bfloat16).float() * t.decode_factor()

    def gemm(self, a, b, out_dtype: torch.dtype) -> torch.Tensor:
        return gemm(a, b, out_dtype, self.gemm_mode)
