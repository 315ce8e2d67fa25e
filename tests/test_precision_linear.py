"""The quantized linear: its three GEMMs equal the recipe's construction, switch by switch."""


import pytest
import torch

from rayfp4.formats import hadamard, mxfp4, nvfp4
from rayfp4.precision import MXFP4Linear, NVFP4Linear, PolicyError, PrecisionPolicy, operand_stats
from rayfp4.precision.linear import _pad_tokens

OPERANDS = ("fprop.x", "fprop.w", "dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def make_layer(cls=NVFP4Linear, out_f=48, in_f=64, bias=False, **policy):
    fmt = "mxfp4" if cls is MXFP4Linear else "nvfp4"
    pol = PrecisionPolicy(format=fmt, **policy)
    layer = cls(in_f, out_f, bias=bias, policy=pol, name="test")
    torch.nn.init.normal_(layer.weight, 0, 0.05)
    return layer


def run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    layer.capture = {}
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.capture


def fp32_product(a, b):
    """a @ b.T of two dequantized operands in FP64, as the exact value to compare FP32 results with."""
    return a.double() @ b.double().t()


def close(got, want, dtype):
    # FP32 results differ from the exact product only by summation order and the rounding of the
    # tensor factor: a few FP32 ulps of the magnitude of the terms; BF16 outputs by one BF16 ulp.
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    scale = want.abs().max().item() or 1.0
    assert (got.double() - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [64, 40])
def test_three_gemms_equal_the_recipe_construction(dtype, tokens, gen):
    layer = make_layer(stochastic_rounding_grads=False)
    x = torch.randn(tokens, 64, generator=gen).to(dtype)
    dy = torch.randn(tokens, 48, generator=gen).to(dtype)
    y, dx, dw, cap = run(layer, x, dy)
    w = layer.weight.detach()

    xq, wq = nvfp4.quantize(x, tile=(1, 16)), nvfp4.quantize(w, tile=(16, 16))
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    close(y, fp32_product(xq.dequantize(), wq.dequantize()), dtype)
    # Dgrad: dy 1x16 along N_out times the transpose of the *same* 16x16 weight codes.
    dyq = nvfp4.quantize(dy)
    close(dx, fp32_product(dyq.dequantize(), wq.dequantize().t()), dtype)
    assert torch.equal(cap["dgrad.w"].codes(), wq.codes().t())
    # Wgrad: dy^T and x^T along tokens (zero-padded to whole tiles), both Hadamard-transformed.
    dyt = nvfp4.quantize(_pad_tokens(dy, 16).t().contiguous(), rht=True)
    xt = nvfp4.quantize(_pad_tokens(x, 16).t().contiguous(), rht=True)
    close(dw, fp32_product(dyt.dequantize(), xt.dequantize()), torch.float32)
    # And the transform cancels: dW approximates the high-precision gradient.
    exact = dy.double().t() @ x.double()
    assert ((dw.double() - exact).norm() / exact.norm()).item() < 0.3


def test_stochastic_gradients_are_the_construction_with_the_layer_streams(gen):
    layer = make_layer()
    layer.runtime.set_step(7)
    x, dy = torch.randn(32, 64, generator=gen), torch.randn(32, 48, generator=gen)
    _, dx, dw, cap = run(layer, x, dy)
    rt = layer.runtime
    dyq = nvfp4.quantize(dy, rounding="stochastic", generator=rt.generator(0, "dgrad", "cpu"))
    dyt = nvfp4.quantize(dy.t().contiguous(), rounding="stochastic", rht=True, generator=rt.generator(0, "wgrad", "cpu"))
    assert torch.equal(cap["dgrad.dy"].data, dyq.data) and torch.equal(cap["wgrad.dy"].data, dyt.data)
    wq = nvfp4.quantize(layer.weight.detach(), tile=(16, 16))
    close(dx, fp32_product(dyq.dequantize(), wq.dequantize().t()), torch.float32)
    close(dw, fp32_product(dyt.dequantize(), nvfp4.quantize(x.t().contiguous(), rht=True).dequantize()), torch.float32)


def test_sr_gradients_average_to_the_unquantized_gradient_operand(gen):
    # E[SR(dy)] = dy, so averaged over steps (fresh streams) dx -> dy @ Wq and dW -> dy^T x up to
    # the RTNE-quantized other operand; the average is much closer than any single RTNE result.
    layer = make_layer()
    x, dy = torch.randn(32, 64, generator=gen), torch.randn(32, 48, generator=gen)
    wq = nvfp4.quantize(layer.weight.detach(), tile=(16, 16)).dequantize()
    xt = nvfp4.quantize(x.t().contiguous(), rht=True).dequantize()
    target_dx = dy.double() @ wq.double()
    target_dw = hadamard.rht(dy.t().contiguous()).double() @ xt.double().t()
    n = 300
    mean_dx, mean_dw = torch.zeros_like(target_dx), torch.zeros_like(target_dw)
    for step in range(n):
        layer.runtime.set_step(step)
        _, dx, dw, _ = run(layer, x, dy)
        mean_dx += dx.double() / n
        mean_dw += dw.double() / n
    rtne = make_layer(stochastic_rounding_grads=False)
    rtne.weight.data.copy_(layer.weight.data)
    _, dx1, dw1, _ = run(rtne, x, dy)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(mean_dx, target_dx) < rel(dx1.double(), target_dx) / 4
    assert rel(mean_dw, target_dw) < rel(dw1.double(), target_dw) / 4
    # The averaged gradients also approach the BF16 (unquantized-dy) gradients of the layer.
    bf16_dx = dy.double() @ layer.weight.detach().double()
    assert rel(mean_dx, bf16_dx) < 0.2


def _operands(cap):
    def key(q):
        return (q.codes(), q.scale.view(torch.uint8), getattr(q, "amax", torch.zeros(())), q.tile, q.rht)
    return {k: key(cap[k]) for k in OPERANDS}


def _same(a, b):
    return all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(a, b))


