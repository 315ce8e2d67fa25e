"""precision.oscillation_reset: detection, reset, schedule, checkpoint state, validation (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayfp4.precision import NVFP4Linear, OscillationReset, OscillationTracker, PolicyError, PrecisionPolicy
from rayfp4.precision.linear import MXFP4Linear

ROOT = Path(__file__).resolve().parents[1]


def _model(fmt="nvfp4", seed=0, **policy):
    torch.manual_seed(seed)
    pol = PrecisionPolicy(format=fmt, backend="reference", **policy)
    cls = NVFP4Linear if fmt == "nvfp4" else MXFP4Linear
    return torch.nn.Sequential(cls(64, 32, bias=False, policy=pol), cls(64, 64, bias=False, policy=pol))


def _settings(**kw):
    return OscillationReset(**{"start_step": 2, "period": 6, "window": 3, "threshold": 8.0, **kw})


def _edge_and_step(layer):
    """An element (0, 0) between two bins, the edge between them and half their distance: found from
    the layer's own quantization by moving the element until its quantized value changes."""
    tracker = OscillationTracker(torch.nn.Sequential(layer), _settings(), 100)
    w = layer.weight.detach()
    q0 = tracker.quantized_values(layer)[0, 0].item()
    lo, hi = w[0, 0].item(), w[0, 0].item() + 0.5 * w.abs().max().item()
    w[0, 0] = hi
    assert tracker.quantized_values(layer)[0, 0].item() != q0
    for _ in range(60):  # bisect the edge
        mid = (lo + hi) / 2
        w[0, 0] = mid
        (lo, hi) = (mid, hi) if tracker.quantized_values(layer)[0, 0].item() == q0 else (lo, mid)
    return lo, hi


@torch.no_grad()
def test_an_oscillating_element_is_reset_to_its_quantized_value_and_nothing_else_moves():
    model = _model()
    layer = model[0]
    lo, hi = _edge_and_step(layer)
    tiny = (hi - lo) * 4 + 1e-7  # the element hops across the edge by a tiny amount each update
    w = layer.weight.detach()
    w[0, 0] = lo
    steady = w[1, 1].item()
    tracker = OscillationTracker(model, _settings(start_step=1, period=10, window=4), 100)
    assert tracker.after_update(1) == {} and tracker.window_open  # the window opens
    for step in range(2, 6):
        w[0, 0] = hi + tiny if step % 2 == 0 else lo - tiny  # oscillates across the edge
        w[1, 1] = steady + 0.01 * (step - 1)  # moves steadily, far
        before = [m.weight.detach().clone() for m in model]
        out = tracker.after_update(step)
    assert out["oscillation_reset_count"] >= 1 and 0 < out["oscillation_reset_fraction"] < 0.01
    q = tracker.quantized_values(layer)
    after = layer.weight.detach()
    assert after[0, 0] == q[0, 0]  # put on its bin's value
    assert after[1, 1] == before[0][1, 1]  # moved steadily: not reset
    changed = (after != before[0]).nonzero().tolist()
    assert [0, 0] in changed
    for i, j in changed:  # whatever else was reset sits exactly on its quantized value
        assert after[i, j] == q[i, j]
    assert torch.equal(model[1].weight, before[1])  # a layer that did not move is left alone
    assert not tracker.window_open


@torch.no_grad()
def test_no_reset_without_oscillation_or_below_the_threshold():
    model = _model()
    tracker = OscillationTracker(model, _settings(start_step=1, period=10, window=3, threshold=1e9), 100)
    g = torch.Generator().manual_seed(1)
    ref = None
    for step in range(1, 5):
        for m in model:
            m.weight.add_(torch.randn(m.weight.shape, generator=g) * 1e-3)
        ref = [m.weight.clone() for m in model]
        out = tracker.after_update(step)
    assert out == {"oscillation_reset_fraction": 0.0, "oscillation_reset_count": 0.0}
    assert all(torch.equal(m.weight, r) for m, r in zip(model, ref))


