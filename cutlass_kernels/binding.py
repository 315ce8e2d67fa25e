"""torch binding of the CUTLASS GEMMs (ctypes over the ``extern "C"`` entry points).

What it offers:

* ``gemm_bf16_alpha(a, b, alpha)`` -> ``bf16(alpha * a @ b.T)`` on Hopper (sm_90a): BF16 operands,
  FP32 accumulation, FP32 ``alpha`` in the epilogue, one rounding to BF16. ``a`` is [M, K], ``b``
  is [N, K]; either may be the transpose view of a contiguous tensor (``W.t()``, ``dy.t()``), which
  picks the kernel built for that memory order instead of copying (see ``specs.py``).
  ``out_dtype=torch.float32`` writes ``fp32(alpha * a @ b.T)`` instead (the Wgrad kernel).
* ``gemm_nvfp4_emulated(a, b)``: the exact emulation of the NVFP4 GEMM on Hopper (recipe section
  8): both operands dequantized without their tensor factor (E2M1 x E4M3, exact in BF16), then
  ``gemm_bf16_alpha`` with ``alpha = rayfp4.formats.quantized.gemm_alpha(a, b)``.
* ``gemm_nvfp4(a, b)``: the native block-scaled NVFP4 GEMM on Blackwell (sm_100a, compute
  capability 10.0 only). It is built and its argument preparation is tested on the CPU, but it
  has never run here: no Blackwell GPU was available. Treat it as untested until it has.
* ``available(device)``: whether (and why not) CUTLASS can serve a device, so dispatch never
  picks sm_100a code on a non-Blackwell GPU and never anything on the CPU.

What these GEMMs must compute is defined once, in ``rayfp4.formats.quantized`` (``gemm_alpha``,
``fp32_gemm``, ``emulated_gemm``); the GPU tests check them against it.

The libraries come from ``python -m cutlass_kernels.build`` (found through the cache index, see
``build.py``); nothing here needs nvcc, nvidia-cutlass, or torch's C++ ABI. ``alpha`` given as a
CUDA tensor is read on the device, so no host synchronisation happens on the training path.

Errors a caller can cause (shapes, dtypes, devices, alignment, missing libraries) raise
ValueError / RuntimeError naming the operand and its shape.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rayfp4.formats.nvfp4 import NVFP4Tensor
from rayfp4.formats.quantized import gemm_alpha

from .build import cache_root, read_index
from .specs import ARCH_MAJOR, BY_KEY, KERNELS, KernelSpec

_ERR_LEN = 1024
_INT_MAX = 2**31 - 1
#: TMA needs 16-byte aligned global addresses and 16-byte multiples for every stride.
_TMA_BYTES = 16


class KernelNotBuilt(RuntimeError):
    """The library of a kernel is not in the cache; the message says how to build it."""


# --------------------------------------------------------------------------------------------
# Availability


@dataclass(frozen=True)
class Availability:
    """Truthy when CUTLASS can run on the device; ``reason`` says what it offers or why not."""

    ok: bool
    reason: str
    family: str | None = None  # "bf16_alpha" (Hopper emulation) or "nvfp4" (Blackwell native)
    wgrad: bool = False  # an FP32-output kernel is built, so Wgrad runs on CUTLASS too

    def __bool__(self) -> bool:
        return self.ok


def _arch_for_capability(cap: tuple[int, int]) -> str | None:
    # "a" targets run only on their exact compute capability: sm_90a on 9.0, sm_100a on 10.0
    # (not 10.3, 11.x or 12.x, whose FP4 instructions differ or need their own build).
    return {(9, 0): "sm90a", (10, 0): "sm100a"}.get(tuple(cap))


def available(device: torch.device | str | int | None = None, root: Path | None = None) -> Availability:
    """Whether the CUTLASS backend can run on ``device`` (default: the current CUDA device).

    CPU -> no. Compute capability 9.0 -> the BF16 emulation GEMM, if its Fprop kernel is built.
    10.0 -> the native NVFP4 GEMM, if one of its kernels is built. Anything else -> no.
    """
    if device is None:
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device (torch.cuda.is_available() is False)")
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda":
        return Availability(False, f"CUTLASS kernels need a CUDA device, got {device}")
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device (torch.cuda.is_available() is False)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    arch = _arch_for_capability(cap)
    if arch is None:
        return Availability(
            False,
            f"{name} has compute capability {cap[0]}.{cap[1]}; rayfp4's CUTLASS kernels exist for "
            "9.0 (sm_90a, BF16 emulation) and 10.0 (sm_100a, native NVFP4) only",
        )
    built = _index(root)
    if arch == "sm90a":
        if "sm90a_bf16_kk" not in built:
            return Availability(False, f"{name} (9.0) needs the sm90a kernels: {_build_hint('sm90a')}")
        wgrad = "sm90a_bf16_kk_f32out" in built
        return Availability(True, f"{name} (9.0): exact NVFP4 emulation via the sm_90a BF16 GEMM"
                            + _wgrad_note(wgrad, "sm90a", "sm90a_bf16_kk_f32out"), "bf16_alpha", wgrad)
    if not any(k.startswith("sm100a_nvfp4") and not k.endswith("_f32out") for k in built):
        return Availability(False, f"{name} (10.0) needs the sm100a kernels: {_build_hint('sm100a')}")
    wgrad = any(k.startswith("sm100a_nvfp4") and k.endswith("_f32out") for k in built)
    return Availability(True, f"{name} (10.0): native NVFP4 block-scaled GEMM (sm_100a)"
                        + _wgrad_note(wgrad, "sm100a", "sm100a_nvfp4_128x128_f32out"), "nvfp4", wgrad)


def _wgrad_note(built: bool, arch: str, key: str) -> str:
    if built:
        return "; Wgrad too (FP32 output)"
    return f"; Wgrad (FP32 output) falls back to the Triton GEMM until {_build_hint(arch, key)}"


def _build_hint(arch: str, key: str | None = None) -> str:
    extra = f" --kernels {key}" if key else ""
    return f"run `python -m cutlass_kernels.build --arch {arch}{extra}` (cache: {cache_root()})"


# --------------------------------------------------------------------------------------------
# Loading


_BF16_ARGTYPES = [
    ctypes.c_int, ctypes.c_int, ctypes.c_int,  # m, n, k
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # a, b, y
    ctypes.c_float, ctypes.c_void_p,  # alpha, alpha_ptr
    ctypes.c_void_p, ctypes.c_size_t,  # workspace, bytes
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,  # stream, err, err_len
]
_NVFP4_ARGTYPES = [
    ctypes.c_int, ctypes.c_int, ctypes.c_int,  # m, n, k
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # a, sfa, b, sfb, y
    ctypes.c_float, ctypes.c_void_p,
    ctypes.c_void_p, ctypes.c_size_t,
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
]


class _Kernel:
    """One loaded library: its run / workspace-size entry points and a workspace-size cache."""

    def __init__(self, spec: KernelSpec, path: Path):
        self.spec = spec
        self.path = path
        self._lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        sym = spec.symbol
        self.run = getattr(self._lib, f"{sym}_run")
        self.run.restype = ctypes.c_int
        self.run.argtypes = _BF16_ARGTYPES if spec.family == "bf16_alpha" else _NVFP4_ARGTYPES
        self._ws = getattr(self._lib, f"{sym}_workspace_size")
        self._ws.restype = ctypes.c_size_t
        self._ws.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        name = getattr(self._lib, f"{sym}_name")
        name.restype = ctypes.c_char_p
        self.cutlass_name = name().decode()
        self._ws_cache: dict[tuple[int, int, int], int] = {}

    def workspace(self, m: int, n: int, k: int, device: torch.device) -> torch.Tensor | None:
        key = (m, n, k)
        if key not in self._ws_cache:
            self._ws_cache[key] = int(self._ws(m, n, k))
        nbytes = self._ws_cache[key]
        return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None


_loaded: dict[str, _Kernel] = {}
_lock = threading.Lock()
_index_cache: dict[Path, tuple[float, dict]] = {}


def _index(root: Path | None = None) -> dict:
    """The build index, re-read only when the file changes (the GEMM path asks on every call)."""
    root = root or cache_root()
    path = root / "index.json"
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return {}
    hit = _index_cache.get(path)
    if hit is None or hit[0] != mtime:
        hit = (mtime, read_index(root))
        _index_cache[path] = hit
    return hit[1]


def load(key: str, root: Path | None = None) -> _Kernel:
    """The loaded kernel ``key`` (see ``specs.KERNELS``). Raises KernelNotBuilt with the fix."""
    if key not in BY_KEY:
        raise ValueError(f"unknown CUTLASS kernel {key!r}; known: {sorted(BY_KEY)}")
    with _lock:
        if key in _loaded:
            return _loaded[key]
        spec = BY_KEY[key]
        root = root or cache_root()
        record = _index(root).get(key)
        if record is None:
            raise KernelNotBuilt(f"CUTLASS kernel {key} is not built: {_build_hint(spec.arch, key)}")
        path = root / record["library"]
        if not path.exists():
            raise KernelNotBuilt(f"the index names {path} for {key} but it is missing: {_build_hint(spec.arch, key)}")
        _loaded[key] = _Kernel(spec, path)
        return _loaded[key]


def is_built(key: str, root: Path | None = None) -> bool:
    return key in _index(root)


# --------------------------------------------------------------------------------------------
# Argument checks and preparation (pure functions of tensor metadata: tested on the CPU)


def _row_major(t: torch.Tensor) -> bool:
    r, c = t.shape
    return (t.stride(1) == 1 or c == 1) and (t.stride(0) == c or r == 1)


def _col_major(t: torch.Tensor) -> bool:
    r, c = t.shape
    return (t.stride(0) == 1 or r == 1) and (t.stride(1) == r or c == 1)


def operand_order(a: torch.Tensor, b: torch.Tensor) -> tuple[str, bool, bool]:
    """(order, copy_a, copy_b): the kernel order for ``a`` [M, K] and ``b`` [N, K] as laid out.

    "k" = K-major (row-major [M, K] / [N, K]); "m"/"n" = the transpose view of a contiguous
    [K, M] / [K, N] tensor. A layout that is neither (general strides) needs a copy, which is
    then K-major; copy_a / copy_b say so.
    """
    oa, ca = _memory_order(a, "m")
    ob, cb = _memory_order(b, "n")
    return oa + ob, ca, cb


def _memory_order(t: torch.Tensor, transposed: str) -> tuple[str, bool]:
    """("k", False) for a K-major operand, (``transposed``, False) for the transpose view of a
    contiguous tensor, ("k", True) for anything else: it is copied to K-major."""
    if _row_major(t):
        return "k", False
    if _col_major(t):
        return transposed, False
    return "k", True


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape)


def check_bf16_operands(a: torch.Tensor, b: torch.Tensor, what: str = "gemm_bf16_alpha",
                        out_dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """Validate ``a`` [M, K] and ``b`` [N, K] for the BF16 GEMM; return (M, N, K).

    Checked: tensors, 2-D, BF16, same CUDA device, matching K, nonempty, int32 extents, and the
    16-byte alignment TMA needs along each operand's contiguous dimension and of the output rows
    (K % 8 for K-major operands, M % 8 / N % 8 for transposed ones, N % 8 for a BF16 output and
    N % 4 for an FP32 one).
    Device placement is checked by the caller (this is also used on CPU tensors in tests).
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{what}: {name} must be 2-D, got shape {_shape(t)}")
        if t.dtype != torch.bfloat16:
            raise ValueError(f"{what}: {name} must be bfloat16, got {t.dtype} (shape {_shape(t)})")
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"{what}: a is [M, K] = {_shape(a)} and b is [N, K] = {_shape(b)}: K differs ({k} vs {kb})")
    if min(m, n, k) == 0:
        raise ValueError(f"{what}: empty problem (a {_shape(a)}, b {_shape(b)})")
    if max(m, n, k) > _INT_MAX:
        raise ValueError(f"{what}: extents must fit in int32 (a {_shape(a)}, b {_shape(b)})")
    if a.device != b.device:
        raise ValueError(f"{what}: a is on {a.device} and b on {b.device}; they must share one CUDA device")
    order, ca, cb = operand_order(a, b)
    need = {
        "a": ("K", k) if order[0] == "k" else ("M", m),
        "b": ("K", k) if order[1] == "k" else ("N", n),
        "y": ("N", n),
    }
    for name, (dim, v) in need.items():
        el = _TMA_BYTES // (_out_itemsize(out_dtype, what) if name == "y" else 2)
        if v % el:
            label = {"a": f"a {_shape(a)}", "b": f"b {_shape(b)}", "y": f"the output [{m}, {n}]"}[name]
            raise ValueError(
                f"{what}: {label} has contiguous extent {dim} = {v}, not a multiple of {el} "
                f"(CUTLASS's TMA loads/stores need 16-byte aligned rows); pad {dim} to a multiple of {el}"
            )
    for name, t, copied in (("a", a, ca), ("b", b, cb)):
        if not copied and t.data_ptr() % _TMA_BYTES:
            raise ValueError(f"{what}: {name} ({_shape(t)}) data pointer is not 16-byte aligned (a sliced view?)")
    return m, n, k