@pytest.mark.parametrize(
    "switch,changed",
    [
        ("weight_2d_scaling", {"fprop.w", "dgrad.w"}),
        ("stochastic_rounding_grads", {"dgrad.dy", "wgrad.dy"}),
        ("rht_wgrad", {"wgrad.dy", "wgrad.x"}),
    ],
)
def test_each_switch_changes_exactly_its_operands(switch, changed, gen):
    x, dy = torch.randn(64, 64, generator=gen), torch.randn(64, 48, generator=gen)
    full = make_layer()
    ablated = make_layer(**{switch: False})
    ablated.weight.data.copy_(full.weight.data)
    a = _operands(run(full, x, dy)[3])
    b = _operands(run(ablated, x, dy)[3])
    differs = {k for k in OPERANDS if not _same(a[k], b[k])}
    assert differs == changed


def test_base_recipe_has_every_switch_off(gen):
    layer = make_layer(weight_2d_scaling=False, stochastic_rounding_grads=False, rht_wgrad=False)
    cap = run(layer, torch.randn(32, 64, generator=gen), torch.randn(32, 48, generator=gen))[3]
    assert all(cap[k].tile == (1, 16) and not cap[k].rht and cap[k].rounding == "nearest" for k in OPERANDS)
    # Without 2D scaling, Dgrad's weight is W^T quantized along N_out: not the Fprop codes.
    assert not torch.equal(cap["dgrad.w"].codes(), cap["fprop.w"].codes().t())


def test_sr_streams_differ_per_step_layer_and_rank():
    pol = PrecisionPolicy()
    from rayfp4.precision import PrecisionRuntime
    seeds = set()
    for rank in range(2):
        rt = PrecisionRuntime(pol, seed=1, rank=rank)
        for step in range(3):
            rt.set_step(step)
            for layer in range(3):
                for stream in ("dgrad", "wgrad"):
                    seeds.add(rt.sr_seed(layer, stream))
    assert len(seeds) == 2 * 3 * 3 * 2
    assert PrecisionRuntime(pol, seed=1).sr_seed(0, "dgrad") == PrecisionRuntime(pol, seed=1).sr_seed(0, "dgrad")
    assert PrecisionRuntime(pol, seed=2).sr_seed(0, "dgrad") != PrecisionRuntime(pol, seed=1).sr_seed(0, "dgrad")


