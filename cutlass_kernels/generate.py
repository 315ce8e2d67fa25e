"""Select rayfp4's GEMMs from CUTLASS's own generator and emit one CUDA source file per kernel.

Why the generator and not hand-written CUTLASS types: ``cutlass_library`` (shipped in the
``nvidia-cutlass`` wheel) is what NVIDIA uses to enumerate the kernels it tests and profiles,
including the SM100 block-scaled NVFP4 family. We run its generator functions for the two
families we need, pick the operations whose attributes match the table in ``specs.py`` (element
types, layouts, tile, cluster, schedule), and let its emitter write the C++ kernel type. Only the
thin ``extern "C"`` entry points around it are ours (templates below), so a CUTLASS upgrade that
renames or drops a configuration fails loudly here instead of silently building something else.

The entry points take raw pointers, sizes, alpha and a CUDA stream, return 0 or an error code
with a message in a caller-provided buffer, and depend on nothing from torch: the libraries
load with ctypes in any torch version (``binding.py``).

Layouts. For the Hopper BF16 kernels the CUTLASS generator only emits column-major outputs, so
each kernel computes the transposed problem: the user's row-major ``y[M, N] = a[M, K] b[N, K]^T``
is, byte for byte, the column-major ``y^T[N, M] = b a^T``. The entry point swaps the operands and
the M/N extents; the caller never sees it. The Blackwell NVFP4 kernels have a row-major output
("tnt") and run the user's problem directly.

Run ``python -m cutlass_kernels.generate --arch sm90a --out DIR`` to look at the sources.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .specs import KERNELS, KernelSpec, kernels_for

CUDA_VERSION = "13.0.0"  # the generator's gate for which kernels a toolkit can build


class CutlassLibraryMissing(RuntimeError):
    """``nvidia-cutlass`` (its ``cutlass_library`` module, or the headers in it) is not installed."""


def _import_cutlass_library():
    try:
        import cutlass_library  # noqa: F401
        from cutlass_library import generator, manifest
        from cutlass_library.gemm_operation import EmitGemmUniversal3xInstance
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CutlassLibraryMissing(
            "cutlass_kernels needs CUTLASS's generator and headers: "
            "pip install 'nvidia-cutlass==4.2.0.0' (the 'cutlass' extra of rayfp4). "
            f"Import failed: {e}"
        ) from e
    return generator, manifest, EmitGemmUniversal3xInstance


def cutlass_include_dirs() -> list[Path]:
    """The CUTLASS/CuTe headers and the util headers (packed strides) shipped in the wheel."""
    _import_cutlass_library()
    import cutlass_library

    root = Path(cutlass_library.__file__).parent / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    for d in dirs:
        if not (d / "cutlass").is_dir():
            raise CutlassLibraryMissing(
                f"the CUTLASS headers are missing from the nvidia-cutlass wheel (looked in {d}); "
                "reinstall nvidia-cutlass==4.2.0.0"
            )
    return dirs


def cutlass_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-cutlass")
    except Exception:  # pragma: no cover
        return "unknown"


# --------------------------------------------------------------------------------------------
# Selection


def _enumerate(arch: str) -> list:
    """All operations CUTLASS's generator emits for the family we build on ``arch``."""
    generator, manifest, _ = _import_cutlass_library()
    logging.getLogger("cutlass_library").setLevel(logging.WARNING)
    cc = {"sm90a": "90a", "sm100a": "100a"}[arch]
    # kernels="all" asks for the generator's default instantiation level (more tiles and
    # clusters than its pruned default); filter_by_cc keeps only kernels that fit this arch.
    args = generator.define_parser().parse_args(
        ["--architectures", cc, "--kernels", "all", "--operations", "gemm", "--cuda-version", CUDA_VERSION]
    )
    man = manifest.Manifest(args)
    if arch == "sm90a":
        generator.GenerateSM90_TensorOp_16b_WGMMA_gemm(man, CUDA_VERSION)
    else:
        generator.GenerateSM100_TensorOp_fp4_UMMA_gemm_with_block_scaled(man, CUDA_VERSION)
    return list(man.operations_by_name.values())


_LAYOUT_LETTER = {"RowMajor": "t", "ColumnMajor": "n"}


def _layout_letters(op) -> str:
    return "".join(_LAYOUT_LETTER.get(t.layout.name, "?") for t in (op.A, op.B, op.D))