def check_nvfp4_operands(a, b, what: str = "gemm_nvfp4", out_dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """Validate two NVFP4Tensors a [M, K] and b [N, K] for the native GEMM; return (M, N, K).

    Checked: quantized along the same K; packed data uint8 [rows, K/2] contiguous; scales
    float8_e4m3fn [rows, K/16]; same device; same Hadamard domain (Wgrad operands are both
    transformed, Fprop/Dgrad both not: mixing them computes garbage); K % 32 == 0 (16-byte TMA
    rows of E2M1); 16-byte output rows (N % 8 for BF16, N % 4 for FP32).
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, NVFP4Tensor):
            raise ValueError(f"{what}: {name} must be an NVFP4Tensor (from rayfp4.formats.nvfp4.quantize), got {type(t).__name__}")
        rows, kk = t.shape
        if tuple(t.data.shape) != (rows, kk // 2) or t.data.dtype != torch.uint8:
            raise ValueError(f"{what}: {name}.data must be uint8 [{rows}, {kk // 2}], got {t.data.dtype} {_shape(t.data)}")
        if not t.data.is_contiguous():
            raise ValueError(f"{what}: {name}.data ({_shape(t.data)}) must be contiguous (K-major)")
        if tuple(t.scale.shape) != (rows, kk // 16) or t.scale.dtype != torch.float8_e4m3fn:
            raise ValueError(
                f"{what}: {name}.scale must be float8_e4m3fn [{rows}, {kk // 16}], got {t.scale.dtype} {_shape(t.scale)}"
            )
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"{what}: a is [M, K] = {m}x{k} and b is [N, K] = {n}x{kb}: K differs")
    if a.data.device != b.data.device:
        raise ValueError(f"{what}: a is on {a.data.device} and b on {b.data.device}")
    _check_same_domain(a, b, what)
    if k % 32:
        raise ValueError(f"{what}: K = {k} (a {m}x{k}, b {n}x{k}) must be a multiple of 32 for the FP4 TMA loads")
    per_row = _TMA_BYTES // _out_itemsize(out_dtype, what)
    if n % per_row:
        name = {"bf16": "BF16", "f32": "FP32"}[_DTYPE_NAME[out_dtype]]
        raise ValueError(f"{what}: N = {n} (b {n}x{k}) must be a multiple of {per_row} for the {name} output rows")
    if max(m, n, k) > _INT_MAX:
        raise ValueError(f"{what}: extents must fit in int32")
    return m, n, k


def _check_same_domain(a, b, what: str) -> None:
    if a.rht != b.rht:
        raise ValueError(
            f"{what}: a.rht={a.rht} but b.rht={b.rht}: both operands must be in the same (Hadamard or "
            "plain) domain for the transform to cancel"
        )


_OUT_SUFFIX = {torch.bfloat16: "", torch.float32: "_f32out"}
_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "f32"}


def _out_itemsize(out_dtype: torch.dtype, what: str) -> int:
    if out_dtype not in _OUT_SUFFIX:
        raise ValueError(f"{what}: out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}")
    return torch.empty((), dtype=out_dtype).element_size()


def _alpha_args(alpha, device: torch.device, what: str) -> tuple[float, int | None, torch.Tensor | None]:
    """(host alpha, device pointer or None, tensor kept alive) for a float or a 1-element tensor."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or alpha.dtype != torch.float32:
            raise ValueError(f"{what}: alpha must be a float or a 1-element float32 tensor, got {alpha.dtype} {_shape(alpha)}")
        if alpha.device != device:
            raise ValueError(f"{what}: alpha is on {alpha.device}, the operands on {device}")
        alpha = alpha.contiguous()
        return 1.0, alpha.data_ptr(), alpha
    try:
        return float(alpha), None, None
    except (TypeError, ValueError):
        raise ValueError(f"{what}: alpha must be a float or a 1-element float32 tensor, got {type(alpha).__name__}") from None


def _require(device: torch.device, arch: str, what: str) -> None:
    if device.type != "cuda":
        raise ValueError(f"{what}: operands must be CUDA tensors, got {device}")
    cap = torch.cuda.get_device_capability(device)
    if _arch_for_capability(cap) != arch:
        raise RuntimeError(
            f"{what}: the {arch} kernels need compute capability {ARCH_MAJOR[arch]}.0; "
            f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}"
        )


