"""``torch.compile`` of a model with quantized linear layers (rayfp4.precision.ops).

The layers reach Dynamo as two custom ops with fake implementations, so a whole model traces as one
graph (``fullgraph=True``: no break) and trains bit for bit as in eager mode, stochastic rounding,
MS-EDEN and the Fprop/Wgrad operands included. ``aot_eager`` runs the traced graph with the eager
kernels, which is what makes the comparison exact; Inductor would also re-fuse the model's other
ops (RMSNorm, attention, SwiGLU), whose floating-point results may then differ in the last bits.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rayfp4.model import ModelConfig, build_model
from rayfp4.precision import apply_precision_policy
from rayfp4.precision.linear import QuantizedLinear

CFG = ModelConfig(vocab_size=64, seq_len=32, n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_ff=256)


def _model(policy: dict, seed: int):
    torch.manual_seed(seed)
    model = build_model(CFG)
    summary = apply_precision_policy(model, {"backend": "reference", "bf16_last_blocks": 0, **policy},
                                     total_steps=10, device=torch.device("cpu"))
    return model, summary.runtime


def _train(model, runtime, tokens, steps: int, step_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        runtime.set_step(step)
        loss = step_fn(tokens[step, :, :-1], tokens[step, :, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("policy", [{}, {"backward_rounding": "ms_eden"}, {"format": "mxfp4"},
                                    {"scale_selection": {"fprop.x": "four_over_six", "fprop.w": "four_over_six"}},
                                    {"weight_2d_scaling": False}],
                         ids=["recipe", "ms_eden", "mxfp4", "4over6-fwd", "1d-weights"])
def test_a_compiled_model_is_one_graph_and_trains_bit_for_bit_as_eager(policy):
    seed = int(torch.randint(0, 2**31, ()).item())
    tokens = torch.randint(0, CFG.vocab_size, (3, 4, CFG.seq_len + 1))
    eager, rt_e = _model(policy, seed)
    compiled, rt_c = _model(policy, seed)
    assert any(isinstance(m, QuantizedLinear) for m in compiled.modules())
    torch._dynamo.reset()
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)  # a graph break raises
    a = _train(eager, rt_e, tokens, 3, eager)
    b = _train(compiled, rt_c, tokens, 3, fn)
    assert torch.equal(a, b), (a, b)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.equal(p, q), name


def test_the_ops_find_their_own_layer_after_a_copy():
    model, rt = _model({}, 0)
    layer = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    twin = copy.deepcopy(layer)
    assert twin.op_handle != layer.op_handle
    with torch.no_grad():
        twin.weight.mul_(2.0)
    x = torch.randn(16, layer.in_features)
    rt.set_step(0)
    for m in (layer, twin):
        assert torch.equal(torch.ops.rayfp4.quantized_linear(x, m.weight, m.bias, m.op_handle), m(x))


def test_the_ops_pass_torch_library_checks():
    """Schema, fake implementations (shapes, dtypes) and the autograd registration, as
    ``torch.library.opcheck`` tests them."""
    model, rt = _model({}, 0)
    layer = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    rt.set_step(0)
    x = torch.randn(32, layer.in_features, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.rayfp4.quantized_linear.default, (x, w, None, layer.op_handle),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    dy = torch.randn(32, layer.out_features)
    torch.library.opcheck(torch.ops.rayfp4.quantized_linear_backward.default,
                          (dy, x.detach(), w.detach(), False, layer.op_handle, True, True, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_the_switch_is_validated_and_leaves_the_fingerprint_alone():
    from pathlib import Path

    from rayfp4.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="train.compile: not available with scaling.strategy: fsdp2"):
        load_config(tiny, ["train.compile=inductor", "scaling.strategy=fsdp2"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(tiny, ["train.compile=max-autotune"])
    # a run may resume with or without it (aot_eager computes what eager computes)
    assert load_config(tiny, ["train.compile=aot_eager"]).fingerprint() == load_config(tiny, []).fingerprint()


def test_a_late_switch_recompiles_once_not_every_step():
    """The compiled model reads one flag of the runtime (``all_bf16``), not the step: a late switch
    at half the run costs one more graph, and the run stays bit for bit the eager run."""
    from torch._dynamo.utils import counters

    policy = {"late_switch": {"at_fraction": 0.5}}
    tokens = torch.randint(0, CFG.vocab_size, (8, 4, CFG.seq_len + 1))
    eager, rt_e = _model(policy, 0)
    compiled, rt_c = _model(policy, 0)
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    rt_c.total_steps = rt_e.total_steps = 8
    a = _train(eager, rt_e, tokens, 8, eager)
    b = _train(compiled, rt_c, tokens, 8, fn)
    assert torch.equal(a, b), (a, b)
    assert counters["stats"]["unique_graphs"] == 2
    assert rt_c.all_bf16 and not _model(policy, 0)[1].all_bf16