def _matches(spec: KernelSpec, op) -> bool:
    """Whether a CUTLASS operation is the one ``spec`` describes (attributes, not name parsing)."""
    td = op.tile_description
    if tuple(td.tile_shape) != spec.tile or tuple(td.cluster_shape) != spec.cluster:
        return False
    if _layout_letters(op) != spec.cutlass_layout:
        return False
    if op.kernel_schedule.name != spec.schedule or op.epilogue_schedule.name != spec.epilogue:
        return False
    if op.tile_scheduler.name != "Default" or op.element_epilogue.name != "f32":
        return False
    if op.epilogue_functor.name != "LinearCombination":
        return False
    if op.D.element.name != spec.out:
        return False
    if spec.family == "bf16_alpha":
        # void C: no source operand, so the epilogue is exactly D = out(alpha * acc).
        return (
            op.A.element.name == "bf16"
            and op.B.element.name == "bf16"
            and op.C.element.name == "void"
            and op.tile_description.math_instruction.element_accumulator.name == "f32"
        )
    # nvfp4: E2M1 operands with UE4M3 scales (NVFP4, 16-element blocks by the Nvf4 schedule).
    # C is BF16 in every generated FP4 kernel with a BF16 output (never read: beta = 0) and void
    # in those with an FP32 output.
    return (
        op.A.element.name == "e2m1"
        and op.B.element.name == "e2m1"
        and op.ScaleFactorA.name == "ue4m3"
        and op.ScaleFactorB.name == "ue4m3"
        and op.C.element.name == ("bf16" if spec.out == "bf16" else "void")
        and op.tile_description.math_instruction.element_accumulator.name == "f32"
        and op.ScaleFactorD.element.name == "void"  # no output scale factors: a plain output
    )


def select(spec: KernelSpec, operations: list | None = None):
    """The CUTLASS operation for ``spec``. Raises LookupError if the generator has none or several."""
    ops = operations if operations is not None else _enumerate(spec.arch)
    found = [op for op in ops if _matches(spec, op)]
    if len(found) != 1:
        raise LookupError(
            f"CUTLASS {cutlass_version()}'s generator has {len(found)} operations matching kernel "
            f"{spec.key} (tile {spec.tile}, cluster {spec.cluster}, layout {spec.cutlass_layout}, "
            f"schedule {spec.schedule}); expected exactly one"
            + (f": {[op.procedural_name() for op in found]}" if found else "")
        )
    return found[0]


def select_all(specs: list[KernelSpec]) -> dict[str, object]:
    """key -> CUTLASS operation, enumerating each arch's generator once."""
    by_arch: dict[str, list] = {}
    out = {}
    for s in specs:
        if s.arch not in by_arch:
            by_arch[s.arch] = _enumerate(s.arch)
        out[s.key] = select(s, by_arch[s.arch])
    return out


# --------------------------------------------------------------------------------------------
# Emission

_PRELUDE = r"""// Generated by rayfp4 cutlass_kernels/generate.py from CUTLASS ${cutlass_version}: do not edit.
// Kernel: ${name}
// Entry points: ${symbol}_run, ${symbol}_workspace_size, ${symbol}_name
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#define RAYFP4_EXPORT extern "C" __attribute__((visibility("default")))

// ---- the kernel type, as CUTLASS's emitter writes it ----
${kernel_definition}
// ---- rayfp4 glue ----
namespace {

using Gemm = cutlass::gemm::device::GemmUniversalAdapter<${name}>;
using Kernel = typename Gemm::GemmKernel;
using StrideA = typename Kernel::StrideA;
using StrideB = typename Kernel::StrideB;
using StrideC = typename Kernel::StrideC;
using StrideD = typename Kernel::StrideD;
using MainloopArgs = typename Kernel::CollectiveMainloop::Arguments;
using EpilogueArgs = typename Kernel::CollectiveEpilogue::Arguments;

int report(char* err, int err_len, int code, const char* fmt, ...) {
  if (err && err_len > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
  }
  return code;
}

// The persistent tile scheduler sizes its grid from the SM count; querying it costs a driver
// call, so remember it per device.
int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (cache[device] == 0) cache[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cache[device];
}

${make_arguments}

int run_gemm(typename Gemm::Arguments& args, void* workspace, size_t workspace_bytes,
             cudaStream_t stream, char* err, int err_len) {
  size_t need = Gemm::get_workspace_size(args);
  if (workspace_bytes < need)
    return report(err, err_len, 2, "${key}: workspace of %zu bytes is smaller than the %zu needed",
                  workspace_bytes, need);
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess)
    return report(err, err_len, 3, "${key}: CUTLASS cannot implement this problem (%s)",
                  cutlassGetStatusString(st));
  st = gemm.initialize(args, workspace, stream);
  if (st != cutlass::Status::kSuccess)
    return report(err, err_len, 4, "${key}: initialize failed (%s; %s)", cutlassGetStatusString(st),
                  cudaGetErrorString(cudaGetLastError()));
  st = gemm.run(stream);
  cudaError_t ce = cudaGetLastError();
  if (st != cutlass::Status::kSuccess || ce != cudaSuccess)
    return report(err, err_len, 5, "${key}: launch failed (%s; %s)", cutlassGetStatusString(st),
                  cudaGetErrorString(ce));
  return 0;
}

}  // namespace

RAYFP4_EXPORT const char* ${symbol}_name() { return "${name}"; }
"""

