"""A training step of a ~350M-parameter rayfp4.model transformer: NVFP4 (Triton backend) vs BF16.

    python -m bench.step [--batch 8] [--seq 2048] [--steps 10] [--layers 24] [--d-model 1024]
                         [--variants 4over6,4over6-fwd,mxfp4,ms_eden,ms_eden-4over6-fwd]

Both runs use FP32 master weights, AdamW and ``torch.autocast(bfloat16)``; ``bf16`` keeps every
linear as nn.Linear, ``nvfp4`` applies the default recipe policy (every block linear in NVFP4, the
LM head in BF16) with the ``triton`` backend. Prints tokens/s (median step time over ``--steps``
timed steps after 3 warm-up steps, CUDA events), the ratio NVFP4/BF16 (target >= 0.8) and the peak
memory of each. ``--variants`` also times the recipe-lab variants on the same backend:
``4over6`` (NVFP4 with ``scale_selection: four_over_six`` on every operand), ``4over6-fwd`` (on
the forward operands x and W only), ``mxfp4`` (MXFP4, Triton quantizers) and ``mxfp4-ref`` (MXFP4
quantized by the torch reference, as before), ``ms_eden`` (NVFP4 with ``backward_rounding:
ms_eden``: MS-EDEN backward operands) and ``ms_eden-4over6-fwd`` (both: the recipe lab's
combination), ``fused`` (the recipe with the SwiGLU product and the RMSNorms fused into the next
projection's amax pass, ``QuantizedLinear.fuse_swiglu`` and ``fuse_rmsnorm`` on; the ``nvfp4`` rows
leave them off, while a training run turns them on for graph-replayed steps, ``train.fusions``),
``fused-swiglu`` and ``fused-norm`` (one of them). ``--compile aot_eager|inductor`` runs every variant's forward and backward, the BF16
baseline's too, through ``torch.compile`` (``train.compile``; the 4-bit layers as custom ops);
the warm-up steps take the compilation. ``--compile graph`` captures each variant's whole eager
step (forward, backward, a capturable fused AdamW) in one CUDA graph and times its replay, with the
runtime's device seeds rewritten for each step (recipe variants only: MS-EDEN and MXFP4 draw from
CUDA generators, which capture refuses): how much taking the host out of the step buys.
``--compile reduce-overhead``: inductor with its CUDA graph trees (``torch.compile(mode=
"reduce-overhead")``), the SR keys from the device seed table as for ``graph``.
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.common import breakdown, header, in_gemm_mode, print_table, time_ms
from rayfp4.formats import mxfp4
from rayfp4.kernels.triton_nvfp4 import TritonBackend
from rayfp4.model import ModelConfig, build_model
from rayfp4.precision import QuantizedLinear, apply_precision_policy


class ReferenceMXFP4Backend(TritonBackend):
    """The Triton backend as it was before MXFP4 had Triton quantizers: the torch reference
    quantizes, the GEMM is the same (the ``mxfp4-ref`` variant: what the kernels replaced)."""

    def quantize_mxfp4(self, x, tile, rounding, rht, generator, scale_rule="ceil"):
        return mxfp4.quantize(x, tile=tile, rounding=rounding, rht=rht, generator=generator, scale_rule=scale_rule)


def run(fmt: str, cfg: ModelConfig, batch: int, steps: int, policy_extra: dict,
        backend: str = "triton", profile: dict | None = None, label: str = "",
        gemm_mode: str = "lt", compile_mode: str = "none") -> tuple[float, float]:
    """Median ms/step and peak bytes; with ``profile`` (a dict), only the kernel breakdown of one
    step is taken instead (under label) and (0, 0) returned."""
    gc.collect()  # the previous variant's model and graph: freed before this one is timed
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda")
    if fmt != "bf16":
        reference_mx = backend == "triton+reference-mxfp4"
        apply_precision_policy(model, {"format": fmt, "backend": "triton" if reference_mx else backend, **policy_extra})
        in_gemm_mode(model, gemm_mode)
        if reference_mx:
            for m in model.modules():
                if isinstance(m, QuantizedLinear):
                    m.backend = ReferenceMXFP4Backend()
    graph = compile_mode == "graph"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graph)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device="cuda")
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    if compile_mode == "reduce-overhead":  # inductor with its CUDA graph trees
        forward = torch.compile(model, backend="inductor", mode="reduce-overhead")
    else:
        forward = model if compile_mode in ("none", "graph") else torch.compile(model, backend=compile_mode)
    runtimes = list({id(m.runtime): m.runtime for m in model.modules() if isinstance(m, QuantizedLinear)}.values())
    if compile_mode in ("graph", "reduce-overhead"):
        # a CUDA generator may not be read while capturing: SR keys from the device seed table
        for rt in runtimes:
            rt.enable_device_seeds("cuda")
    count = iter(range(1, 1 << 30))

    def next_step():  # the next step's SR keys, rewritten in the device table before a replay
        n = next(count)
        for rt in runtimes:
            rt.set_step(n)

    def step():
        if compile_mode == "reduce-overhead":
            next_step()
            torch.compiler.cudagraph_mark_step_begin()
        # autocast's cache of cast weights would be captured once and go stale: off for graphs
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            loss = forward(inp, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if graph:  # warm-up on a side stream, as CUDA graph capture asks (it registers every SR key's
        # slot), then one capture
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the graph's memory is allocated while capturing
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()

        def step():  # noqa: F811 (the timed step: the next step's SR keys, then the replay)
            next_step()
            g.replay()
    for _ in range(3):  # warm-up: compiles, allocator
        step()
    torch.cuda.synchronize()
    if profile is not None:
        profile[label or fmt] = breakdown(step)
        del model, opt, forward
        torch.cuda.empty_cache()
        return 0.0, 0.0
    if not graph:
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, steps, warmup=0)
    peak = torch.cuda.max_memory_allocated()
    del model, opt, forward
    torch.cuda.empty_cache()
    return ms, peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=None, help="SwiGLU width (default: the model's ~8/3 d_model)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary (320: the recipe lab's byte-level models)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: as many as heads)")
    p.add_argument("--modes", default="lt")
    p.add_argument("--variant-mode", default="lt",
                   help="the GEMM mode of the --variants rows (rayfp4.kernels.triton_nvfp4.GEMM_MODES)")
    p.add_argument("--cutlass", action="store_true", help="also time the cutlass backend (sm_90a GEMMs)")
    p.add_argument("--ablate", action="store_true",
                   help="also time NVFP4 without SR, without RHT, with 1x16 weights")
    p.add_argument("--profile", action="store_true", help="print device time per kernel category per step")
    p.add_argument("--compile", default="none", choices=["none", "aot_eager", "inductor", "reduce-overhead", "graph"],
                   help="torch.compile every variant's step, BF16's too (as train.compile); graph: "
                        "replay each step captured in a CUDA graph (device seeds; recipe variants)")
    p.add_argument("--variants", default="", help="comma-separated: 4over6, 4over6-fwd, mxfp4, mxfp4-ref, ms_eden, "
                                                  "ms_eden-4over6-fwd, fused, fused-swiglu, fused-norm (timed after the ablations)")
    p.add_argument("--launch", help="a JSON file of Triton launch settings to use instead of the defaults "
                                    "(rayfp4.kernels.triton_nvfp4.LAUNCH entries; bench.fusion_kernels --json writes one)")
    a = p.parse_args()
    if a.launch:
        import json

        from rayfp4.kernels import triton_nvfp4

        with open(a.launch) as fh:
            triton_nvfp4.LAUNCH.update(json.load(fh))
    fwd46 = {"scale_selection": {"fprop.x": "four_over_six", "fprop.w": "four_over_six"}}
    variants = {"4over6": ("nvfp4", {"scale_selection": "four_over_six"}), "4over6-fwd": ("nvfp4", fwd46),
                "mxfp4": ("mxfp4", {}), "mxfp4-ref": ("mxfp4", {}),
                "ms_eden": ("nvfp4", {"backward_rounding": "ms_eden"}),
                "ms_eden-4over6-fwd": ("nvfp4", {"backward_rounding": "ms_eden", **fwd46}),
                "fused": ("nvfp4", {}), "fused-swiglu": ("nvfp4", {}), "fused-norm": ("nvfp4", {})}
    for name in filter(None, a.variants.split(",")):  # before anything runs
        if name not in variants:
            p.error(f"--variants: unknown variant {name!r}; expected one of {', '.join(variants)}")

    cfg = ModelConfig(vocab_size=a.vocab, seq_len=a.seq, n_layers=a.layers, d_model=a.d_model,
                      n_heads=a.d_model // 64, n_kv_heads=a.kv_heads, d_ff=a.d_ff, tie_embeddings=True)
    ntok = a.batch * a.seq
    print(header())
    print(f"# model: {cfg.num_params() / 1e6:.0f}M parameters, {a.layers} layers, d_model {a.d_model}, "
          f"d_ff {cfg.ffn_dim}; {ntok} tokens/step; torch.compile: {a.compile}"
          + (f"; launch settings from {a.launch}" if a.launch else ""))
    t_bf16, m_bf16 = run("bf16", cfg, a.batch, a.steps, {}, compile_mode=a.compile)
    print(f"{'variant':22s} {'ms/step':>8s} {'tok/s':>10s} {'x bf16':>7s} {'peak GB':>8s} {'x bf16':>7s}")
    print(f"{'bf16':22s} {t_bf16:8.1f} {ntok / t_bf16 * 1e3:10.0f} {1.0:7.2f} {m_bf16 / 2**30:8.2f} {1.0:7.2f}")
    for mode in a.modes.split(","):
        t, m = run("nvfp4", cfg, a.batch, a.steps, {}, gemm_mode=mode, compile_mode=a.compile)
        print(f"{'nvfp4[' + mode + ']':22s} {t:8.1f} {ntok / t * 1e3:10.0f} {t_bf16 / t:7.2f} {m / 2**30:8.2f} "
              f"{m / m_bf16:7.2f}")
    if a.cutlass:
        t, m = run("nvfp4", cfg, a.batch, a.steps, {}, backend="cutlass", compile_mode=a.compile)
        print(f"{'nvfp4[cutlass]':22s} {t:8.1f} {ntok / t * 1e3:10.0f} {t_bf16 / t:7.2f} {m / 2**30:8.2f} "
              f"{m / m_bf16:7.2f}")
    if a.ablate:
        backend = "cutlass" if a.cutlass else "triton"
        for label, extra in [("no SR", {"stochastic_rounding_grads": False}), ("no RHT", {"rht_wgrad": False}),
                             ("1x16 weights", {"weight_2d_scaling": False})]:
            t, m = run("nvfp4", cfg, a.batch, a.steps, extra, backend=backend, compile_mode=a.compile)
            name = f"  {label}"
            print(f"{name:22s} {t:8.1f} {ntok / t * 1e3:10.0f} {t_bf16 / t:7.2f} {m / 2**30:8.2f} {m / m_bf16:7.2f}")
    for name in filter(None, a.variants.split(",")):
        fmt, extra = variants[name]
        backend = "cutlass" if a.cutlass and fmt == "nvfp4" else "triton"
        if name == "mxfp4-ref":
            backend = "triton+reference-mxfp4"
        defaults = QuantizedLinear.fuse_swiglu, QuantizedLinear.fuse_rmsnorm
        QuantizedLinear.fuse_swiglu = name in ("fused", "fused-swiglu") or defaults[0]
        QuantizedLinear.fuse_rmsnorm = name in ("fused", "fused-norm") or defaults[1]
        try:
            t, m = run(fmt, cfg, a.batch, a.steps, extra, backend=backend, compile_mode=a.compile,
                       gemm_mode=a.variant_mode)
        finally:
            QuantizedLinear.fuse_swiglu, QuantizedLinear.fuse_rmsnorm = defaults
        label = f"{name}[{backend}]"
        print(f"{label:22s} {t:8.1f} {ntok / t * 1e3:10.0f} {t_bf16 / t:7.2f} {m / 2**30:8.2f} {m / m_bf16:7.2f}")
    # The baseline again, last: how much the machine (clocks, host state) drifted during the run.
    t, m = run("bf16", cfg, a.batch, a.steps, {}, compile_mode=a.compile)
    print(f"{'bf16, again (drift)':22s} {t:8.1f} {ntok / t * 1e3:10.0f} {t_bf16 / t:7.2f} {m / 2**30:8.2f} {m / m_bf16:7.2f}")
    if a.profile:  # after every timing: the profiler slows later launches in this process
        prof: dict = {}
        run("bf16", cfg, a.batch, a.steps, {}, profile=prof)
        for mode in a.modes.split(","):
            run("nvfp4", cfg, a.batch, a.steps, {}, profile=prof, label=f"nvfp4[{mode}]", gemm_mode=mode)
        if a.cutlass:
            run("nvfp4", cfg, a.batch, a.steps, {}, backend="cutlass", profile=prof, label="nvfp4[cutlass]")
        print_table(prof, f"one training step, {ntok} tokens")


if __name__ == "__main__":
    main()