def _check_out(out, m: int, n: int, device, what: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{what}: out must be a contiguous {str(dtype).removeprefix('torch.')} [{m}, {n}] tensor on {device}, got {out.dtype} {_shape(out)} on {out.device}")
    if out.data_ptr() % _TMA_BYTES:
        raise ValueError(f"{what}: out data pointer is not 16-byte aligned")
    return out


def _raise_status(rc: int, err: ctypes.Array, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what}: {err.value.decode(errors='replace') or f'error code {rc}'}")


# --------------------------------------------------------------------------------------------
# The GEMMs


def kernel_for(a: torch.Tensor, b: torch.Tensor, root: Path | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> tuple[str, bool, bool]:
    """(kernel key, copy_a, copy_b) that ``gemm_bf16_alpha`` will use for these operands.

    A memory order whose kernel is not built (or, for an FP32 output, does not exist: only
    ``kk`` has an FP32 kernel) falls back to the K-major (``kk``) kernel on contiguous copies:
    correct, but one extra read+write of each copied operand.
    """
    suffix = _OUT_SUFFIX[out_dtype]
    order, ca, cb = operand_order(a, b)
    key = f"sm90a_bf16_{order}{suffix}"
    if order != "kk" and not is_built(key, root):
        return f"sm90a_bf16_kk{suffix}", ca or order[0] != "k", cb or order[1] != "k"
    return key, ca, cb


def gemm_bf16_alpha(
    a: torch.Tensor, b: torch.Tensor, alpha=1.0, out: torch.Tensor | None = None, kernel: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``bf16(alpha * (a @ b.T))`` on sm_90a: a [M, K], b [N, K] BF16, FP32 accumulate, FP32 alpha.

    ``out_dtype=torch.float32``: ``fp32(alpha * (a @ b.T))`` (the FP32-output kernel, ``kk``
    order only; other layouts are copied to it).

    ``alpha``: a float, or a 1-element float32 tensor on the operands' device (read there; use
    this on the training path to avoid a host sync). The three training GEMMs map to::

        Fprop  y  = x  @ W.T  -> gemm_bf16_alpha(x, W, alpha)         (order kk)
        Dgrad  dx = dy @ W    -> gemm_bf16_alpha(dy, W.t(), alpha)    (order kn, no copy)
        Wgrad  dW = dy.T @ x  -> gemm_bf16_alpha(dy.t(), x.t(), alpha) (order mn, no copy)

    ``kernel``: force one sm90a kernel key (e.g. a tuning variant); its order must match the
    operands' memory order. By default ``kernel_for`` picks the one built for that order.
    """
    what = "gemm_bf16_alpha"
    m, n, k = check_bf16_operands(a, b, what, out_dtype)
    _require(a.device, "sm90a", what)
    if kernel is None:
        key, ca, cb = kernel_for(a, b, out_dtype=out_dtype)
    else:
        spec = BY_KEY.get(kernel)
        if spec is None or spec.family != "bf16_alpha":
            raise ValueError(f"{what}: {kernel!r} is not a BF16 kernel; known: {[s.key for s in KERNELS if s.family == 'bf16_alpha']}")
        if spec.out != _DTYPE_NAME[out_dtype]:
            raise ValueError(f"{what}: kernel {kernel} writes {spec.out}, but out_dtype is {out_dtype}")
        order, ca, cb = operand_order(a, b)
        if order != spec.order:
            raise ValueError(f"{what}: kernel {kernel} is for memory order {spec.order!r}, the operands are {order!r}")
        key = kernel
    if ca:
        a = a.contiguous()
    if cb:
        b = b.contiguous()
    kernel = load(key)
    alpha_f, alpha_ptr, _keep = _alpha_args(alpha, a.device, what)
    out = _check_out(out, m, n, a.device, what, out_dtype)
    err = ctypes.create_string_buffer(_ERR_LEN)
    with torch.cuda.device(a.device):
        ws = kernel.workspace(m, n, k, a.device)
        stream = torch.cuda.current_stream(a.device).cuda_stream
        rc = kernel.run(
            m, n, k, a.data_ptr(), b.data_ptr(), out.data_ptr(), alpha_f, alpha_ptr,
            ws.data_ptr() if ws is not None else None, ws.numel() if ws is not None else 0,
            stream, err, _ERR_LEN,
        )
    _raise_status(rc, err, what)
    return out


def gemm_nvfp4_emulated(
    a, b, out: torch.Tensor | None = None, *, operands: tuple[torch.Tensor, torch.Tensor] | None = None, alpha=None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The NVFP4 GEMM ``a @ b.T`` of two NVFP4Tensors, emulated exactly on Hopper.

    Both operands dequantized without their tensor factor (exact in BF16), one BF16 GEMM with
    FP32 accumulation, ``alpha = gemm_alpha(a, b)`` in the epilogue: the same products as
    Blackwell's block-scaled MMA; only the FP32 summation order may differ.

    ``operands`` (a's and b's ``dequantize_unscaled(torch.bfloat16)``) and ``alpha`` (a 1-element
    FP32 tensor on the device) are for callers that have them from faster kernels; they must be
    those values. ``out_dtype``: BF16 (Fprop, Dgrad) or FP32 (Wgrad).
    """
    _check_same_domain(a, b, "gemm_nvfp4_emulated")
    if operands is None:
        operands = (a.dequantize_unscaled(torch.bfloat16), b.dequantize_unscaled(torch.bfloat16))
    if alpha is None:
        alpha = gemm_alpha(a, b).reshape(1)
    return gemm_bf16_alpha(*operands, alpha, out=out, out_dtype=out_dtype)


def nvfp4_kernel_for(m: int, n: int, out_dtype: torch.dtype = torch.bfloat16, root: Path | None = None) -> str:
    """The ``sm100a_nvfp4_*`` kernel ``gemm_nvfp4`` picks: the 2-SM 256x256 tile when M and N are
    both >= 256 and it is built, else the 1-SM 128x128 one; the ``_f32out`` twin for FP32."""
    suffix = _OUT_SUFFIX[out_dtype]
    big = f"sm100a_nvfp4_256x256{suffix}"
    return big if min(m, n) >= 256 and is_built(big, root) else f"sm100a_nvfp4_128x128{suffix}"


def gemm_nvfp4(a, b, kernel: str | None = None, out: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``bf16(alpha * sum_k a_k b_k)`` with the native NVFP4 block-scaled MMA (sm_100a only).

    a [M, K], b [N, K]: NVFP4Tensors quantized along K. ``kernel``: a ``sm100a_nvfp4_*`` key;
    by default :func:`nvfp4_kernel_for`. ``out_dtype=torch.float32`` (Wgrad) writes
    ``fp32(alpha * sum_k a_k b_k)`` with the ``_f32out`` kernels.
    NOT YET RUN ON HARDWARE: no Blackwell GPU was available when this was written.
    """
    what = "gemm_nvfp4"
    m, n, k = check_nvfp4_operands(a, b, what, out_dtype)
    device = a.data.device
    _require(device, "sm100a", what)
    if kernel is None:
        kernel = nvfp4_kernel_for(m, n, out_dtype)
    spec = BY_KEY.get(kernel)
    if spec is None or spec.family != "nvfp4":
        raise ValueError(f"{what}: {kernel!r} is not an NVFP4 kernel; known: {[s.key for s in KERNELS if s.family == 'nvfp4']}")
    if spec.out != _DTYPE_NAME[out_dtype]:
        raise ValueError(f"{what}: kernel {kernel} writes {spec.out}, but out_dtype is {out_dtype}")
    lib = load(kernel)
    sfa, sfb = a.blocked_scale(), b.blocked_scale()
    alpha = gemm_alpha(a, b).reshape(1).to(device)
    out = _check_out(out, m, n, device, what, out_dtype)
    err = ctypes.create_string_buffer(_ERR_LEN)
    with torch.cuda.device(device):
        ws = lib.workspace(m, n, k, device)
        stream = torch.cuda.current_stream(device).cuda_stream
        rc = lib.run(
            m, n, k, a.data.data_ptr(), sfa.data_ptr(), b.data.data_ptr(), sfb.data_ptr(), out.data_ptr(),
            1.0, alpha.data_ptr(), ws.data_ptr() if ws is not None else None, ws.numel() if ws is not None else 0,
            stream, err, _ERR_LEN,
        )
    _raise_status(rc, err, what)
    return out


__all__ = [
    "Availability",
    "KernelNotBuilt",
    "available",
    "load",
    "is_built",
    "operand_order",
    "kernel_for",
    "nvfp4_kernel_for",
    "check_bf16_operands",
    "check_nvfp4_operands",
    "gemm_bf16_alpha",
    "gemm_nvfp4_emulated",
    "gemm_nvfp4",
]
