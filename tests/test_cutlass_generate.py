"""The CUTLASS generator picks exactly the kernels we mean (CPU; needs nvidia-cutlass)."""

from __future__ import annotations

import pytest

from cutlass_kernels import specs

cutlass_library = pytest.importorskip("cutlass_library", reason="nvidia-cutlass (the 'cutlass' extra) is not installed")

from cutlass_kernels import generate  # noqa: E402

# The full CUTLASS names pin element types, tile, cluster, layouts, alignment and schedules.
EXPECTED = {
    "sm90a_bf16_kk": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_bf16_256x128x64_1x2x1_0_tnn_align8_warpspecialized_cooperative_epi_tma",
    "sm90a_bf16_kn": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_bf16_256x128x64_1x2x1_0_nnn_align8_warpspecialized_cooperative_epi_tma",
    "sm90a_bf16_mn": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_bf16_256x128x64_1x2x1_0_ntn_align8_warpspecialized_cooperative_epi_tma",
    "sm90a_bf16_mk": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_bf16_256x128x64_1x2x1_0_ttn_align8_warpspecialized_cooperative_epi_tma",
    "sm100a_nvfp4_256x256": "cutlass3x_sm100_bstensorop_gemm_ue4m3xe2m1_ue4m3xe2m1_f32_bf16_bf16_256x256x256_2x1x1_0_tnt_align32_o_vs16_2sm",
    "sm100a_nvfp4_128x128": "cutlass3x_sm100_bstensorop_gemm_ue4m3xe2m1_ue4m3xe2m1_f32_bf16_bf16_128x128x256_1x1x1_0_tnt_align32_o_vs16_1sm",
    # Wgrad: the same kernels with an FP32 output (and a void C)
    "sm90a_bf16_kk_f32out": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_f32_256x128x64_1x2x1_0_tnn_align8_warpspecialized_cooperative_epi_tma",
    "sm100a_nvfp4_256x256_f32out": "cutlass3x_sm100_bstensorop_gemm_ue4m3xe2m1_ue4m3xe2m1_f32_void_f32_256x256x256_2x1x1_0_tnt_align32_o_vs16_2sm",
    "sm100a_nvfp4_128x128_f32out": "cutlass3x_sm100_bstensorop_gemm_ue4m3xe2m1_ue4m3xe2m1_f32_void_f32_128x128x256_1x1x1_0_tnt_align32_o_vs16_1sm",
    # tuning candidates (not built by default)
    "sm90a_bf16_kk_128x256_c2x1": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_bf16_128x256x64_2x1x1_0_tnn_align8_warpspecialized_cooperative_epi_tma",
    "sm90a_bf16_kk_256x128_c2x1": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_bf16_256x128x64_2x1x1_0_tnn_align8_warpspecialized_cooperative_epi_tma",
}


@pytest.fixture(scope="module")
def selected():
    return generate.select_all(list(specs.KERNELS))


def test_every_spec_selects_one_expected_operation(selected):
    assert set(selected) == set(EXPECTED)
    for key, op in selected.items():
        assert op.procedural_name() == EXPECTED[key], key


def test_sm90_operations_are_bf16_fp32acc_void_c_alpha_epilogue(selected):
    for key in ("sm90a_bf16_kk", "sm90a_bf16_kn", "sm90a_bf16_mn", "sm90a_bf16_kk_f32out"):
        op = selected[key]
        out = "f32" if key.endswith("_f32out") else "bf16"
        assert (op.A.element.name, op.B.element.name, op.C.element.name, op.D.element.name) == ("bf16", "bf16", "void", out)
        assert op.tile_description.math_instruction.element_accumulator.name == "f32"
        assert op.element_epilogue.name == "f32"  # alpha is FP32
        assert op.epilogue_functor.name == "LinearCombination"
        assert op.D.layout.name == "ColumnMajor"  # the transposed problem: y^T column-major == y row-major
        assert tuple(op.tile_description.tile_shape) == (256, 128, 64)
        assert tuple(op.tile_description.cluster_shape) == (1, 2, 1)
        assert op.arch == 90


@pytest.mark.parametrize(
    "order,a_layout,b_layout",
    [
        # CUTLASS's A is the user's b, CUTLASS's B is the user's a^T (see generate.py).
        ("kk", "RowMajor", "ColumnMajor"),  # b [N,K] K-major; a [M,K] K-major
        ("kn", "ColumnMajor", "ColumnMajor"),  # b = W.t(): N contiguous
        ("mn", "ColumnMajor", "RowMajor"),  # a = dy.t(): M contiguous
        ("mk", "RowMajor", "RowMajor"),
    ],
)
def test_sm90_layouts_follow_the_operand_order(selected, order, a_layout, b_layout):
    op = selected[f"sm90a_bf16_{order}"]
    assert (op.A.layout.name, op.B.layout.name) == (a_layout, b_layout)