def test_schedule_opens_measures_and_resets_at_the_right_updates():
    model = _model()
    tracker = OscillationTracker(model, _settings(start_step=4, period=6, window=2), 100)
    seen = {}
    for step in range(1, 20):
        with torch.no_grad():
            for m in model:
                m.weight.mul_(1.0001)
        out = tracker.after_update(step)
        seen[step] = (tracker.window_open, bool(out))
    opened = [s for s, (open_, _) in seen.items() if open_]
    resets = [s for s, (_, r) in seen.items() if r]
    assert opened == [4, 5, 10, 11, 16, 17] and resets == [6, 12, 18]
    assert OscillationReset(start_fraction=0.6).first_step(1000) == 600


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@torch.no_grad()
def test_a_window_saved_midway_resumes_exactly(fmt):
    """Two trackers: one runs through; the other is rebuilt from the state saved mid-window (as a
    checkpoint does) on a copy of the weights. Every weight and metric is the same, bit for bit."""
    def updates(model, step):
        g = torch.Generator().manual_seed(step)
        for m in model:  # small random updates, with signs flipping: some elements oscillate
            m.weight.add_(torch.randn(m.weight.shape, generator=g) * 2e-3 * (-1) ** step)

    a = _model(fmt)
    ta = OscillationTracker(a, _settings(start_step=1, period=8, window=5, threshold=2.0), 100)
    outs_a = []
    for step in range(1, 4):
        updates(a, step)
        outs_a.append(ta.after_update(step))
    state = ta.state_dict()
    assert state is not None and set(state) == {"prev", "dist_q", "dist_w"}
    b = _model(fmt, seed=5)  # other weights, then the checkpoint's
    b.load_state_dict(a.state_dict())
    tb = OscillationTracker(b, _settings(start_step=1, period=8, window=5, threshold=2.0), 100)
    tb.load_state_dict({k: {n: t.clone() for n, t in v.items()} for k, v in state.items()})
    outs_b = list(outs_a)
    for step in range(4, 12):
        updates(a, step)
        updates(b, step)
        outs_a.append(ta.after_update(step))
        outs_b.append(tb.after_update(step))
        assert all(torch.equal(x.weight, y.weight) for x, y in zip(a, b)), step
    assert outs_a == outs_b and outs_a[5]["oscillation_reset_count"] > 0  # the reset at update 6 did act
    tb.load_state_dict(None)
    assert not tb.window_open and tb.state_dict() is None


def test_progress_carries_the_window_through_a_checkpoint_state():
    from rayfp4.train.loop import Progress

    p = Progress(step=7, oscillation={"prev": {"0": torch.ones(2)}, "dist_q": {}, "dist_w": {}})
    back = Progress.from_state(p.to_state())
    assert back.step == 7 and torch.equal(back.oscillation["prev"]["0"], torch.ones(2))
    assert "oscillation_reset" not in Progress(step=3).to_state()  # nothing saved without a window
    assert Progress.from_state(Progress(step=3).to_state()).oscillation is None


def test_validation_names_the_field():
    bad = [
        ({"oscillation_reset": {}}, "oscillation_reset: give exactly one of start_step or start_fraction"),
        ({"oscillation_reset": {"start_fraction": 1.0}}, r"start_fraction must be in \(0, 1\)"),
        ({"oscillation_reset": {"start_step": 5, "period": 10, "window": 10}}, r"window \(10\) must be less"),
        ({"oscillation_reset": {"start_step": 5, "threshold": 0}}, r"oscillation_reset\.threshold"),
        ({"format": "bf16", "oscillation_reset": {"start_step": 5}}, "format=bf16 has none"),
        ({"oscillation_reset": {"start_step": 5}, "late_switch": {"at_step": 9}}, "oscillation_reset and late_switch"),
    ]
    for data, msg in bad:
        with pytest.raises(PolicyError, match=msg):
            PrecisionPolicy.from_dict(data)


def test_run_config_applies_it_to_4bit_variants_and_refuses_fsdp2():
    from rayfp4.config import ConfigError, load_config

    tiny = ROOT / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["precision.oscillation_reset.start_fraction=0.5"])
    got = {name: c.precision.oscillation_reset for name, c in cfg.variant_configs()}
    assert got["fp32"] is None and got["nvfp4"].start_fraction == 0.5
    with pytest.raises(ConfigError, match="oscillation_reset: not available with scaling.strategy: fsdp2"):
        load_config(tiny, ["precision.oscillation_reset.start_step=3", "scaling.strategy=fsdp2"])
    # runs fingerprinted before the switch existed still resume: it is left out at its default
    assert "precision.oscillation_reset" not in load_config(tiny, []).fingerprint()
    assert "precision.oscillation_reset.start_fraction" in dict(cfg.variant_configs())["nvfp4"].fingerprint()
