"""What each CUTLASS kernel of rayfp4 is, in plain data (no dependency on ``cutlass_library``).

The binding needs to know, at run time, which kernels exist and what they compute; the generator
needs to know which CUTLASS operation to pick for each. Both read this table. It lives apart from
``generate.py`` so that a machine with only the built libraries (the GPU box) can load them
without installing ``nvidia-cutlass``.

Two families:

``bf16_alpha`` (sm_90a, Hopper): ``y[M, N] = bf16(alpha * (a[M, K] @ b[N, K]^T))`` with BF16
    operands, FP32 accumulation and the FP32 ``alpha`` applied in the epilogue before the one
    rounding to BF16. This is the exact emulation of the NVFP4 block-scaled GEMM on GPUs without
    FP4 tensor cores (recipe section 8): the operands are E2M1 x E4M3 products, exact in BF16.
    Each kernel is specialised for one memory order of ``a`` and ``b`` so that the three GEMMs
    of a linear layer run without materialised transposes:

    ======== =============================== ========================= ===========================
    order    a is                            b is                      training GEMM
    ======== =============================== ========================= ===========================
    ``kk``   [M, K] row-major (K-major)      [N, K] row-major          Fprop ``x W^T``; any GEMM
                                                                       of two NVFP4 operands
    ``kn``   [M, K] row-major                ``W.t()``, W [K, N]       Dgrad ``dy W``
                                             row-major (N-major)
    ``mn``   ``dy.t()``, dy [K, M] row-major ``x.t()``, x [K, N]       Wgrad ``dy^T x``
             (M-major)                       row-major (N-major)
    ======== =============================== ========================= ===========================

``nvfp4`` (sm_100a, Blackwell): ``y[M, N] = bf16(alpha * sum_k e2m1(a)*sfa * e2m1(b)*sfb)``, the
    native ``tcgen05.mma ... kind::mxf4nvf4.block_scale.block16`` GEMM. Both operands K-major
    (packed E2M1, [M, K/2] and [N, K/2] bytes), scales in the 128x4 blocked layout, ``alpha``
    the product of the two tensor factors. CUTLASS only offers TN for FP4, and NVFP4 tensors
    are always stored quantized along K, so no other order is needed.

Each family comes in two output types (``out``): BF16 for Fprop and Dgrad, whose outputs are
activations, and FP32 for Wgrad, whose output is the weight gradient that is accumulated into the
FP32 master gradient (recipe section 6: the Wgrad result is not rounded to BF16). The FP32 kernels
have the same mainloop as their BF16 twins; only the epilogue writes ``fp32(alpha * acc)``. On
Hopper the Wgrad operands reach the GEMM as the two NVFP4Tensors' dequantized rows, both K-major
(K = tokens), so only the ``kk`` order needs an FP32 kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("sm90a", "sm100a")

#: Compute capability (major) each arch's code runs on. sm_90a/sm_100a code ("a" = arch-specific
#: features: wgmma, tcgen05) runs only on exactly that major version.
ARCH_MAJOR = {"sm90a": 9, "sm100a": 10}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel we build.

    key:       stable short id; also the prefix of its C entry points (``rayfp4_<key>_run``)
    arch:      "sm90a" or "sm100a"
    family:    "bf16_alpha" or "nvfp4"
    order:     memory order of (a, b) in user terms, see the module docstring ("kk", "kn", "mn")
    tile:      CUTLASS CTA tile (M, N, K) of the underlying operation
    cluster:   CUTLASS cluster shape (M, N, K)
    cutlass_layout: CUTLASS layout letters of A, B, D of the underlying operation ("t" row-major,
               "n" column-major). For ``bf16_alpha`` the underlying problem is the transpose
               ``y^T = b a^T`` (see ``generate.py``), so these letters are not the user's.
    schedule:  CUTLASS's kernel schedule (``KernelScheduleType`` name)
    epilogue:  CUTLASS's epilogue schedule (``EpilogueScheduleType`` name); TMA epilogues only:
               they stage the output tile through shared memory for full-width stores
    out:       element type of the output: "bf16" (Fprop, Dgrad) or "f32" (Wgrad)
    default:   built by ``--arch`` without ``--kernels``
    """

    key: str
    arch: str
    family: str
    order: str
    tile: tuple[int, int, int]
    cluster: tuple[int, int, int]
    cutlass_layout: str
    schedule: str
    epilogue: str
    out: str = "bf16"
    default: bool = True

    @property
    def symbol(self) -> str:
        return f"rayfp4_{self.key}"

    @property
    def lib_name(self) -> str:
        return f"librayfp4_{self.key}.so"


