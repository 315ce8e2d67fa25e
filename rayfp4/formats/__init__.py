"""Number formats as pure tensor functions: the reference semantics of rayfp4.

``nvfp4`` and ``mxfp4`` quantize 2-D tensors along their last dimension; ``e2m1`` holds the
4-bit element codec, ``e4m3`` the FP8 scale conversion, ``hadamard`` the 16x16 random Hadamard
transform and ``blocked`` the 128x4 scale layout of Blackwell GEMMs. Fast kernels elsewhere
(``rayfp4.kernels``) are tested bit for bit against these.
"""

from . import blocked, e2m1, e4m3, hadamard, mxfp4, nvfp4
from .mxfp4 import MXFP4Tensor
from .nvfp4 import NVFP4Tensor

__all__ = ["blocked", "e2m1", "e4m3", "hadamard", "mxfp4", "nvfp4", "NVFP4Tensor", "MXFP4Tensor"]
