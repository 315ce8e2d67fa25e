"""An RMSNorm's products fused into the next projection's amax pass, under the Triton interpreter (CPU).

``triton_nvfp4.rmsnorm_amax`` computes y = (x * rstd) * weight, rounded to BF16, where the amax pass
of attention's qkv (or the MLP's gate_up) reads it; rstd is torch's own reduction. It must give the
model's RMSNorm output (cast to BF16 as the quantized layer casts its input) bit for bit, the amaxes
of the unfused pass, and a layer and a model that train exactly as without it, the norm's gradients
included (``rmsnorm_backward`` replays autograd's formulas). On a GPU machine the kernel compiles
and test_kernels_triton_gpu.py checks it against torch's CUDA kernels; this module then skips.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton compiles for the GPU in this run (test_kernels_triton_gpu.py checks the kernels); "
                "RAYFP4_TEST_INTERPRET=1 runs this module through the interpreter", allow_module_level=True)

import torch  # noqa: E402

pytest.importorskip("triton")

from fusion_checks import (POLICIES, CountCalls, assert_same_layer, assert_trained_the_same, refused_cases,  # noqa: E402
                           same_bits, tiny_model_trained)
from rayfp4.kernels import triton_nvfp4 as T  # noqa: E402
from rayfp4.model import RMSNorm  # noqa: E402


@pytest.fixture
def gen():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def residual(tokens: int, d: int, gen, dtype=torch.float32) -> torch.Tensor:
    """A residual stream [tokens, d]: rows of magnitudes 2^-60 .. 2^60 (norm outputs landing on
    subnormal and huge products with the weight), a zero row (rstd = 1/sqrt(eps)) and ties."""
    scale = torch.exp2(torch.randint(-60, 60, (tokens, 1), generator=gen).float())
    x = torch.randn(tokens, d, generator=gen) * scale
    x[1] = 0.0
    x[2, : d // 2] = 1.0  # equal values: products that tie on the BF16 grid
    return x.to(dtype)


def norm_weight(d: int, gen, dtype=torch.float32) -> torch.Tensor:
    """A norm weight with edge values: zero, negative, tiny (subnormal products), huge (overflow)."""
    w = torch.randn(d, generator=gen) * 2
    w[:6] = torch.tensor([0.0, -0.0, -1.0, 1e-38, 3e38, 1.5])
    return w.to(dtype)


def torch_norm_bf16(x, w, eps=1e-5):
    norm = RMSNorm(x.shape[-1], eps)
    with torch.no_grad():
        norm.weight.data = w
        return norm(x).to(torch.bfloat16)


F32, BF16 = torch.float32, torch.bfloat16
#: Each dtype of x and of the weight, both token counts (whole blocks, padded) and both amax kinds,
#: in four cases; the full suite runs all sixteen combinations.
_CASES = [(F32, F32, 64, True), (BF16, BF16, 40, False), (F32, BF16, 40, True), (BF16, F32, 64, False)]
_ALL = [pytest.param(x, w, t, r, marks=[] if (x, w, t, r) in _CASES else [pytest.mark.extended])
        for x in (F32, BF16) for w in (F32, BF16) for t in (64, 40) for r in (False, True)]


@pytest.mark.parametrize("xdtype, wdtype, tokens, rht", _ALL)
def test_rmsnorm_amax_is_the_norm_and_the_unfused_pass(xdtype, wdtype, tokens, rht, gen):
    """y padded with zero rows to whole blocks of tokens (as the linear layer pads x for its Wgrad
    operand), bit for bit the norm's output in BF16, and ``tensor_amax`` of its transpose from the
    same pass; a NaN anywhere gives NaN amaxes (hence NaN scales), as the unfused pass."""
    d = 96
    x, w = residual(tokens, d, gen, xdtype), norm_weight(d, gen, wdtype)
    norm = RMSNorm(d, 1e-5)
    rstd = norm.rstd(x.float()).reshape(-1)
    want = torch.nn.functional.pad(torch_norm_bf16(x, w), (0, 0, 0, -tokens % 16))
    y, amax = T.rmsnorm_amax(x, rstd, w, rht=rht)
    assert y.shape == want.shape and y.dtype == torch.bfloat16 and same_bits(y, want)
    ref = T.tensor_amax(want.t(), rht=rht)
    assert amax.dtype == torch.float32 and torch.equal(amax, ref), (amax.tolist(), ref.tolist())
    assert T.TritonBackend().rmsnorm_amaxes(x, rstd, w, rht)[2] == (ref[1] if rht else ref[0])
    # a strided x (a view of a wider tensor) reads the same values
    wide = torch.zeros(tokens, 2 * d, dtype=xdtype)
    wide[:, d:] = x
    assert same_bits(T.rmsnorm_amax(wide[:, d:], rstd, w, rht=rht)[0], want)
    x = x.clone()
    x[3, 7] = float("nan")
    assert torch.isnan(T.rmsnorm_amax(x, norm.rstd(x.float()).reshape(-1), w, rht=rht)[1][: 1 + rht]).all()


def test_rmsnorm_amax_names_what_is_wrong():
    x = torch.zeros(16, 32)
    with pytest.raises(ValueError, match="rstd must be FP32 of shape \\(16,\\)"):
        T.rmsnorm_amax(x, torch.zeros(8), torch.ones(32), rht=False)
    with pytest.raises(ValueError, match="weight must be FP32 or BF16 of shape \\(32,\\)"):
        T.rmsnorm_amax(x, torch.zeros(16), torch.ones(16), rht=False)
    with pytest.raises(ValueError, match="x must be an FP32 or BF16 matrix"):
        T.rmsnorm_amax(x.half(), torch.zeros(16), torch.ones(32), rht=False)


def _layer_run(policy, fuse, x0, w0, dy, xdtype, autocast):
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy, PrecisionRuntime

    pol = PrecisionPolicy(**POLICIES[policy])
    torch.manual_seed(0)
    layer = NVFP4Linear(x0.shape[-1], dy.shape[-1], bias=True, policy=pol, runtime=PrecisionRuntime(pol, seed=5),
                        layer_index=1)
    layer.backend = T.TritonBackend()  # the registry offers it on CUDA only
    layer.fuse_rmsnorm = fuse
    layer.capture = {}
    norm = RMSNorm(x0.shape[-1], 1e-5)
    norm.weight.data = w0.clone()
    x = x0.to(xdtype).clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert layer.fuses_rmsnorm(x, norm) == fuse
        y = layer(x, norm=norm)
    y.backward(dy)
    return y.detach(), x.grad, norm.weight.grad, layer.weight.grad, layer.bias.grad, layer.capture


@pytest.mark.parametrize("policy", [p if p == "recipe" else pytest.param(p, marks=pytest.mark.extended)
                                    for p in POLICIES])
def test_projection_with_fused_rmsnorm_equals_the_unfused_layer(policy, gen, monkeypatch):
    """NVFP4Linear(x, norm=norm) on the Triton backend (an FP32 residual under BF16 autocast, as
    training on a GPU runs): output, the gradients of x, the norm's weight, W, b and every
    quantized operand equal the layer of ``norm(x)`` computed by torch."""
    count = CountCalls(monkeypatch, T, "rmsnorm_amax")
    x0 = (torch.randn(2, 20, 48, generator=gen) * 3).float()  # 40 tokens: y^T is padded to 48
    w0 = 1 + 0.2 * torch.randn(48, generator=gen)
    dy = torch.randn(2, 20, 32, generator=gen).to(torch.bfloat16)
    plain = _layer_run(policy, False, x0, w0, dy, torch.float32, True)
    fused = _layer_run(policy, True, x0, w0, dy, torch.float32, True)
    assert count.n == 1
    assert_same_layer(plain, fused)


def test_a_bf16_residual_without_autocast_is_fused_too(gen, monkeypatch):
    """BF16 x and BF16 weight (FSDP2 with BF16 parameters casts the block's input and the norm's
    weight), no autocast: the same bits as torch, the gradients returned in BF16."""
    count = CountCalls(monkeypatch, T, "rmsnorm_amax")
    x0 = torch.randn(1, 32, 64, generator=gen) * 2
    w0 = (1 + 0.2 * torch.randn(64, generator=gen)).to(torch.bfloat16)
    dy = torch.randn(1, 32, 16, generator=gen).to(torch.bfloat16)
    plain = _layer_run("recipe", False, x0, w0, dy, torch.bfloat16, False)
    fused = _layer_run("recipe", True, x0, w0, dy, torch.bfloat16, False)
    assert count.n == 1
    assert_same_layer(plain, fused)
    assert fused[1].dtype == torch.bfloat16 and fused[2].dtype == torch.bfloat16


def test_rmsnorm_is_not_fused_where_it_would_not_be_exact(gen, monkeypatch):
    """An FP32 layer input (no autocast), MS-EDEN, MXFP4, the reference backend and no backward to
    come take the norm from torch: same results, no fused launch."""
    count = CountCalls(monkeypatch, T, "rmsnorm_amax")
    x = torch.randn(2, 16, 64, generator=gen) * 2
    norm = RMSNorm(64, 1e-5)
    for layer, grad, usable, case in refused_cases("fuse_rmsnorm", "FP32 input, no autocast"):
        autocast = usable  # without autocast the layer's input stays FP32
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert not layer.fuses_rmsnorm(x, norm), case
            assert torch.equal(layer(x, norm=norm), layer(norm(x))), case
    assert count.n == 0


@pytest.mark.extended  # CI: both fusions at once (below)
def test_a_tiny_model_trains_the_same_with_the_norms_fused(monkeypatch):
    """A one-block NVFP4 model trained two AdamW steps with and without the norms fused
    (``fusion_checks.tiny_model_trained``): the same losses and weights, bit for bit, the norms'
    weights included."""
    count = CountCalls(monkeypatch, T, "rmsnorm_amax")
    result = tiny_model_trained("fuse_rmsnorm")
    assert count.n == 2 * 2  # the block's qkv and gate_up, each step
    assert_trained_the_same(result)


def test_a_tiny_model_trains_the_same_with_both_fusions(monkeypatch):
    """Both fusions at once, as ``train.fusions: on`` sets them: the norms fused into qkv and
    gate_up and the SwiGLU product into down, two AdamW steps, the same losses and weights."""
    norms, swiglu = CountCalls(monkeypatch, T, "rmsnorm_amax"), CountCalls(monkeypatch, T, "swiglu_amax")
    result = tiny_model_trained(("fuse_rmsnorm", "fuse_swiglu"))
    assert norms.n == 2 * 2 and swiglu.n == 2  # each step: the block's qkv and gate_up; its down
    assert_trained_the_same(result)