def test_device_seed_table_keeps_its_slots_and_memory_and_follows_the_step():
    """Each (layer, stream) keeps one slot of one table allocated once (what a captured CUDA graph
    reads); every step and micro-batch rewrites the slots in place with the keys their generators
    would give; a slot gets its value when first asked for."""
    import copy

    from rayfp4.kernels.triton_nvfp4 import generator_seed
    from rayfp4.precision import PrecisionRuntime

    cpu = torch.device("cpu")
    rt = PrecisionRuntime(PrecisionPolicy(), seed=3, rank=1)
    assert rt.device_seeds is None
    with pytest.raises(RuntimeError, match="enable_device_seeds"):
        rt.device_seed(0, "dgrad", cpu)
    table = rt.enable_device_seeds(cpu)
    assert rt.enable_device_seeds("cpu") is table and table.dtype == torch.int64
    ptr = table.data_ptr()
    keys = [(layer, stream) for layer in (0, 1, 7) for stream in ("dgrad", "wgrad")]
    slots = {}
    seen = set()
    for step in range(3):
        rt.set_step(step)
        for mb in range(2):
            rt.set_micro_batch(mb)
            for key in keys:
                view = rt.device_seed(*key, cpu)
                assert view.shape == (1,) and view.dtype == torch.int64
                assert slots.setdefault(key, view.data_ptr()) == view.data_ptr()
                assert int(view) == generator_seed(rt.sr_seed(*key), cpu)
                seen.add(int(view))
            assert table.data_ptr() == ptr
    assert len(seen) == 3 * 2 * len(keys)  # a fresh key per step, micro-batch, layer and stream
    # A refresh alone (no lookup) updates every registered slot.
    views = [rt.device_seed(*key, cpu) for key in keys]
    rt.set_step(10)
    assert [int(v) for v in views] == [generator_seed(rt.sr_seed(*key), cpu) for key in keys]
    assert not rt.all_bf16 and rt == PrecisionRuntime(PrecisionPolicy(), seed=3, rank=1, step=10)
    twin = copy.deepcopy(rt)  # a copied model's runtime: a table of its own, the same slots
    twin.set_step(11)
    assert twin.device_seeds.data_ptr() != ptr and int(views[0]) == generator_seed(rt.sr_seed(*keys[0]), cpu)
    assert int(twin.device_seed(*keys[0], cpu)) == generator_seed(twin.sr_seed(*keys[0]), cpu)


def test_a_full_device_seed_table_raises():
    from rayfp4.precision import PrecisionRuntime

    rt = PrecisionRuntime(PrecisionPolicy())
    rt.enable_device_seeds("cpu", slots=3)
    for layer in range(3):
        rt.device_seed(layer, "dgrad", "cpu")
    rt.device_seed(0, "dgrad", "cpu")  # a registered key still works
    with pytest.raises(RuntimeError, match="table is full: all 3 slots"):
        rt.device_seed(3, "dgrad", "cpu")
    with pytest.raises(ValueError, match="already enabled on cpu"):
        rt.enable_device_seeds("meta")
    with pytest.raises(ValueError, match="table is on cpu, not meta"):
        rt.device_seed(0, "dgrad", "meta")


def test_saves_packed_operands_not_a_copy_of_x(gen):
    layer = make_layer(out_f=64, in_f=256)
    x = torch.randn(512, 256, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activation = [t for t in saved if t is not layer.weight]
    assert all(t.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float32) for t in activation)
    assert not any(t.shape == x.shape for t in activation)
    nbytes = sum(t.numel() * t.element_size() for t in activation)
    weight_q = 64 * 256 // 2 + 64 * 256 // 16 + 4
    assert nbytes - weight_q <= 0.3 * x.numel() * x.element_size()


def test_mxfp4_linear_equals_its_construction(gen):
    layer = make_layer(MXFP4Linear, out_f=64, in_f=96, stochastic_rounding_grads=False)
    x, dy = torch.randn(64, 96, generator=gen), torch.randn(64, 64, generator=gen)
    y, dx, dw, cap = run(layer, x, dy)
    wq = mxfp4.quantize(layer.weight.detach(), tile=(32, 32))
    close(y, fp32_product(mxfp4.quantize(x).dequantize(), wq.dequantize()), torch.float32)
    close(dx, fp32_product(mxfp4.quantize(dy).dequantize(), wq.dequantize().t()), torch.float32)
    dyt = mxfp4.quantize(dy.t().contiguous(), rht=True)
    close(dw, fp32_product(dyt.dequantize(), mxfp4.quantize(x.t().contiguous(), rht=True).dequantize()), torch.float32)
    assert cap["fprop.w"].tile == (32, 32)


