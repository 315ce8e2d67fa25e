"""cuBLASLt through ctypes: a BF16 GEMM whose FP32 scale alpha is read from device memory.

The emulated NVFP4 GEMM (:func:`rayfp4.kernels.triton_nvfp4.gemm`) applies ``alpha = amax_a *
amax_b / 2688^2`` once, in FP32, before the one rounding to the output dtype. torch's GEMMs take
alpha only as a host number: a host sync per GEMM, and a constant baked into a captured CUDA graph.
So the ``device`` GEMM mode writes the FP32 product and rescales it in a second pass over memory
(9.8 ms of a 337M step on the H200, BENCHMARKS.md). cuBLASLt itself takes alpha and beta by
pointer (``CUBLASLT_POINTER_MODE_DEVICE``): :func:`gemm_device_alpha` calls ``cublasLtMatmul`` of
the library torch already loaded, so the epilogue multiplies the FP32 accumulator by alpha from
device memory and writes the output dtype directly -- the same arithmetic (FP32 product,
one rounding), one pass, no sync, capturable in a CUDA graph.

Plans (descriptors, layouts, the heuristic's algorithm) are made once per shape and layout and
kept; each call is then one ``cublasLtMatmul`` on the current stream. The workspace (32 MiB per
device) is allocated on the first call. A shape first met inside a graph capture (no allocation
and no heuristic query happen there), an operand cuBLASLt cannot take (not on CUDA, not BF16, not
starting on a 256-byte boundary, neither dimension contiguous) or a shape without an algorithm
returns None, and the caller falls back to the two-pass GEMM.

Runs only on CUDA: tests/test_kernels_triton_gpu.py checks it against the FP32 GEMM with the
separate rescale; the CPU tests check its host-side logic (the column-major layouts, the fallbacks).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading

import torch

# cuBLAS / cuBLASLt enumerations (cublas_api.h, cublasLt.h, library_types.h)
_COMPUTE_32F = 68
_CUDA_TYPE = {torch.float32: 0, torch.bfloat16: 14}
_DESC_POINTER_MODE, _DESC_TRANSA, _DESC_TRANSB = 2, 3, 4
_POINTER_MODE_DEVICE = 1
_OP_N, _OP_T = 0, 1
_PREF_MAX_WORKSPACE_BYTES = 1

#: Workspace offered to cuBLASLt's heuristic (what NVIDIA recommends for Hopper).
WORKSPACE_BYTES = 32 * 2**20
#: The operands' start alignment the heuristic's algorithms may assume unless told otherwise
#: (256 bytes); an operand starting elsewhere (a view with an offset) takes the fallback. Our
#: operands start where the allocator put them (512-byte aligned), as does the output.
ALIGNMENT = 256


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


_lock = threading.Lock()
_lib: list = []
_state: dict = {}  # device index -> (handle, workspace, zero); (device, key) -> plan or None


def _library_paths() -> list[str]:
    """Where libcublasLt may be: its sonames (torch has loaded one already, so dlopen finds it),
    then the NVIDIA wheels' and torch's library folders."""
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    dirs = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        dirs += glob.glob(os.path.join(root, "*", "lib")) + glob.glob(os.path.join(root, "*", "*", "lib"))
    return names + [p for d in dirs for p in sorted(glob.glob(os.path.join(d, "libcublasLt.so*")))]


def _load():
    if _lib:
        return _lib[0]
    errors = []
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
            lib.cublasLtMatmul  # noqa: B018 - the symbol must be there
            break
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
    else:
        raise CublasLtError("libcublasLt not found: " + "; ".join(errors[-3:]))
    vp, i32, u64, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "cublasLtCreate": [ctypes.POINTER(vp)],
        "cublasLtMatmulDescCreate": [ctypes.POINTER(vp), i32, i32],
        "cublasLtMatmulDescSetAttribute": [vp, i32, vp, sz],
        "cublasLtMatrixLayoutCreate": [ctypes.POINTER(vp), i32, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(vp)],
        "cublasLtMatmulPreferenceSetAttribute": [vp, i32, vp, sz],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i32, ctypes.POINTER(_HeuristicResult),
                                           ctypes.POINTER(i32)],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i32
    _lib.append(lib)
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"{what} failed with cuBLAS status {status}")


def _int32(v: int) -> ctypes.c_int32:
    return ctypes.c_int32(v)


def _device_state(device: torch.device):
    """(cuBLASLt handle, workspace, FP32 zero) of ``device``; None while a graph is being
    captured and nothing is allocated yet (allocating there would tie them to the graph)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    st = _state.get(idx)
    if st is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        lib = _load()
        handle = ctypes.c_void_p()
        with torch.cuda.device(idx):
            _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{idx}")
            zero = torch.zeros(1, dtype=torch.float32, device=f"cuda:{idx}")
        st = _state[idx] = (handle, workspace, zero)
    return st


