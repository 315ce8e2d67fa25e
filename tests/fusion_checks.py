"""What the tests of the producer fusions share (the SwiGLU product and the RMSNorm fused into the
next layer's amax pass: test_kernels_triton_swiglu.py, test_kernels_triton_rmsnorm.py, and their GPU
counterparts in test_kernels_triton_gpu.py): bit comparison, a launch counter, the policies a fused
layer is checked under, and training a model with and without a fusion."""

from __future__ import annotations

import torch

#: The policies a fused layer must reproduce: the recipe and two that change its operands.
POLICIES = {
    "recipe": {},  # SR dY, RHT Wgrad, 2-D weight tiles
    "no_rht_1d": {"rht_wgrad": False, "weight_2d_scaling": False},
    "four_over_six": {"scale_selection": "four_over_six"},
}

#: Every operand a quantized layer records (``layer.capture``).
OPERANDS = {"fprop.x", "fprop.w", "dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x"}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """BF16 tensors equal bit for bit (-0.0 too), NaN where the other is NaN (payloads aside)."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a.view(torch.int16)[~na], b.view(torch.int16)[~nb])


class CountCalls:
    """Counts the calls of ``module.name`` (a fused kernel's launcher) for one test."""

    def __init__(self, monkeypatch, module, name: str):
        self.n, self._f = 0, getattr(module, name)
        monkeypatch.setattr(module, name, self)

    def __call__(self, *a, **k):
        self.n += 1
        return self._f(*a, **k)


def refused_cases(flag: str, own_case: str) -> list:
    """``(layer, grad enabled, usable inputs, case)`` for each layer a fusion must refuse, its
    ``flag`` set (asked for: the conditions alone must refuse): first the recipe's layer given
    inputs the fusion cannot reproduce (``own_case`` says which; ``usable`` False), then, given
    usable inputs, MS-EDEN, MXFP4, the reference backend and no backward to come."""
    from rayfp4.kernels import triton_nvfp4 as T
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy
    from rayfp4.precision.linear import MXFP4Linear

    specs = [  # layer, policy, Triton backend, grad enabled, usable inputs, case
        (NVFP4Linear, {}, True, True, False, own_case),
        (NVFP4Linear, {"backward_rounding": "ms_eden", "ms_eden_hadamard": 16}, True, True, True, "MS-EDEN"),
        (MXFP4Linear, {"format": "mxfp4"}, True, True, True, "MXFP4"),
        (NVFP4Linear, {}, False, True, True, "the reference backend"),
        (NVFP4Linear, {}, True, False, True, "no backward to come"),
    ]
    out = []
    for cls, kw, triton_backend, grad, usable, case in specs:
        torch.manual_seed(0)
        layer = cls(64, 32, bias=False, policy=PrecisionPolicy(stochastic_rounding_grads=False, **kw))
        setattr(layer, flag, True)
        if triton_backend:
            layer.backend = T.TritonBackend()  # the registry offers it on CUDA only
        out.append((layer, grad, usable, case))
    return out


def assert_same_layer(plain: tuple, fused: tuple) -> None:
    """Two runs of a layer, ``(*tensors, capture)``: every tensor equal in dtype and bits, and every
    quantized operand (codes, scales, amax) the same."""
    for a, b in zip(plain[:-1], fused[:-1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert set(plain[-1]) == set(fused[-1]) == OPERANDS
    for key, q in plain[-1].items():
        g = fused[-1][key]
        assert torch.equal(g.data, q.data) and torch.equal(g.scale.view(torch.uint8), q.scale.view(torch.uint8)), key
        assert torch.equal(g.amax, q.amax), key


def train_with_and_without(flags: str | tuple[str, ...], train, build) -> dict:
    """``{False: result, True: result}``: ``train(model, runtime)`` of the model ``build()`` returns
    as ``(model, runtime)``, with every quantized layer's ``flags`` (``fuse_swiglu``,
    ``fuse_rmsnorm``) off, then on; the same seed before each build."""
    from rayfp4.precision import QuantizedLinear

    out = {}
    for fuse in (False, True):
        torch.manual_seed(0)
        model, runtime = build()
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                for flag in (flags,) if isinstance(flags, str) else flags:
                    setattr(m, flag, fuse)
        out[fuse] = train(model, runtime)
    return out


def tiny_model_trained(flags: str | tuple[str, ...]) -> dict:
    """A one-block NVFP4 model on the CPU (Triton backend through the interpreter, BF16 autocast,
    the recipe with SR and RHT) trained two AdamW steps with the fusions ``flags`` off and on:
    ``{fuse: (losses, {name: parameter})}``. One block and two steps (30 tokens a step, x^T padded
    to 32): the interpreter runs every kernel."""
    from rayfp4.kernels import triton_nvfp4 as T
    from rayfp4.model import ModelConfig, build_model
    from rayfp4.precision import QuantizedLinear, apply_precision_policy

    cfg = ModelConfig(vocab_size=64, seq_len=16, n_layers=1, d_model=32, n_heads=2, d_ff=64)
    tokens = torch.randint(0, 64, (2, 2, 16))

    def build():
        model = build_model(cfg)
        summary = apply_precision_policy(model, {"format": "nvfp4", "bf16_last_blocks": 0}, seed=3)
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.backend = T.TritonBackend()  # the registry offers it on CUDA only
        return model, summary.runtime

    def train(model, runtime):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(2):
            runtime.set_step(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(tokens[step, :, :-1], tokens[step, :, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()}

    return train_with_and_without(flags, train, build)


def assert_trained_the_same(result: dict) -> None:
    """The losses and every parameter of ``tiny_model_trained``'s two runs equal bit for bit."""
    assert torch.equal(result[False][0], result[True][0]), (result[False][0], result[True][0])
    for name, p in result[False][1].items():
        assert torch.equal(p, result[True][1][name]), name
