"""The precision policy: defaults, YAML, validation messages, and applying it to a model."""

import pytest

from rayfp4.model import ModelConfig, build_model
from rayfp4.precision import NVFP4Linear, PolicyError, PrecisionPolicy, apply_precision_policy

TINY = ModelConfig(vocab_size=128, seq_len=32, n_layers=4, d_model=64, n_heads=4)


def test_defaults_per_format():
    p = PrecisionPolicy()
    assert p.format == "nvfp4" and p.rht_wgrad and p.stochastic_rounding_grads and p.weight_2d_scaling
    assert p.weight_tile == (16, 16) and p.block == 16
    m = PrecisionPolicy(format="mxfp4", weight_2d_scaling=False)
    assert m.weight_tile == (1, 32) and m.rht_wgrad
    b = PrecisionPolicy(format="bf16")
    assert not (b.rht_wgrad or b.stochastic_rounding_grads or b.weight_2d_scaling)


def test_yaml_standalone_and_inside_a_run_config(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("format: nvfp4\nrht_wgrad: false\nbf16_last_blocks: 2\nlate_switch: {at_fraction: 0.82}\n")
    p = PrecisionPolicy.from_yaml(f)
    assert not p.rht_wgrad and p.bf16_last_blocks == 2 and p.late_switch.at_fraction == 0.82
    assert p.late_switch.scope == "both"
    g = tmp_path / "run.yaml"
    g.write_text("model: {n_layers: 2}\nprecision:\n  format: mxfp4\n")
    assert PrecisionPolicy.from_yaml(g).format == "mxfp4"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"late_switch": {"at_fraction": 1.5}}, r"precision\.late_switch: at_fraction must be in \(0, 1\], got 1.5"),
        ({"late_switch": {"at_fraction": 0.0}}, r"at_fraction must be in \(0, 1\], got 0.0"),
        ({"late_switch": {"at_step": 5, "at_fraction": 0.5}}, r"precision\.late_switch: give exactly one"),
        ({"late_switch": {"at_step": 5, "scope": "sideways"}}, r"precision\.late_switch\.scope: Input should be"),
        ({"format": "bf16", "rht_wgrad": True}, r"precision: rht_wgrad only apply to 4-bit formats"),
        ({"format": "bf16", "late_switch": {"at_step": 3}}, r"late_switch to BF16 makes no sense"),
        ({"format": "fp4"}, r"precision\.format: Input should be 'bf16', 'nvfp4' or 'mxfp4'"),
        ({"bf16_last_blocks": -1}, r"precision\.bf16_last_blocks: Input should be greater than or equal to 0"),
        ({"stochastic_rounding": True}, r"precision\.stochastic_rounding: unknown key"),
        ({"backend": "cuda"}, r"precision\.backend: Input should be"),
        ({"block_pattern": "layers"}, r"precision\.block_pattern: needs a capturing group"),
    ],
)
def test_bad_policies_name_the_field(data, message):
    with pytest.raises(PolicyError, match=message):
        PrecisionPolicy.from_dict(data)


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("format: [nvfp4\n")
    with pytest.raises(PolicyError, match=r"p\.yaml: not valid YAML"):
        PrecisionPolicy.from_yaml(f)
    f.write_text("late_switch: {at_fraction: 2}\n")
    with pytest.raises(PolicyError, match=r"p\.yaml:\nprecision\.late_switch: at_fraction"):
        PrecisionPolicy.from_yaml(f)
    with pytest.raises(PolicyError, match="no such policy file"):
        PrecisionPolicy.from_yaml(tmp_path / "missing.yaml")


def test_apply_block_and_glob_rules():
    model = build_model(TINY)
    s = apply_precision_policy(model, {"bf16_first_blocks": 1, "bf16_last_blocks": 1, "bf16_modules": ["*.mlp.down"]})
    decided = {d.name: d.precision for d in s.layers}
    assert decided["lm_head"] == "bf16"
    for i in range(4):
        for lin in ("attn.qkv", "attn.proj", "mlp.gate_up"):
            want = "bf16" if i in (0, 3) else "nvfp4"
            assert decided[f"layers.{i}.{lin}"] == want
            assert isinstance(model.get_submodule(f"layers.{i}.{lin}"), NVFP4Linear) == (want == "nvfp4")
        assert decided[f"layers.{i}.mlp.down"] == "bf16"
    assert len(s.quantized) == 6 and "bf16_modules '*.mlp.down'" in s.table()
    assert 0 < s.quantized_fraction() < 1
    assert s.to_params()["precision.summary.quantized_layers"] == "6"
    # Parameters are shared, not copied: an optimizer built before or after sees the same tensors.
    assert model.layers[1].attn.qkv.weight is dict(model.named_parameters())["layers.1.attn.qkv.weight"]


def test_apply_bf16_format_changes_nothing():
    model = build_model(TINY)
    s = apply_precision_policy(model, PrecisionPolicy(format="bf16"))
    assert s.quantized == [] and not any(isinstance(m, NVFP4Linear) for m in model.modules())


@pytest.mark.parametrize(
    "policy,message",
    [
        ({"bf16_last_blocks": 5}, r"precision\.bf16_last_blocks: 5 is more than the model's 4 transformer blocks"),
        ({"bf16_modules": ["decoder.*"]}, r"precision\.bf16_modules: 'decoder\.\*' matches no linear layer"),
        ({"backend": "triton"}, r"precision\.backend: backend .triton. cannot run on cpu: no CUDA device"),
        ({"backend": "cutlass"}, r"precision\.backend: backend .cutlass. "),
        ({"bf16_first_blocks": 1, "block_pattern": r"blocks\.(\d+)\."}, r"precision\.bf16_first_blocks: no linear"),
    ],
)
def test_policy_that_does_not_fit_the_model(policy, message):
    with pytest.raises(PolicyError, match=message):
        apply_precision_policy(build_model(TINY), policy)


def test_layer_dims_not_multiple_of_the_block():
    cfg = ModelConfig(vocab_size=128, seq_len=32, n_layers=2, d_model=48, n_heads=4, d_ff=100)
    with pytest.raises(PolicyError, match=r"layers\.0\.mlp\.gate_up has out_features=200, not a multiple of the nvfp4 block size 16"):
        apply_precision_policy(build_model(cfg), {})
    # Keeping the offending layers in BF16 is the documented way out.
    s = apply_precision_policy(build_model(cfg), {"bf16_modules": ["*.mlp.*"]})
    assert len(s.quantized) == 4
    with pytest.raises(PolicyError, match=r"in_features=48, not a multiple of the mxfp4 block size 32"):
        apply_precision_policy(build_model(cfg), {"format": "mxfp4", "bf16_modules": ["*.mlp.*"]})