# y[m, n] (row-major) = out(alpha * a[m, k] b[n, k]^T), computed as the column-major
# D[n, m] = b a^T: CUTLASS's A is b ([n, k]), its B is a^T ([k, m]); packed strides of the
# layouts fixed by the kernel type (which of a/b is K-major is the kernel's "order").
_BF16_ARGS = r"""
typename Gemm::Arguments make_arguments(int m, int n, int k, const void* a, const void* b, void* y,
                                        float alpha, const float* alpha_ptr) {
  int device = 0;
  cudaGetDevice(&device);
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = cute::make_shape(n, m, k, 1);
  args.mainloop.ptr_A = reinterpret_cast<decltype(args.mainloop.ptr_A)>(b);
  args.mainloop.dA = cutlass::make_cute_packed_stride(StrideA{}, {n, k, 1});
  args.mainloop.ptr_B = reinterpret_cast<decltype(args.mainloop.ptr_B)>(a);
  args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, {m, k, 1});
  args.epilogue.thread.alpha = alpha;
  args.epilogue.thread.alpha_ptr = alpha_ptr;  // when set, read on the device (no host sync)
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;  // void C: no source operand
  args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, {n, m, 1});
  args.epilogue.ptr_D = reinterpret_cast<decltype(args.epilogue.ptr_D)>(y);
  args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, {n, m, 1});
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count(device);
  return args;
}
"""

_BF16_ENTRY = r"""
// y[m, n] = ${out}(alpha * sum_k a[m, k] * b[n, k]) with FP32 accumulation; bf16 a and b, ${out} y.
// alpha_ptr (device, FP32) overrides alpha when non-null. Returns 0 or an error code (message in err).
RAYFP4_EXPORT int ${symbol}_run(int m, int n, int k, const void* a, const void* b, void* y,
                                float alpha, const float* alpha_ptr, void* workspace,
                                size_t workspace_bytes, void* stream, char* err, int err_len) {
  if (m <= 0 || n <= 0 || k <= 0)
    return report(err, err_len, 1, "${key}: empty problem m=%d n=%d k=%d", m, n, k);
  auto args = make_arguments(m, n, k, a, b, y, alpha, alpha_ptr);
  return run_gemm(args, workspace, workspace_bytes, static_cast<cudaStream_t>(stream), err, err_len);
}

RAYFP4_EXPORT size_t ${symbol}_workspace_size(int m, int n, int k) {
  auto args = make_arguments(m, n, k, nullptr, nullptr, nullptr, 1.0f, nullptr);
  return Gemm::get_workspace_size(args);
}
"""

# Native NVFP4: a [m, k/2] and b [n, k/2] bytes of packed E2M1 (K-major), sfa/sfb E4M3 scales in
# the 128x4 blocked layout (the layout CUTLASS's Sm1xxBlockScaledConfig describes), y row-major.
_NVFP4_ARGS = r"""
using SfConfig = typename Kernel::CollectiveMainloop::Sm1xxBlkScaledConfig;

typename Gemm::Arguments make_arguments(int m, int n, int k, const void* a, const void* sfa,
                                        const void* b, const void* sfb, void* y, float alpha,
                                        const float* alpha_ptr) {
  int device = 0;
  cudaGetDevice(&device);
  auto shape = cute::make_shape(m, n, k, 1);
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = shape;
  args.mainloop.ptr_A = reinterpret_cast<decltype(args.mainloop.ptr_A)>(a);
  args.mainloop.dA = cutlass::make_cute_packed_stride(StrideA{}, {m, k, 1});
  args.mainloop.ptr_B = reinterpret_cast<decltype(args.mainloop.ptr_B)>(b);
  args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, {n, k, 1});
  args.mainloop.ptr_SFA = reinterpret_cast<decltype(args.mainloop.ptr_SFA)>(sfa);
  args.mainloop.layout_SFA = SfConfig::tile_atom_to_shape_SFA(shape);
  args.mainloop.ptr_SFB = reinterpret_cast<decltype(args.mainloop.ptr_SFB)>(sfb);
  args.mainloop.layout_SFB = SfConfig::tile_atom_to_shape_SFB(shape);
  args.epilogue.thread.alpha = alpha;
  args.epilogue.thread.alpha_ptr = alpha_ptr;
  args.epilogue.thread.beta = 0.0f;  // C is never read (or void)
  args.epilogue.ptr_C = ${ptr_c};
  args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, {m, n, 1});
  args.epilogue.ptr_D = reinterpret_cast<decltype(args.epilogue.ptr_D)>(y);
  args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, {m, n, 1});
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count(device);
  return args;
}
"""