def test_bias_and_leading_dims(gen):
    layer = make_layer(bias=True, stochastic_rounding_grads=False)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 8, 64, generator=gen, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 8, 48)
    y.sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full((48,), 16.0))
    xq = nvfp4.quantize(x.detach().reshape(16, 64))
    wq = nvfp4.quantize(layer.weight.detach(), tile=(16, 16))
    close(y.detach().reshape(16, 48), fp32_product(xq.dequantize(), wq.dequantize()) + layer.bias.detach().double(),
          torch.float32)


def test_non_finite_values_propagate_as_nan_instead_of_raising(gen):
    layer = make_layer()
    x = torch.randn(16, 64, generator=gen)
    x[3, 3] = float("inf")
    y, dx, dw, _ = run(layer, x, torch.ones(16, 48))
    assert torch.isnan(y).all() and torch.isnan(dw).all()
    y, dx, dw, _ = run(layer, torch.randn(16, 64, generator=gen), torch.full((16, 48), float("nan")))
    assert torch.isfinite(y).all() and torch.isnan(dx).all() and torch.isnan(dw).all()


def test_late_switch_forward_only(gen):
    layer = make_layer(late_switch={"at_step": 10, "scope": "forward"})
    x, dy = torch.randn(32, 64, generator=gen), torch.randn(32, 48, generator=gen)
    layer.runtime.set_step(9)
    y, _, _, cap = run(layer, x, dy)
    assert "fprop.x" in cap and "wgrad.x" in cap
    layer.runtime.set_step(10)
    y, _, _, cap = run(layer, x, dy)
    assert "fprop.x" not in cap and {"dgrad.dy", "wgrad.dy", "wgrad.x"} <= set(cap)
    assert torch.allclose(y, x @ layer.weight.detach().t(), atol=1e-5)


def test_late_switch_both_by_fraction(gen):
    layer = make_layer(late_switch={"at_fraction": 0.5})
    layer.runtime.set_step(49, total_steps=100)
    assert not layer.runtime.forward_bf16
    layer.runtime.set_step(50)
    assert layer.runtime.forward_bf16 and layer.runtime.backward_bf16
    x, dy = torch.randn(32, 64, generator=gen), torch.randn(32, 48, generator=gen)
    y, dx, dw, cap = run(layer, x, dy)
    assert cap == {}
    assert torch.allclose(dw, dy.t() @ x, atol=1e-4)
    layer.runtime.total_steps = None
    with pytest.raises(PolicyError, match="at_fraction needs the run's total number of steps"):
        layer(x)


def test_telemetry_statistics():
    # Block 0 holds the tensor amax; block 1 is so small its scale underflows; block 2 has one
    # large value and tiny ones that quantize to zero. Block 2's scale 1000 * 448 / 1e6 = 0.448
    # rounds down to the E4M3 value 0.4375, so its maximum lands at 6.14 units and saturates.
    # With a supplied amax of 1e5 block 0 saturates instead (block 2's scale 4.48 rounds up).
    x = torch.zeros(1, 48)
    x[0, 0] = 1e6
    x[0, 16:20] = 1e-6
    x[0, 32] = 1000.0
    x[0, 33:40] = 0.001
    q = nvfp4.quantize(x)
    s = operand_stats(x, q)
    assert s["scale_underflow"] == pytest.approx(1 / 3)
    assert s["zeroed"] == pytest.approx((4 + 7) / 13)
    assert q.scale[0, 2].float().item() == 0.4375 and s["saturated"] == pytest.approx(1 / 48)
    q = nvfp4.quantize(x, amax=1e5)
    assert q.scale[0, 2].float().item() == 4.5 and q.scale[0, 0].float().item() == 448
    assert operand_stats(x, q)["saturated"] == pytest.approx(1 / 48)
    x[0, 32] = 1000.0 * 0.4375 / 0.448  # now exactly representable at the top: no saturation
    assert operand_stats(x, nvfp4.quantize(x))["saturated"] == 0.0


