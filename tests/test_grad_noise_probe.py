"""The gradient-noise probe and the automatic late switch (precision.noise_probe), on the CPU.

The training here is the worker loop's own step (``train_step``, ``micro_batch_loss``) on a
tiny.yaml-sized transformer with two micro-batches per step, with the probe wired as the loop
wires it; the resume test goes through a real checkpoint file (``save_state`` / ``load_state``).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rayfp4.model import ModelConfig, build_model
from rayfp4.precision import GradNoiseProbe, PolicyError, PrecisionPolicy, apply_precision_policy, collect_telemetry
from rayfp4.precision.noise_probe import grad_noise_ratio
from rayfp4.train.checkpoint import load_state, save_state
from rayfp4.train.loop import Progress, micro_batch_loss, train_step

ROOT = Path(__file__).resolve().parents[1]
# configs/tiny.yaml's model with 2 blocks instead of 4 (CI time); every block in 4 bits.
MODEL = ModelConfig(vocab_size=4096, seq_len=128, n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384)
SEQ, MICRO, ACCUM = 32, 2, 2
STEPS = 6


def _tokens(steps: int = STEPS) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, MODEL.vocab_size, (steps, MICRO * ACCUM, SEQ + 1), generator=g)


class _Run:
    """A model, its optimizer and probe, trained step by step as ``rayfp4.train.loop`` does."""

    def __init__(self, total_steps: int = STEPS, **policy):
        torch.manual_seed(0)
        self.model = build_model(MODEL)
        self.policy = PrecisionPolicy(format="nvfp4", backend="reference", **policy)
        self.runtime = apply_precision_policy(self.model, self.policy, seed=7, total_steps=total_steps).runtime
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.probe = GradNoiseProbe(self.policy, self.runtime, total_steps) if GradNoiseProbe.wanted(self.policy) \
            else None
        self.data = SimpleNamespace(micro=MICRO, accum=ACCUM)
        self.cfg = SimpleNamespace(optim=SimpleNamespace(grad_clip=1.0))
        self.losses, self.metrics, self.notices, self.telemetry = [], {}, [], []
        self.step = 0

    def train(self, tokens: torch.Tensor, until: int) -> "_Run":
        autocast = __import__("contextlib").nullcontext
        while self.step < until:
            step = self.step
            self.runtime.set_step(step)
            if self.probe is not None and self.probe.due(step):
                first = tokens[step][:MICRO]
                probed, notice = self.probe.measure(step, self.model,
                                                    lambda: micro_batch_loss(self.model, first, autocast))
                self.metrics[step + 1] = probed
                if notice:
                    self.notices.append(notice)
            loss, _ = train_step(self.model, self.opt, tokens[step], self.data, self.cfg, autocast, lambda x: x,
                                 self.runtime.set_micro_batch)
            self.losses.append(loss)
            self.telemetry.append(collect_telemetry(self.model))
            self.step += 1
        return self

    def checkpoint(self, directory: Path) -> None:
        progress = Progress(step=self.step, late_switch=self.probe.state_dict() if self.probe else None)
        save_state(directory, {**progress.to_state(), "rng": {"torch": torch.get_rng_state()},
                               "model": self.model.state_dict(), "optimizer": self.opt.state_dict()})

    def resume(self, directory: Path, restore_probe: bool = True) -> "_Run":
        state = load_state(directory)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        progress = Progress.from_state(state)
        self.step = progress.step
        if restore_probe:
            self.probe.load_state_dict(progress.late_switch)
        return self


# -- the probe itself --------------------------------------------------------------------------

def test_ratio_is_finite_and_positive_and_the_gradients_are_put_back():
    run = _Run()
    run.runtime.set_step(0)
    chunk = _tokens()[0][:MICRO]
    loss = lambda: micro_batch_loss(run.model, chunk, __import__("contextlib").nullcontext)  # noqa: E731
    params = list(run.model.parameters())
    assert all(p.grad is None for p in params)
    out = grad_noise_ratio(run.model, loss, run.runtime)
    assert all(p.grad is None for p in params)  # none before, none after
    assert 0 < out["grad_noise_norm"] < out["grad_norm_hp"] and 1 < out["grad_noise_ratio"] < math.inf
    assert out["grad_noise_ratio"] == pytest.approx(out["grad_norm_hp"] / out["grad_noise_norm"])

    # The reference pass is the model with every linear unquantized: its norm is that of a plain
    # gradient of the same loss, with no policy applied at all.
    torch.manual_seed(0)
    plain = build_model(MODEL)
    micro_batch_loss(plain, chunk, __import__("contextlib").nullcontext).backward()
    hp = math.sqrt(sum(float(p.grad.float().square().sum()) for p in plain.parameters()))
    assert out["grad_norm_hp"] == pytest.approx(hp, rel=1e-5)

    # Gradients already there (a probe inside accumulation) come back as the very same tensors.
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    before = [p.grad for p in params]
    again = grad_noise_ratio(run.model, loss, run.runtime)
    assert all(p.grad is b and bool((b == 0.5).all()) for p, b in zip(params, before))
    assert again == out  # the same SR bits (step 0, micro-batch 0): the same measurement


def test_identical_passes_measure_no_noise_and_an_infinite_ratio():
    """With both passes already switched to BF16 the 4-bit gradient is the BF16 one: the noise is
    exactly 0 and the ratio inf (what is logged); the probe is not even due then."""
    run = _Run(grad_noise_probe_every=1, late_switch={"at_step": 0})
    run.runtime.set_step(0)
    chunk = _tokens()[0][:MICRO]
    out = grad_noise_ratio(run.model, lambda: micro_batch_loss(run.model, chunk, __import__("contextlib").nullcontext),
                           run.runtime)
    assert out["grad_noise_norm"] == 0 and out["grad_norm_hp"] > 0 and out["grad_noise_ratio"] == math.inf
    assert not run.probe.due(0)


def test_probing_leaves_training_bit_identical():
    tokens = _tokens()
    plain = _Run(telemetry_every=2).train(tokens, STEPS)
    probed = _Run(telemetry_every=2, grad_noise_probe_every=1).train(tokens, STEPS)
    assert sorted(probed.metrics) == list(range(1, STEPS + 1))
    assert all(0 < m["grad_noise_ratio"] < math.inf for m in probed.metrics.values())
    assert probed.losses == plain.losses  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                   probed.model.state_dict().values()))
    assert probed.telemetry == plain.telemetry and any(probed.telemetry)  # the probe records none of its own
    assert not probed.notices and probed.runtime.auto_switch_step is None  # a metric, not a switch


# -- the automatic switch ----------------------------------------------------------------------

def test_auto_switch_fires_at_the_first_probe_below_the_threshold_and_equals_a_fixed_switch():
    tokens = _tokens()
    auto = _Run(late_switch={"auto": {"threshold": 1e9, "probe_every": 2, "patience": 1}})
    auto.train(tokens, 2)
    # The probe of step 2 (0-based 1) fired: from 0-based step 2 on, both passes are BF16.
    assert auto.runtime.auto_switch_step == 2 and auto.metrics[2]["late_switch_step"] == 2
    assert len(auto.notices) == 1 and "late_switch.at_step=2" in auto.notices[0]
    auto.runtime.set_step(1)
    assert not auto.runtime.forward_bf16 and not auto.runtime.backward_bf16
    auto.runtime.set_step(2)
    assert auto.runtime.forward_bf16 and auto.runtime.backward_bf16
    auto.train(tokens, STEPS)
    assert sorted(auto.metrics) == [2]  # no probes after the switch
    fixed = _Run(late_switch={"at_step": 2}).train(tokens, STEPS)
    assert auto.losses == fixed.losses  # the switch step logged is the at_step that reproduces the run


def test_scope_patience_and_min_fraction():
    tokens = _tokens()
    # Probes at 0-based steps 0..5; min_fraction 0.5 of 6 steps: those before step 3 do not count,
    # so with patience 2 the probes of steps 3 and 4 switch the backward pass from step 5 on.
    run = _Run(late_switch={"scope": "backward",
                            "auto": {"threshold": 1e9, "probe_every": 1, "patience": 2, "min_fraction": 0.5}})
    run.train(tokens, STEPS)
    assert run.runtime.auto_switch_step == 5 and [s for s, m in run.metrics.items() if "late_switch_step" in m] == [5]
    assert sorted(run.metrics) == [1, 2, 3, 4, 5]
    run.runtime.set_step(5)
    assert run.runtime.backward_bf16 and not run.runtime.forward_bf16
    # A threshold no ratio falls below never switches.
    never = _Run(late_switch={"auto": {"threshold": 1e-9, "probe_every": 2, "patience": 1}}).train(tokens, STEPS)
    assert never.runtime.auto_switch_step is None and sorted(never.metrics) == [2, 4, 6]
    assert never.probe.state_dict() == {"in_a_row": 0, "switch_step": None}


@pytest.mark.parametrize("stop", [2, 4], ids=["before-the-switch", "after-the-switch"])
def test_a_resume_across_the_switch_is_exact(tmp_path, stop):
    """Probes at every step below the threshold, patience 3: the switch fires at the probe of
    0-based step 2, so step 3 on is BF16. A checkpoint after 2 steps holds a count of 2 (the next
    probe switches); one after 4 holds the switch. Resumed from either, every loss is the same."""
    tokens = _tokens()
    settings = {"late_switch": {"auto": {"threshold": 1e9, "probe_every": 1, "patience": 3}}}
    whole = _Run(**settings).train(tokens, STEPS)
    assert whole.runtime.auto_switch_step == 3
    first = _Run(**settings).train(tokens, stop)
    first.checkpoint(tmp_path)
    assert load_state(tmp_path)["late_switch_auto"] == ({"in_a_row": 2, "switch_step": None} if stop == 2
                                                        else {"in_a_row": 3, "switch_step": 3})
    resumed = _Run(**settings).resume(tmp_path).train(tokens, STEPS)
    assert first.losses + resumed.losses[-(STEPS - stop):] == whole.losses and len(resumed.losses) == STEPS - stop
    assert resumed.runtime.auto_switch_step == 3
    # The state matters: resumed without it, the switch comes late (or never), and the losses differ.
    lost = _Run(**settings).resume(tmp_path, restore_probe=False).train(tokens, STEPS)
    assert lost.runtime.auto_switch_step != 3 and lost.losses != resumed.losses


def test_progress_carries_the_switch_and_old_checkpoints_load():
    p = Progress(step=9, late_switch={"in_a_row": 1, "switch_step": None})
    assert Progress.from_state(p.to_state()).late_switch == {"in_a_row": 1, "switch_step": None}
    assert "late_switch_auto" not in Progress(step=3).to_state()
    assert Progress.from_state(Progress(step=3).to_state()).late_switch is None


def test_eval_in_trained_precision_applies_a_fired_switch():
    from rayfp4.train import trained

    cfg = SimpleNamespace(precision=PrecisionPolicy(format="nvfp4", late_switch={"auto": {}}),
                          train=SimpleNamespace(seed=0, steps=10, dtype="fp32"))
    torch.manual_seed(0)
    model = build_model(MODEL.model_copy(update={"n_layers": 1}))
    for switch, bf16 in ((4, True), (None, False)):
        t = trained.TrainedModel(SimpleNamespace(config=cfg), model, Path("."), 10, switch)
        converted, _ = trained.in_precision(t, "trained", backend="reference")
        rt = next(m.runtime for m in converted.modules() if hasattr(m, "runtime"))
        assert rt.forward_bf16 is bf16 and rt.backward_bf16 is bf16


# -- validation --------------------------------------------------------------------------------

def test_validation_names_the_field():
    bad = [
        ({"late_switch": {"auto": {}, "at_step": 3}}, r"precision\.late_switch: give exactly one of at_step, "
                                                      r"at_fraction or auto"),
        ({"late_switch": {"scope": "both"}}, "give exactly one of at_step, at_fraction or auto"),
        ({"late_switch": {"auto": {"threshold": 0}}}, r"precision\.late_switch\.auto\.threshold: Input should be "
                                                      r"greater than 0"),
        ({"late_switch": {"auto": {"probe_every": 0}}}, r"precision\.late_switch\.auto\.probe_every"),
        ({"late_switch": {"auto": {"patience": 0}}}, r"precision\.late_switch\.auto\.patience"),
        ({"late_switch": {"auto": {"min_fraction": 1.0}}}, r"precision\.late_switch\.auto\.min_fraction"),
        ({"late_switch": {"auto": {"treshold": 2}}}, r"precision\.late_switch\.auto\.treshold"),
        ({"grad_noise_probe_every": -1}, r"precision\.grad_noise_probe_every"),
        ({"format": "bf16", "grad_noise_probe_every": 5}, "grad_noise_probe_every measures the noise of 4-bit"),
        ({"format": "bf16", "late_switch": {"auto": {}}}, "late_switch to BF16 makes no sense"),
        ({"grad_noise_probe_every": 10, "late_switch": {"auto": {"probe_every": 50}}},
         r"grad_noise_probe_every \(10\) and late_switch\.auto\.probe_every \(50\) disagree"),
        ({"oscillation_reset": {"start_step": 5}, "late_switch": {"auto": {}}}, "oscillation_reset and late_switch"),
    ]
    for data, msg in bad:
        with pytest.raises(PolicyError, match=msg):
            PrecisionPolicy.from_dict(data)
    ok = PrecisionPolicy.from_dict({"grad_noise_probe_every": 50, "late_switch": {"auto": {}, "scope": "backward"}})
    assert ok.late_switch.auto.threshold == 1.732 and ok.late_switch.auto.patience == 2
    with pytest.raises(PolicyError, match=r"late_switch\.auto: the switch step is measured"):
        ok.late_switch.first_bf16_step(100)


def test_run_config_applies_it_to_4bit_variants_refuses_fsdp2_and_keeps_old_fingerprints():
    from rayfp4.config import ConfigError, load_config

    tiny = ROOT / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["precision.grad_noise_probe_every=5", "precision.late_switch.auto.probe_every=5"])
    got = {name: c.precision for name, c in cfg.variant_configs()}
    assert got["fp32"].late_switch is None and got["fp32"].grad_noise_probe_every == 0
    assert got["nvfp4"].late_switch.auto.probe_every == 5 and got["nvfp4"].grad_noise_probe_every == 5
    for override, field in (("precision.late_switch.auto.patience=1", "precision.late_switch.auto"),
                            ("precision.grad_noise_probe_every=5", "precision.grad_noise_probe_every")):
        with pytest.raises(ConfigError, match=f"{field}: not available with scaling.strategy: fsdp2"):
            load_config(tiny, [override, "scaling.strategy=fsdp2"])
    nvfp4 = dict(cfg.variant_configs())["nvfp4"].fingerprint()
    assert "precision.late_switch.auto.threshold" in nvfp4
    assert not any(k.startswith("precision.grad_noise_probe_every") for k in nvfp4)  # a metric: not defining
    # A fixed switch fingerprints as it did before ``auto`` existed: its runs still resume.
    fixed = dict(load_config(tiny, ["precision.late_switch.at_step=5"]).variant_configs())["nvfp4"].fingerprint()
    assert not any(k.startswith("precision.late_switch.auto") for k in fixed)


def test_cli_refuses_a_bad_auto_switch_before_ray_starts(capsys):
    from rayfp4.run import main

    assert main([str(ROOT / "configs" / "tiny.yaml"), "--set", "precision.late_switch.auto.threshold=-1"]) == 2
    err = capsys.readouterr().err
    assert "precision.late_switch.auto.threshold: Input should be greater than 0" in err and "Traceback" not in err