def _operand_layout(t: torch.Tensor, transposed_is_n: bool):
    """(op, rows, cols, ld) of one GEMM operand for cuBLASLt's column-major view, or None when
    neither dimension of ``t`` is contiguous. ``transposed_is_n``: whether a row-major ``t`` is
    used as it lies (the right-hand operand of D^T = B A^T) or transposed (the left-hand one)."""
    r, c = t.shape
    if t.stride(1) == 1 and t.stride(0) >= max(1, c):  # row-major: col-major [c, r], ld = stride(0)
        return (_OP_N if transposed_is_n else _OP_T), c, r, t.stride(0)
    if t.stride(0) == 1 and t.stride(1) >= max(1, r):  # column-major [r, c], ld = stride(1)
        return (_OP_T if transposed_is_n else _OP_N), r, c, t.stride(1)
    return None


def _plan(handle, device_idx: int, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype):
    """The descriptors and algorithm of D [M, N] = alpha * A [M, K] @ B [N, K]^T (row-major D), as
    cuBLASLt's column-major D^T = op(B) op(A^T): m = N, n = M, k = K. None if it cannot be done."""
    la, lb = _operand_layout(a, True), _operand_layout(b, False)
    if la is None or lb is None:
        return None
    m, k = a.shape
    n = b.shape[0]
    key = (device_idx, out_dtype, m, n, k, la, lb)
    if key in _state:
        return _state[key]
    if torch.cuda.is_current_stream_capturing():
        # No heuristic query inside a capture (cuBLASLt may refuse it there, and a failed call
        # must not invalidate the graph): this GEMM takes the two-pass path in this graph. A
        # warm-up pass before the capture makes the plan (make_graphed_callables runs three).
        return None
    lib = _load()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _CUDA_TYPE[torch.float32]),
           "cublasLtMatmulDescCreate")
    for attr, val in ((_DESC_POINTER_MODE, _POINTER_MODE_DEVICE), (_DESC_TRANSA, lb[0]), (_DESC_TRANSB, la[0])):
        v = _int32(val)
        _check(lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), 4), "cublasLtMatmulDescSetAttribute")
    layouts = []
    for dtype, rows, cols, ld in ((torch.bfloat16, *lb[1:]), (torch.bfloat16, *la[1:]), (out_dtype, n, m, n)):
        lay = ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), _CUDA_TYPE[dtype], rows, cols, ld),
               "cublasLtMatrixLayoutCreate")
        layouts.append(lay)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
    ws = ctypes.c_uint64(WORKSPACE_BYTES)
    _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
           "cublasLtMatmulPreferenceSetAttribute")
    result, count = _HeuristicResult(), ctypes.c_int(0)
    status = lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref, 1,
                                                ctypes.byref(result), ctypes.byref(count))
    plan = None
    if status == 0 and count.value > 0 and result.state == 0:
        plan = (desc, layouts, result, int(result.workspace_size))
    _state[key] = plan
    return plan


def gemm_device_alpha(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype):
    """``alpha * (a @ b.T)`` for BF16 CUDA matrices a [M, K] and b [N, K] (any layout with one
    contiguous dimension), FP32 accumulation, ``alpha`` a 1-element FP32 tensor on their device
    read by the GEMM's epilogue, one rounding to ``out_dtype`` (BF16 or FP32). Returns None where
    cuBLASLt cannot be used here (see the module docstring); the caller then falls back."""
    if (a.device.type != "cuda" or b.device != a.device or alpha.device != a.device
            or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or out_dtype not in _CUDA_TYPE
            or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]
            or alpha.dtype != torch.float32 or alpha.numel() != 1
            or a.data_ptr() % ALIGNMENT or b.data_ptr() % ALIGNMENT or alpha.data_ptr() % 4):
        return None
    with _lock:
        st = _device_state(a.device)
        if st is None:
            return None
        handle, workspace, zero = st
        plan = _plan(handle, a.device.index if a.device.index is not None else torch.cuda.current_device(), a, b,
                     out_dtype)
    if plan is None:
        return None
    desc, layouts, result, ws_size = plan
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    stream = torch.cuda.current_stream(a.device).cuda_stream
    vp = ctypes.c_void_p
    _check(_lib[0].cublasLtMatmul(handle, desc, vp(alpha.data_ptr()), vp(b.data_ptr()), layouts[0], vp(a.data_ptr()),
                                  layouts[1], vp(zero.data_ptr()), vp(out.data_ptr()), layouts[2], vp(out.data_ptr()),
                                  layouts[2], ctypes.byref(result.algo), vp(workspace.data_ptr()), ws_size, vp(stream)),
           "cublasLtMatmul")
    return out