def test_sm100_operations_are_nvfp4_block_scaled(selected):
    for key, tile, cluster, sched in (
        ("sm100a_nvfp4_256x256", (256, 256, 256), (2, 1, 1), "Nvf4TmaWarpSpecialized2SmSm100"),
        ("sm100a_nvfp4_128x128", (128, 128, 256), (1, 1, 1), "Nvf4TmaWarpSpecialized1SmSm100"),
        ("sm100a_nvfp4_256x256_f32out", (256, 256, 256), (2, 1, 1), "Nvf4TmaWarpSpecialized2SmSm100"),
        ("sm100a_nvfp4_128x128_f32out", (128, 128, 256), (1, 1, 1), "Nvf4TmaWarpSpecialized1SmSm100"),
    ):
        op = selected[key]
        out, c = ("f32", "void") if key.endswith("_f32out") else ("bf16", "bf16")
        assert op.gemm_kind.name == "BlockScaledUniversal3x"
        assert (op.A.element.name, op.B.element.name) == ("e2m1", "e2m1")
        assert (op.ScaleFactorA.name, op.ScaleFactorB.name) == ("ue4m3", "ue4m3")
        assert (op.C.element.name, op.D.element.name) == (c, out) and op.ScaleFactorD.element.name == "void"
        assert (op.A.layout.name, op.B.layout.name, op.D.layout.name) == ("RowMajor", "ColumnMajor", "RowMajor")
        assert op.A.alignment == 32  # 16 bytes of E2M1
        assert tuple(op.tile_description.tile_shape) == tile
        assert tuple(op.tile_description.cluster_shape) == cluster
        assert op.kernel_schedule.name == sched
        assert op.tile_description.math_instruction.element_accumulator.name == "f32"


def test_default_sets_are_small():
    assert [k.key for k in specs.kernels_for("sm90a")] == ["sm90a_bf16_kk", "sm90a_bf16_kn", "sm90a_bf16_mn",
                                                           "sm90a_bf16_kk_f32out"]
    assert [k.key for k in specs.kernels_for("sm100a")] == ["sm100a_nvfp4_256x256", "sm100a_nvfp4_128x128",
                                                            "sm100a_nvfp4_256x256_f32out", "sm100a_nvfp4_128x128_f32out"]
    assert len(specs.kernels_for("all")) == 8
    assert [k.key for k in specs.kernels_for("sm90a", ["sm90a_bf16_mk"])] == ["sm90a_bf16_mk"]
    with pytest.raises(ValueError, match="unknown arch"):
        specs.kernels_for("sm80")
    with pytest.raises(ValueError, match="sm100a_nvfp4_256x256"):
        specs.kernels_for("sm90a", ["sm100a_nvfp4_256x256"])


def test_emitted_source_has_kernel_and_c_entry_points(selected):
    for spec in specs.KERNELS:
        src = generate.emit_source(spec, selected[spec.key])
        name = EXPECTED[spec.key]
        assert f"struct {name} :" in src
        assert f"GemmUniversalAdapter<{name}>" in src
        for suffix in ("_run(", "_workspace_size(", "_name()"):
            assert 'RAYFP4_EXPORT' in src and f"{spec.symbol}{suffix}" in src
        assert "alpha_ptr" in src
        assert "torch" not in src and "ATen" not in src  # no torch C++ ABI in the library
        assert f"y[m, n] = {spec.out}(alpha" in src
        if spec.out == "f32":
            assert "ptr_C = nullptr" in src  # void C: no source operand to point at
        if spec.family == "bf16_alpha":
            assert "cute::make_shape(n, m, k, 1)" in src  # the transposed problem
        else:
            assert "tile_atom_to_shape_SFA" in src and "cute::make_shape(m, n, k, 1)" in src


def test_missing_match_is_a_clear_error(selected):
    bogus = specs.KernelSpec(
        key="sm90a_bf16_bogus", arch="sm90a", family="bf16_alpha", order="kk", tile=(64, 64, 64),
        cluster=(4, 4, 1), cutlass_layout="tnn", schedule="TmaWarpSpecializedCooperative",
        epilogue="TmaWarpSpecializedCooperative",
    )
    with pytest.raises(LookupError, match="0 operations matching kernel sm90a_bf16_bogus"):
        generate.select(bogus)


def test_headers_are_in_the_wheel():
    dirs = generate.cutlass_include_dirs()
    assert (dirs[0] / "cutlass" / "gemm" / "device" / "gemm_universal_adapter.h").exists()
    assert (dirs[1] / "cutlass" / "util" / "packed_stride.hpp").exists()
