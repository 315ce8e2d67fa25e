"""Number formats as pure tensor functions: the reference semantics of rayfp4.

``nvfp4`` and ``mxfp4`` quantize 2-D tensors along their last dimension into the two kinds of
``quantized.QuantizedTensor``, a module that also defines their GEMM (``emulated_gemm``) and its
FP32 factor (``gemm_alpha``); ``e2m1`` holds the 4-bit element codec, ``e4m3`` the FP8 scale
conversion, ``hadamard`` the 16x16 random Hadamard transform and ``blocked`` the 128x4 scale
layout of Blackwell GEMMs. Fast kernels elsewhere (``rayfp4.kernels``, ``cutlass_kernels``) are
tested bit for bit against these.
"""

from . import blocked, e2m1, e4m3, hadamard, mxfp4, nvfp4, quantized
from .mxfp4 import MXFP4Tensor
from .nvfp4 import NVFP4Tensor
from .quantized import QuantizedTensor, emulated_gemm, gemm_alpha

__all__ = [
    "blocked", "e2m1", "e4m3", "hadamard", "mxfp4", "nvfp4", "quantized",
    "QuantizedTensor", "NVFP4Tensor", "MXFP4Tensor", "emulated_gemm", "gemm_alpha",
]