def test_telemetry_recorded_on_its_interval(gen):
    from rayfp4.precision import collect_telemetry
    layer = make_layer(telemetry_every=5)
    x, dy = torch.randn(32, 64, generator=gen), torch.randn(32, 48, generator=gen)
    model = torch.nn.Sequential(layer)
    layer.runtime.set_step(3)
    run(layer, x, dy)
    assert collect_telemetry(model) == {}
    layer.runtime.set_step(4)  # the 5th step
    run(layer, x, dy)
    t = collect_telemetry(model)
    assert {k.split("/")[1] for k in t} == set(OPERANDS)
    assert all(0.0 <= v <= 1.0 for v in t.values()) and len(t) == 18
    assert collect_telemetry(model) == {}


def test_bad_shapes_give_clear_errors():
    with pytest.raises(PolicyError, match=r"layer proj has in_features=40, not a multiple of the nvfp4 block size 16"):
        NVFP4Linear(40, 32, policy=PrecisionPolicy(), name="proj")
    with pytest.raises(PolicyError, match=r"out_features=48, not a multiple of the mxfp4 block size 32"):
        MXFP4Linear(64, 48, policy=PrecisionPolicy(format="mxfp4"), name="proj")
    layer = make_layer()
    with pytest.raises(ValueError, match=r"input of shape \(4, 32\) does not end in in_features=64"):
        layer(torch.randn(4, 32))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_without_a_backward_to_come_the_backward_operands_are_not_quantized(fmt):
    """Eval and generation run under no_grad: the layer's output is bit for bit the training
    forward's, and the Wgrad/Dgrad operands (x^T with its RHT, the transposed weight) are skipped."""
    cls = NVFP4Linear if fmt == "nvfp4" else MXFP4Linear
    layer = cls(64, 32, bias=True, policy=PrecisionPolicy(format=fmt, backend="reference"), name="l")
    x = torch.randn(40, 64)
    layer.capture = {}
    y_train = layer(x.clone().requires_grad_(True))
    assert "wgrad.x" in layer.capture
    layer.capture = {}
    with torch.no_grad():
        y_eval = layer(x)
    assert torch.equal(y_eval, y_train.detach())
    assert set(layer.capture) == {"fprop.x", "fprop.w"}


@pytest.mark.parametrize("xdtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.bfloat16)])
def test_rmsnorm_backward_is_autograds_bit_for_bit(xdtype, wdtype, gen):
    """rmsnorm_backward (what the fused norm's backward runs) against autograd through the model's
    RMSNorm behind a residual connection, d = 48 (mean's division is not a power of two): the
    gradients of x and of the weight equal, bit for bit, with x's parts added in autograd's order."""
    from rayfp4.model import RMSNorm
    from rayfp4.precision.linear import rmsnorm_backward

    x = (torch.randn(3, 10, 48, generator=gen) * torch.exp2(torch.randint(-20, 20, (3, 10, 1), generator=gen).float()))
    x = x.to(xdtype)
    w0 = (1 + 0.3 * torch.randn(48, generator=gen)).to(wdtype)
    grad_y = torch.randn(3, 10, 48, generator=gen).to(torch.bfloat16)  # what the projection returns
    grad_res = torch.randn(3, 10, 48, generator=gen).to(xdtype)
    norm = RMSNorm(48, 1e-5)
    norm.weight.data = w0.clone()
    xa = x.clone().requires_grad_(True)
    h = xa * 1.0  # a non-leaf residual: its gradient sums the residual's and the norm's
    torch.autograd.backward([h, norm(h).to(torch.bfloat16)], [grad_res, grad_y])
    dx_prod, dx_sq, dw = rmsnorm_backward(grad_y, x, norm.rstd(x.float()), w0)
    if xdtype == torch.float32:
        dx = (grad_res + dx_prod) + dx_sq
    else:
        dx = grad_res + (dx_prod + dx_sq).to(xdtype)
    assert dx.dtype == xdtype and torch.equal(dx, xa.grad)
    assert dw.dtype == wdtype and torch.equal(dw, norm.weight.grad)