# The user order -> the CUTLASS layouts of the transposed problem y^T[N, M] = b[N, K] a[M, K]^T
# with a column-major D (which is y row-major): CUTLASS's A is b, its B is a^T.
#   b K-major -> A row-major "t";  b N-major -> A column-major "n"
#   a K-major -> B column-major "n"; a M-major -> B row-major "t"
_SM90_LAYOUT = {"kk": "tnn", "kn": "nnn", "mn": "ntn", "mk": "ttn"}

# Tile choice for Hopper: 256x128x64, cooperative schedule (two consumer warpgroups share a tile,
# 168 registers, no spills) with a 1x2 cluster (TMA multicast of the shared operand). Of the
# cooperative configurations CUTLASS's generator offers for BF16, it was the fastest of the three
# measured on the H200 on our shapes (see the tuning candidates below and BENCHMARKS).
_SM90_TILE = (256, 128, 64)
_SM90_CLUSTER = (1, 2, 1)


def _sm90(order: str, tile=_SM90_TILE, cluster=_SM90_CLUSTER, schedule="TmaWarpSpecializedCooperative",
          variant: str = "", default: bool | None = None, out: str = "bf16") -> KernelSpec:
    return KernelSpec(
        key=f"sm90a_bf16_{order}" + (f"_{variant}" if variant else "") + ("_f32out" if out == "f32" else ""),
        arch="sm90a",
        family="bf16_alpha",
        order=order,
        tile=tile,
        cluster=cluster,
        cutlass_layout=_SM90_LAYOUT[order],
        schedule=schedule,
        # the TMA epilogue matching the mainloop's warp roles
        epilogue="TmaWarpSpecializedCooperative" if schedule.endswith("Cooperative") else "TmaWarpSpecialized",
        out=out,
        default=(order != "mk" and not variant) if default is None else default,
    )


def _sm100(tile: str, out: str = "bf16") -> KernelSpec:
    two_sm = tile == "256x256"
    return KernelSpec(
        key=f"sm100a_nvfp4_{tile}" + ("_f32out" if out == "f32" else ""),
        arch="sm100a",
        family="nvfp4",
        order="kk",
        tile=(256, 256, 256) if two_sm else (128, 128, 256),
        cluster=(2, 1, 1) if two_sm else (1, 1, 1),
        cutlass_layout="tnt",
        schedule="Nvf4TmaWarpSpecialized2SmSm100" if two_sm else "Nvf4TmaWarpSpecialized1SmSm100",
        # the builder picks the 2-SM TMA epilogue for the 2-SM tile
        epilogue="ScheduleAuto" if two_sm else "TmaWarpSpecialized1Sm",
        out=out,
    )


KERNELS: tuple[KernelSpec, ...] = (
    *(_sm90(order) for order in ("kk", "kn", "mn", "mk")),
    # Wgrad of the NVFP4 emulation: FP32 output, the same tile as the BF16 kernels.
    _sm90("kk", out="f32"),
    # Tuning candidates (never built by default): other tiles/clusters CUTLASS's generator offers
    # for the same problem; `bench/gemm.py --variants` compares them. On the H200 (2026-11-28,
    # BENCHMARKS-cutlass.md) neither beat the default beyond the run-to-run spread on the three
    # Fprop shapes, and both lost by 1-11% on two of them. (A pingpong 128x256x64 variant was
    # dropped: it spills 1928 bytes of stack per thread and ran at 43 TFLOP/s.)
    _sm90("kk", (128, 256, 64), (2, 1, 1), variant="128x256_c2x1"),
    _sm90("kk", (256, 128, 64), (2, 1, 1), variant="256x128_c2x1"),
    # Blackwell: a 2-SM 256x256 tile for the big LLM GEMMs (the largest FP4 tile CUTLASS offers;
    # 2-SM MMA halves the B traffic per SM) and a 1-SM 128x128 one for small or ragged problems
    # (a few tiles per SM keep 148 SMs busy when M*N is small).
    _sm100("256x256"),
    _sm100("128x128"),
    _sm100("256x256", out="f32"),
    _sm100("128x128", out="f32"),
)

BY_KEY = {k.key: k for k in KERNELS}


def kernels_for(arch: str, names: list[str] | None = None) -> list[KernelSpec]:
    """The kernels of ``arch`` ("sm90a", "sm100a" or "all"): the default set, or exactly ``names``.

    Raises ValueError naming the unknown arch or kernel key.
    """
    if arch != "all" and arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {ARCHS + ('all',)}")
    pool = [k for k in KERNELS if arch == "all" or k.arch == arch]
    if names is None:
        return [k for k in pool if k.default]
    unknown = [n for n in names if n not in {k.key for k in pool}]
    if unknown:
        raise ValueError(
            f"unknown kernel(s) {unknown} for arch {arch!r}; known: {[k.key for k in pool]}"
        )
    return [k for k in pool if k.key in names]
