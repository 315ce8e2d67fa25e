"""FSDP2 gathering NVFP4 weights in 4 bits (rayfp4.precision.fsdp), on gloo processes without Ray.

What a user relies on: the weight each rank's GEMMs use is bit for bit the quantization of the whole
FP32 weight (so the run is the one DDP would train), about 7x fewer bytes are all-gathered, the
checkpoints hold plain tensors that load into any layout, and a layer the gather cannot serve says
why and gathers FP32.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from rayfp4.config import RunConfig
from rayfp4.precision import PrecisionPolicy
from rayfp4.precision.fsdp import fp4_gather_obstacle
from rayfp4.precision.linear import NVFP4Linear

MODEL = {"vocab_size": 64, "seq_len": 16, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}
STEPS = 3


def _model(rank: int, seed: int, mode: str, world: int, backend: str, device: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from rayfp4.model import ModelConfig, build_model
    from rayfp4.precision import apply_precision_policy
    from rayfp4.precision.fsdp import enable_fp4_weight_gather

    torch.manual_seed(seed)
    model = build_model(ModelConfig(**MODEL)).to(device)
    summary = apply_precision_policy(model, {"format": "nvfp4", "backend": backend}, seed=seed, rank=rank)
    gather = None
    if mode == "ddp":
        model = DistributedDataParallel(model)
    else:
        if mode.startswith("fsdp-fp4"):
            gather = enable_fp4_weight_gather(model, world)
        # "-bf16": FSDP2's mixed precision, as scaling.fsdp_param_dtype=bf16 sets it
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if mode.endswith("-bf16") else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mixed)
        fully_shard(model, mp_policy=mixed)
    return model, summary, gather


def _worker(rank: int, world: int, store: str, seed: int, modes: list[str], out: dict, backend: str,
            device: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for mode in modes:  # one process group for all of them: starting processes is the slow part
        _train(rank, world, seed, mode, out, backend, device)
    dist.barrier()
    dist.destroy_process_group()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 (dim-0 sharded) DTensor, gathered through CPU copies: DTensor's
    own ``full_tensor()`` uses functional collectives, which crash with gloo on CUDA tensors in
    torch 2.11. A plain tensor (DDP) is returned as it is."""
    import torch.distributed as dist

    if not hasattr(t, "to_local"):
        return t
    local = t.to_local().detach().cpu().contiguous()
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, tuple(local.shape))
    parts = [torch.empty(sz, dtype=local.dtype) for sz in sizes]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def _train(rank: int, world: int, seed: int, mode: str, out: dict, backend: str, device: str) -> None:
    import torch.distributed as dist

    from rayfp4.formats import nvfp4
    from rayfp4.precision.fsdp import AllGatherBytes, plain_local

    model, summary, gather = _model(rank, seed, mode, world, backend, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    layers = {m.layer_name: m for m in model.modules() if isinstance(m, NVFP4Linear)}

    # The gathered operand lives in FSDP2's all-gather buffer, which is freed after the forward:
    # copy it while the layer runs.
    seen = {}

    def keep(layer, args, output):
        q = layer.capture["fprop.w"]
        seen[layer.layer_name] = (q.data.clone(), q.scale.view(torch.uint8).clone(), q.amax.clone())

    for layer in layers.values():
        layer.capture = {}
        layer.register_forward_hook(keep)

    gathered_bytes = []
    counter = AllGatherBytes().__enter__()
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, MODEL["vocab_size"], (STEPS, 4 * world, 17), generator=g).to(device)
    losses, mismatches, grads = [], [], None
    for step in range(STEPS):
        summary.runtime.set_step(step)
        if mode.startswith("fsdp-fp4"):  # the whole FP32 weights of this step, to quantize in one piece
            full = {n: _full(plain_local(layer.weight)) for n, layer in layers.items()}
        counter.take()
        mine = tokens[step, rank * 4:(rank + 1) * 4]
        loss = model(mine[:, :-1], mine[:, 1:])
        loss.backward()
        gathered_bytes.append(counter.take())
        if mode.startswith("fsdp-fp4"):
            for n, (data, scale, amax) in seen.items():
                ref = nvfp4.quantize(full[n], tile=(16, 16))  # the reference, on the same device
                if not (torch.equal(ref.data, data) and torch.equal(ref.scale.view(torch.uint8), scale)
                        and torch.equal(ref.amax, amax)):
                    mismatches.append((step, n))
        if step == 0:
            grads = {n.removeprefix("module."): _full(p.grad)
                     for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        total = loss.detach().float().cpu()  # gloo reduces CPU tensors on any torch
        dist.all_reduce(total)
        losses.append(float(total) / world)
    counter.__exit__(None, None, None)
    if rank == 0:
        out[mode] = {"losses": losses, "grads": {n: g.cpu() for n, g in grads.items()}, "mismatches": mismatches,
                     "bytes": gathered_bytes, "gather": gather.describe() if gather else None,
                     "wrapped": sum(type(getattr(p, "_local_tensor", p)).__name__ == "NVFP4ShardedWeight"
                                    for p in model.parameters())}
    dist.barrier()


def _spawn(world: int, seed: int, tmp_path, modes, backend: str = "reference", device: str = "cpu") -> dict:
    import torch.multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), seed, modes, out, backend, device), nprocs=world,
                       start_method="spawn")
    return dict(out)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fp4_gather_is_the_whole_weight_quantized_and_trains_like_ddp(world, tmp_path, _seeded):
    modes = ["ddp", "fsdp-fp32", "fsdp-fp4"] + (["fsdp-fp4-bf16"] if world == 2 else [])
    res = _spawn(world, _seeded, tmp_path, modes)
    fp4, fp32, ddp = res["fsdp-fp4"], res["fsdp-fp32"], res["ddp"]
    assert fp4["wrapped"] == 8 and fp4["gather"] == "nvfp4 for all 8 quantized layers"
    # Every layer, every step (the weights change with each optimizer step): codes, tile scales and
    # amax of the gathered weight equal quantizing the unsharded FP32 weight in one piece.
    assert fp4["mismatches"] == []
    # Gathering in 4 bits changes nothing else: the same losses and gradients as gathering FP32,
    # bit for bit, at every step.
    assert fp4["losses"] == fp32["losses"]
    for n, g in fp32["grads"].items():
        assert torch.equal(fp4["grads"][n], g), n
    # And the computation DDP does: the first forward is the same (same weights, same codes); the
    # gradients differ only by the order of the reduction over ranks (all-reduce vs reduce-scatter:
    # FP32 reassociation, hence the tolerance). Later steps start from weights that differ by that
    # much, and a few 4-bit codes near a rounding boundary flip: seen up to 1.3e-4 relative in the
    # loss on 4 ranks, so 1e-3 there.
    assert fp4["losses"][0] == ddp["losses"][0]
    for n, g in ddp["grads"].items():
        torch.testing.assert_close(fp4["grads"][n], g, rtol=1e-5, atol=1e-7, msg=n)
    for a, b in zip(fp4["losses"][1:], ddp["losses"][1:]):
        assert abs(a - b) <= 1e-3 * abs(b), (fp4["losses"], ddp["losses"])
    if world == 2:
        # Mixed precision (scaling.fsdp_param_dtype=bf16): the other parameters are gathered and
        # used in BF16, the NVFP4 layers still quantize their FP32 master weights exactly.
        mixed = res["fsdp-fp4-bf16"]
        assert mixed["mismatches"] == []
        assert all(math.isfinite(v) for v in mixed["losses"])
        assert mixed["losses"] == pytest.approx(fp4["losses"], rel=1e-2), (mixed["losses"], fp4["losses"])
        assert mixed["losses"] != fp4["losses"]  # and it did compute in BF16
        assert mixed["bytes"][-1] < fp4["bytes"][-1]  # half the bytes for the FP32 parameters
    # Bytes all-gathered per step (forward and backward gathers, the whole model).
    per_step_fp4, per_step_fp32 = fp4["bytes"][-1], fp32["bytes"][-1]
    linear = sum(o * i for o, i in [(128, 64), (64, 64), (256, 64), (64, 128)]) * MODEL["n_layers"]
    other = MODEL["vocab_size"] * MODEL["d_model"] + (2 * MODEL["n_layers"] + 1) * MODEL["d_model"]
    print(f"\nall-gathered per step on {world} ranks: FP32 {per_step_fp32} B, 4-bit {per_step_fp4} B "
          f"({per_step_fp32 / per_step_fp4:.2f}x fewer); linear weights {linear} elements, others {other}")
    # The NVFP4 layers' share: 4 bits an element and one byte per 16x16 tile instead of 32 bits.
    assert per_step_fp32 - per_step_fp4 == pytest.approx(2 * linear * (4 - 0.5 - 1 / 256), rel=0.01)


