"""CUTLASS-generated GEMMs for rayfp4.

* ``specs``    which kernels exist (plain data; no CUTLASS import)
* ``generate`` picks them from CUTLASS's own generator (``cutlass_library``) and emits the sources
* ``build``    ``python -m cutlass_kernels.build --arch sm90a|sm100a|all``: nvcc into a cache
* ``binding``  ctypes binding for torch: ``gemm_bf16_alpha`` (Hopper, exact NVFP4 emulation),
               ``gemm_nvfp4`` (Blackwell, native; built but never run here), ``available``

Importing this package imports neither torch nor cutlass_library; import ``binding`` for the GEMMs.
"""

from .specs import KERNELS, KernelSpec, kernels_for

__all__ = ["KERNELS", "KernelSpec", "kernels_for"]
