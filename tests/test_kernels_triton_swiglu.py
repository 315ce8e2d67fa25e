"""The SwiGLU fused into the down projection's amax pass, and its backward into the gate_up
projection's dY amax pass, under the Triton interpreter (CPU).

``triton_nvfp4.swiglu_amax`` computes h = silu(gate) * up where the down projection's amax pass
reads it; ``swiglu_backward_amax`` computes the gradient of gate_up where the amax pass of the
gate_up projection's dY reads it. They must give torch's BF16 ``F.silu(gate) * up`` and autograd's
gradient of it bit for bit (every BF16 gate value is tried), the amaxes of the unfused passes, and
layers and a model that train exactly as without them.
On a GPU machine the kernel compiles (with CUDA's expf) and test_kernels_triton_gpu.py checks it
against torch's CUDA kernels; this module then skips.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton compiles for the GPU in this run (test_kernels_triton_gpu.py checks the kernels); "
                "RAYFP4_TEST_INTERPRET=1 runs this module through the interpreter", allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from fusion_checks import (POLICIES, CountCalls, assert_same_layer, assert_trained_the_same, refused_cases,  # noqa: E402
                           same_bits, tiny_model_trained)
from rayfp4.kernels import triton_nvfp4 as T  # noqa: E402

EDGES = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -3.0e38, 1.0e-38,
         -1.0e-40, 9.2e-41]


@pytest.fixture
def gen():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def gate_up(tokens: int, f: int, gen, every_gate: bool = False) -> torch.Tensor:
    """A gate_up output [tokens, 2f] in BF16: gate every BF16 bit pattern (``every_gate``) or normal
    values, up of magnitudes 2^-140 .. 2^130 (products that overflow, underflow and land on FP32
    subnormals) with the edge values mixed in."""
    if every_gate:
        assert tokens * f == 2**16
        g = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        g = g[torch.randperm(2**16, generator=gen)].view(tokens, f)
    else:
        g = (torch.randn(tokens, f, generator=gen) * 4).to(torch.bfloat16)
    scale = torch.exp2(torch.randint(-140, 130, (tokens, f), generator=gen).float())
    u = torch.randn(tokens, f, generator=gen) * scale
    pick = torch.rand(tokens, f, generator=gen) < 1 / 16
    u[pick] = torch.tensor(EDGES)[torch.randint(0, len(EDGES), (int(pick.sum()),), generator=gen)]
    return torch.cat([g, u.to(torch.bfloat16)], dim=1)


def test_silu_product_is_torchs_for_every_bf16_gate(gen):
    # The kernel's exp (numpy's here) differs from torch's in FP32 for ~2% of BF16 inputs, but
    # never after silu's rounding to BF16: every gate value is tried, NaN and infinities included.
    gu = gate_up(512, 128, gen, every_gate=True)
    gate, up = gu.chunk(2, dim=-1)  # strided views, as in the model
    h, _ = T.swiglu_amax(gate, up, rht=False)
    assert h.shape == (512, 128) and h.dtype == torch.bfloat16
    assert same_bits(h, F.silu(gate) * up)
    # up = 1: silu(gate) alone, for every gate value
    h, _ = T.swiglu_amax(gate, torch.ones_like(up), rht=False)
    assert same_bits(h, F.silu(gate))


@pytest.mark.parametrize("tokens", [64, 40])
@pytest.mark.parametrize("rht", [False, True])
def test_swiglu_amax_is_the_unfused_pass_over_the_padded_product(tokens, rht, gen):
    """h padded with zero rows to whole blocks of tokens, as the linear layer pads x for its Wgrad
    operand, and ``tensor_amax`` of its transpose (max |h|, max |RHT(h^T)|) from the same pass."""
    gate, up = gate_up(tokens, 96, gen).chunk(2, dim=-1)
    up = up.clamp(-1e30, 1e30).nan_to_num(0.0, 1.0, -1.0)  # finite amaxes
    want = F.pad(F.silu(gate) * up, (0, 0, 0, -tokens % 16))
    h, amax = T.swiglu_amax(gate, up, rht=rht)
    assert h.shape == want.shape and same_bits(h, want)
    ref = T.tensor_amax(want.t(), rht=rht)
    assert amax.dtype == torch.float32 and torch.equal(amax, ref), (amax.tolist(), ref.tolist())
    assert T.TritonBackend().swiglu_amaxes(gate, up, rht)[2] == (ref[1] if rht else ref[0])
    gate = gate.clone()
    gate[3, 7] = float("nan")  # a NaN anywhere: NaN amaxes (hence NaN scales), as the unfused pass
    assert torch.isnan(T.swiglu_amax(gate, up, rht=rht)[1][: 1 + rht]).all()


def _autograd_grad(gu: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """The gradient of gu = [gate | up] for the gradient dh of ``F.silu(gate) * up``, by autograd."""
    gu = gu.detach().clone().requires_grad_(True)
    gate, up = gu.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(dh)
    return gu.grad


def test_swiglu_backward_is_autograds_for_every_bf16_gate(gen):
    """Every BF16 gate value (NaN and infinities included) with up and dh of magnitudes from
    2^-140 to 2^130 and the edge values. Under the interpreter exp is numpy's, which differs from
    torch's in its last bit for ~5% of the gate values; there d gate's FP32 differs too and, rarely
    (about one element in a million), its BF16: those gate values are compared on the GPU
    (test_kernels_triton_gpu.py, against torch's CUDA kernels, every value), here all the others."""
    import numpy as np

    gu = gate_up(512, 128, gen, every_gate=True)
    dh = gate_up(512, 128, gen)[:, 128:]
    gate, up = gu.chunk(2, dim=-1)
    dgu, _ = T.swiglu_backward_amax(gate, up, dh, rht=False)
    want = _autograd_grad(gu, dh)
    assert dgu.shape == (512, 256) and dgu.dtype == torch.bfloat16
    g = gate.float()
    with np.errstate(over="ignore", invalid="ignore"):
        same_exp = torch.from_numpy(np.exp(-g.numpy())) == torch.exp(-g)
    assert same_exp.float().mean() > 0.9
    assert same_bits(dgu[:, :128][same_exp], want[:, :128][same_exp])
    assert same_bits(dgu[:, 128:], want[:, 128:])  # d up = dh * silu(gate): exact for every gate


@pytest.mark.parametrize("tokens", [64, 40])
@pytest.mark.parametrize("rht", [False, True])
def test_swiglu_backward_amax_is_the_unfused_pass_over_the_padded_gradient(tokens, rht, gen):
    """gate_up's gradient padded with zero rows to whole blocks of tokens, as the linear layer pads
    dY for its Wgrad operand, and ``tensor_amax`` of its transpose from the same pass."""
    gu = gate_up(tokens, 96, gen)
    gu = gu.float().clamp(-1e4, 1e4).nan_to_num(0.0).to(torch.bfloat16)  # finite amaxes
    gate, up = gu.chunk(2, dim=-1)
    dh = (torch.randn(tokens, 96, generator=gen) * 3).to(torch.bfloat16)
    want = F.pad(_autograd_grad(gu, dh), (0, 0, 0, -tokens % 16))
    dgu, amax = T.swiglu_backward_amax(gate, up, dh, rht=rht)
    assert dgu.shape == want.shape and same_bits(dgu, want)
    ref = T.tensor_amax(want.t(), rht=rht)
    assert amax.dtype == torch.float32 and torch.equal(amax, ref), (amax.tolist(), ref.tolist())
    got = T.TritonBackend().swiglu_backward_amaxes(gate, up, dh, rht)
    assert same_bits(got[0], want) and got[1] == ref[0] and got[2] == (ref[1] if rht else ref[0])
    dh = dh.clone()
    dh[3, 7] = float("nan")  # a NaN anywhere: NaN amaxes (hence NaN scales), as the unfused pass
    assert torch.isnan(T.swiglu_backward_amax(gate, up, dh, rht=rht)[1][: 1 + rht]).all()
    with pytest.raises(ValueError, match="BF16 matrices of one shape"):
        T.swiglu_backward_amax(gate, up, dh[:, :64], rht=rht)


@pytest.mark.parametrize("policy", [p if p == "recipe" else pytest.param(p, marks=pytest.mark.extended)
                                    for p in POLICIES])
def test_down_projection_with_fused_swiglu_equals_the_unfused_layer(policy, gen, monkeypatch):
    """NVFP4Linear(gu, swiglu=True) on the Triton backend: output, the gradients of gu, W, b and
    every quantized operand equal the layer of ``F.silu(gate) * up`` computed by torch."""
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy, PrecisionRuntime

    pol = PrecisionPolicy(**POLICIES[policy])
    count = CountCalls(monkeypatch, T, "swiglu_amax")
    backward = CountCalls(monkeypatch, T, "swiglu_backward_amax")
    gu0 = gate_up(40, 64, gen)  # 40 tokens: x^T is padded to 48
    gu0 = torch.where(gu0.abs() < 1e4, gu0, 1.0).to(torch.bfloat16)  # finite, a usable scale range
    dy = torch.randn(2, 20, 48, generator=gen).to(torch.bfloat16)
    out = {}
    for fuse in (False, True):
        torch.manual_seed(0)
        layer = NVFP4Linear(64, 48, bias=True, policy=pol, runtime=PrecisionRuntime(pol, seed=5), layer_index=1)
        layer.backend = T.TritonBackend()  # the registry offers it on CUDA only
        layer.fuse_swiglu = fuse
        layer.capture = {}
        gu = gu0.view(2, 20, 128).clone().requires_grad_(True)
        y = layer(gu, swiglu=True)
        y.backward(dy)
        out[fuse] = (y.detach(), gu.grad, layer.weight.grad, layer.bias.grad, layer.capture)
        assert count.n == backward.n == int(fuse)
    assert_same_layer(out[False], out[True])


@pytest.mark.parametrize("policy", [p if p == "recipe" else pytest.param(p, marks=pytest.mark.extended)
                                    for p in POLICIES])
def test_gate_up_projection_takes_its_dy_amaxes_from_the_fused_backward(policy, gen, monkeypatch):
    """gate_up and down NVFP4 projections (the MLP of a block, 40 tokens: dY padded to 48): with
    the fusion, the gate_up projection's backward takes its dY and both amaxes from the SwiGLU's
    fused backward instead of its own amax pass, and every output, gradient and quantized operand
    of both layers is the same as without it."""
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy, PrecisionRuntime
    from rayfp4.precision.linear import QuantizedLinear

    pol = PrecisionPolicy(**POLICIES[policy])
    taken = []
    take = QuantizedLinear.take_dy
    monkeypatch.setattr(QuantizedLinear, "take_dy", lambda self, dy: taken.append(take(self, dy)) or taken[-1])
    amax_passes = CountCalls(monkeypatch, T, "tensor_amax")
    x0 = (torch.randn(40, 64, generator=gen) * 2).to(torch.bfloat16)
    dy = torch.randn(40, 48, generator=gen).to(torch.bfloat16)
    out, passes = {}, {}
    for fuse in (False, True):
        torch.manual_seed(0)
        rt = PrecisionRuntime(pol, seed=5)
        up_proj = NVFP4Linear(64, 128, bias=False, policy=pol, runtime=rt, layer_index=0)
        down = NVFP4Linear(64, 48, bias=False, policy=pol, runtime=rt, layer_index=1)
        for layer in (up_proj, down):
            layer.backend = T.TritonBackend()  # the registry offers it on CUDA only
            layer.capture = {}
        down.fuse_swiglu = fuse
        x = x0.clone().requires_grad_(True)
        taken.clear()
        amax_passes.n = 0
        y = down(up_proj(x), swiglu=True, producer=up_proj)
        y.backward(dy)
        passes[fuse] = amax_passes.n
        assert sum(t is not None for t in taken) == int(fuse) and len(taken) == 2
        out[fuse] = [(y.detach(), x.grad, up_proj.weight.grad, up_proj.capture),
                     (y.detach(), x.grad, down.weight.grad, down.capture)]
    for plain, fused in zip(out[False], out[True]):
        assert_same_layer(plain, fused)
    assert passes[True] == passes[False] - 2  # the down layer's x and the gate_up layer's dY


def test_swiglu_is_not_fused_where_it_would_not_be_exact(gen, monkeypatch):
    """FP32 activations (the kernel matches torch's silu only after the rounding to BF16), MS-EDEN,
    MXFP4, the reference backend and no backward to come take the product from torch: same results,
    no fused launch."""
    count = CountCalls(monkeypatch, T, "swiglu_amax")
    gu = torch.randn(32, 128, generator=gen) * 2
    for layer, grad, usable, case in refused_cases("fuse_swiglu", "FP32 activations"):
        dtype = torch.bfloat16 if usable else torch.float32
        with torch.set_grad_enabled(grad):
            g, u = gu.to(dtype).chunk(2, dim=-1)
            assert not layer.fuses_swiglu(gu.to(dtype)), case
            assert torch.equal(layer(gu.to(dtype), swiglu=True), layer(F.silu(g) * u)), case
    assert count.n == 0
    with pytest.raises(ValueError, match=r"does not end in 2 \* in_features=128"):
        layer(gu[:, :96], swiglu=True)


@pytest.mark.extended  # CI: both fusions at once (test_kernels_triton_rmsnorm.py)
def test_a_tiny_model_trains_the_same_with_the_swiglu_fused(monkeypatch):
    """A one-block NVFP4 model trained two AdamW steps with and without the fusion
    (``fusion_checks.tiny_model_trained``): the same losses and weights, bit for bit (the second
    step on updated weights)."""
    count = CountCalls(monkeypatch, T, "swiglu_amax")
    backward = CountCalls(monkeypatch, T, "swiglu_backward_amax")
    result = tiny_model_trained("fuse_swiglu")
    assert count.n == backward.n == 2  # the block's down projection, each step
    assert_trained_the_same(result)