def test_layers_the_gather_cannot_serve_say_why():
    def layer(out_features=64, **policy):
        return NVFP4Linear(64, out_features, bias=False, policy=PrecisionPolicy(format="nvfp4", **policy), name="l")

    assert fp4_gather_obstacle(layer(), 4) is None
    assert "48 rows do not split into whole 16-row tiles over 2 ranks" in fp4_gather_obstacle(layer(48), 2)
    assert "weight_2d_scaling is off" in fp4_gather_obstacle(layer(weight_2d_scaling=False), 2)
    assert "late_switch" in fp4_gather_obstacle(layer(late_switch={"at_step": 5}), 2)


def test_fp4_weight_gather_needs_fsdp2():
    with pytest.raises(ValueError, match="fp4_weight_gather: only FSDP2 gathers weights"):
        RunConfig.model_validate({"precision": {"fp4_weight_gather": True}})
    RunConfig.model_validate({"precision": {"fp4_weight_gather": True}, "scaling": {"strategy": "fsdp2"}})


def _cutlass_built() -> bool:
    try:
        from rayfp4.kernels import resolve

        resolve("cutlass", torch.device("cuda"))
        return True
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cutlass"])
def test_fp4_gather_on_the_gpu_is_the_whole_weight_quantized(backend, tmp_path, _seeded):
    """Two processes sharing one GPU over gloo (NCCL refuses two ranks on one device), with a fast
    backend's quantizer on the shards: still the reference quantization of the whole weight."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "cutlass" and not _cutlass_built():
        pytest.skip("the CUTLASS kernels are not built for this GPU")
    res = _spawn(2, _seeded, tmp_path, ["fsdp-fp32", "fsdp-fp4"], backend, "cuda")
    assert res["fsdp-fp4"]["mismatches"] == [] and res["fsdp-fp4"]["wrapped"] == 8
    assert res["fsdp-fp4"]["losses"] == res["fsdp-fp32"]["losses"]


@pytest.mark.parametrize("backend,backward", [("reference", "sr"), ("triton", "sr"), ("reference", "ms_eden"),
                                              ("triton", "ms_eden")])
def test_a_layer_fed_the_gathered_weight_computes_what_it_does_with_the_fp32_weight(backend, backward):
    """The 4-bit gather without the processes: 4 row shards quantized against the whole weight's
    amax (each rank's part) and assembled (the all-gather's order) feed an NVFP4Linear, whose
    output, input gradient and weight gradient are bit for bit those of the layer quantizing its FP32
    weight itself; with the Triton backend (interpreted on the CPU) doing the shards' quantization;
    and with MS-EDEN backward, whose Dgrad requantizes the gathered weight's values."""
    from rayfp4.kernels import resolve
    from rayfp4.precision.fsdp import NVFP4GatheredWeight, assemble, quantize_shard
    from rayfp4.precision.runtime import PrecisionRuntime

    pol = PrecisionPolicy(format="nvfp4")  # the recipe's defaults: 16x16 weight tiles, SR, RHT
    if backward == "ms_eden":
        pol = PrecisionPolicy(format="nvfp4", backward_rounding="ms_eden", ms_eden_hadamard=16)
    w = torch.randn(64, 64) * 0.05
    w[5, 7] = 0.9  # one tile dominates the amax: the other shards must use it too
    x = torch.randn(40, 64).to(torch.bfloat16)
    dy = torch.randn(40, 64).to(torch.bfloat16)

    def run(gathered: bool):
        layer = NVFP4Linear(64, 64, bias=False, policy=pol, runtime=PrecisionRuntime(pol, seed=3), name="l")
        if backend == "triton":
            from rayfp4.kernels import triton_nvfp4 as T

            layer.backend = T.TritonBackend()  # the registry offers it on CUDA only
        else:
            layer.backend = resolve("reference", torch.device("cpu"))
        with torch.no_grad():
            layer.weight.copy_(w)
        if gathered:
            amax = w.abs().amax()
            parts = [quantize_shard(s, amax, layer.backend) for s in w.chunk(4)]
            q = assemble(torch.cat([c for c, _ in parts]), torch.cat([t for _, t in parts]), amax, w.dtype)
            layer.weight = torch.nn.Parameter(NVFP4GatheredWeight(q, w.dtype))
        layer.capture = {}
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy)
        return y.detach(), xi.grad, layer.weight.grad, layer.capture

    ref, got = run(False), run(True)
    for a, b in zip(ref[:3], got[:3]):
        assert torch.equal(a, b)
    assert (ref[3]["dgrad.w"].rounding == "ms_eden") == (backward == "ms_eden")
    for key in ("fprop.w", "dgrad.w"):
        a, b = ref[3][key], got[3][key]
        assert torch.equal(a.data, b.data) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
        assert torch.equal(a.amax, b.amax), key


def test_a_non_finite_weight_gathers_as_nan_output_not_an_exception():
    """A NaN in one shard: the reference quantizer would raise; the layer's output is NaN instead
    (through the amax), so the training loop skips the step as it does without FSDP2."""
    from rayfp4.kernels import resolve
    from rayfp4.precision.fsdp import NVFP4GatheredWeight, assemble, quantize_shard

    be = resolve("reference", torch.device("cpu"))
    w = torch.randn(32, 64)
    w[20, 3] = float("nan")
    amax = w.abs().amax()
    parts = [quantize_shard(s, amax, be) for s in w.chunk(2)]
    layer = NVFP4Linear(64, 32, bias=False, policy=PrecisionPolicy(format="nvfp4"), name="l")
    layer.backend = be
    layer.weight = torch.nn.Parameter(NVFP4GatheredWeight(
        assemble(torch.cat([c for c, _ in parts]), torch.cat([t for _, t in parts]), amax, w.dtype), w.dtype))
    x = torch.randn(16, 64, requires_grad=True)
    y = layer(x)
    assert torch.isnan(y).all()
    y.sum().backward()
    assert torch.isnan(x.grad).all() and torch.isnan(layer.weight.grad).all()