_NVFP4_ENTRY = r"""
// y[m, n] = ${out}(alpha * sum_k e2m1(a[m,k]) sfa[m,k/16] e2m1(b[n,k]) sfb[n,k/16]), FP32 accumulation.
// alpha_ptr (device, FP32) overrides alpha when non-null. Returns 0 or an error code (message in err).
RAYFP4_EXPORT int ${symbol}_run(int m, int n, int k, const void* a, const void* sfa, const void* b,
                                const void* sfb, void* y, float alpha, const float* alpha_ptr,
                                void* workspace, size_t workspace_bytes, void* stream, char* err,
                                int err_len) {
  if (m <= 0 || n <= 0 || k <= 0)
    return report(err, err_len, 1, "${key}: empty problem m=%d n=%d k=%d", m, n, k);
  auto args = make_arguments(m, n, k, a, sfa, b, sfb, y, alpha, alpha_ptr);
  return run_gemm(args, workspace, workspace_bytes, static_cast<cudaStream_t>(stream), err, err_len);
}

RAYFP4_EXPORT size_t ${symbol}_workspace_size(int m, int n, int k) {
  auto args = make_arguments(m, n, k, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0f, nullptr);
  return Gemm::get_workspace_size(args);
}
"""


def _substitute(template: str, values: dict[str, str]) -> str:
    # string.Template would trip over the C++ '$'-free text fine, but be explicit and strict.
    out = template
    for k, v in values.items():
        out = out.replace("${" + k + "}", v)
    assert "${" not in out, "unsubstituted placeholder in a glue template"
    return out


def emit_source(spec: KernelSpec, operation) -> str:
    """The complete .cu translation unit of one kernel: CUTLASS's kernel type plus our glue."""
    _, _, Emitter = _import_cutlass_library()
    name = operation.procedural_name()
    if spec.family == "bf16_alpha":
        args, entry = _BF16_ARGS, _BF16_ENTRY
    else:
        args, entry = _NVFP4_ARGS, _NVFP4_ENTRY
    values = {
        "cutlass_version": cutlass_version(),
        "name": name,
        "key": spec.key,
        "symbol": spec.symbol,
        "kernel_definition": Emitter().emit(operation),
        "out": spec.out,
        # a BF16-output FP4 kernel has a (never read) BF16 C: point it at y; a void C takes nullptr
        "ptr_c": "nullptr" if spec.out == "f32" else "reinterpret_cast<decltype(args.epilogue.ptr_C)>(y)",
    }
    values["make_arguments"] = _substitute(args, values)
    return _substitute(_PRELUDE, values) + _substitute(entry, values)


def generate(specs: list[KernelSpec]) -> dict[str, tuple[object, str]]:
    """key -> (CUTLASS operation, source text) for each spec."""
    ops = select_all(specs)
    return {s.key: (ops[s.key], emit_source(s, ops[s.key])) for s in specs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="all", choices=["sm90a", "sm100a", "all"])
    p.add_argument("--kernels", default=None, help="comma-separated kernel keys (default: the default set)")
    p.add_argument("--out", type=Path, default=None, help="write the .cu files here (else list only)")
    a = p.parse_args(argv)
    specs = kernels_for(a.arch, a.kernels.split(",") if a.kernels else None)
    for key, (op, src) in generate(specs).items():
        print(f"{key:24s} {op.procedural_name()}")
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / f"{key}.cu").write_text(src)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["KERNELS", "select", "select_all", "emit_source", "generate", "cutlass_include_dirs"]
