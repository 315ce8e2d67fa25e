"""MS-EDEN quantization on the GPU (and in the Triton interpreter): host wrapper of
``_triton_eden_kernels``, bit-identical to :func:`rayfp4.formats.ms_eden.quantize`.

Two launches per operand and no host synchronisation: the rotated tensor's amax (skipped when the
caller gives it), then the quantizer, which rotates again and writes the packed codes and the
E4M3 scales. Any strided 2-D view is read in place (a transposed view too: the Wgrad operands are
views of dY and of the dequantized activations). The scale rounding draws one Philox uniform per
block, keyed by a 63-bit seed from ``generator`` as the NVFP4 stochastic rounding does; tests pass
``uniforms`` instead, so both implementations see the same draws and must agree bit for bit.
"""

from __future__ import annotations

import torch

from ..formats import ms_eden
from ..formats._blocks import check_amax, check_input
from ..formats.nvfp4 import BLOCK, NVFP4Tensor
from .triton_nvfp4 import _cdiv, _sr_seed, kernel_loader

#: Rows per program for each Hadamard size (none changes a bit of the output; not yet swept).
LAUNCH = {16: dict(BM=64, num_warps=4), 128: dict(BM=16, num_warps=4)}

_kernel_module = kernel_loader("_triton_eden_kernels")


def _launch_args(n: int) -> dict:
    return dict(N=n, NORM=ms_eden.NORM[n], **LAUNCH[n])


def rotated_amax(x: torch.Tensor, n: int, signs: torch.Tensor) -> torch.Tensor:
    """max |transform(x)| as a 0-dim FP32 device tensor (NaN if x holds NaN); no host sync."""
    m, k = x.shape
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    args = _launch_args(n)
    if m and k:
        _kernel_module().eden_amax_kernel[(_cdiv(m, args["BM"]), k // n)](
            x, signs, out, m, k, x.stride(0), x.stride(1), **args)
    return out.view(torch.float32).reshape(())


def quantize_ms_eden(x: torch.Tensor, hadamard: int = 128, signs: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, amax=None,
                     uniforms: torch.Tensor | None = None) -> NVFP4Tensor:
    """:func:`rayfp4.formats.ms_eden.quantize` with the Triton kernels (same arguments).

    Non-finite input is not checked (no host sync): it gives a NaN amax and NaN scales. Nor are
    the values of ``signs`` already on the GPU (the layer's come from ``ms_eden.random_signs``);
    signs given on the CPU are checked before they are copied over.
    """
    what = "triton_eden.quantize_ms_eden"
    n = ms_eden.check_hadamard(hadamard, what)
    check_input(x, (1, BLOCK), what, finite=False)
    m, k = x.shape
    if k % n:
        raise ValueError(f"{what}: K={k} of shape {tuple(x.shape)} is not a multiple of the Hadamard size {n}")
    dev = x.device
    if isinstance(generator, torch.Tensor):
        raise TypeError(f"{what}: generator must be a torch.Generator; device seeds (an int64 tensor) are "
                        f"read by the NVFP4 kernels only")
    if signs is None:
        signs = ms_eden.random_signs(n, generator, dev)
    ms_eden.check_signs(signs, n, what, values=signs.device.type == "cpu")
    signs = signs.to(device=dev, dtype=torch.float32).contiguous()
    if amax is None:
        am = rotated_amax(x, n, signs)
    elif isinstance(amax, torch.Tensor) and amax.dtype == torch.float32 and amax.device == dev:
        am = amax.reshape(())
    else:
        am = check_amax(amax, dev, what).reshape(())
    explicit = uniforms is not None
    if explicit:
        if uniforms.shape != (m, k // BLOCK):
            raise ValueError(f"{what}: uniforms of shape {tuple(uniforms.shape)}, expected {(m, k // BLOCK)}")
        uniforms = uniforms.to(device=dev, dtype=torch.float32).contiguous()
    seed = 0 if explicit else _sr_seed(generator, dev)

    data = torch.empty(m, k // 2, dtype=torch.uint8, device=dev)
    scale = torch.empty(m, k // BLOCK, dtype=torch.uint8, device=dev)
    args = _launch_args(n)
    if m and k:
        _kernel_module().eden_quant_kernel[(_cdiv(m, args["BM"]), k // n)](
            x, signs, am, data, scale, uniforms if explicit else scale, m, k, x.stride(0), x.stride(1), seed,
            KFAC=ms_eden.BLOCK_FACTOR, EXPLICIT_U=explicit, enable_fp_fusion=False, **args)
    return NVFP4Tensor(data=data, scale=scale.view(torch.float8_e4m3fn), amax=am, shape=(m, k), tile=(1, BLOCK),
                       rht=True, rounding="ms_eden", orig_dtype=x.dtype, scale_cap=ms_eden.MS_EDEN_CAP)
