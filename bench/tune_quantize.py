"""Launch-parameter sweep of the Triton NVFP4 kernels on one GPU, bit-exactness checked per candidate.

    git show 3ac68a6:rayfp4/kernels/_triton_nvfp4_kernels.py > bench/_old_kernels.py  # not tracked
    python bench/tune_quantize.py [--tokens 16384] [--features 4096] [--old bench/_old_kernels.py]

For each kernel (the cases of bench/quantize.py): the kernel as it was before this tuning ("old",
the device code in ``--old`` -- e.g. ``git show <rev>:rayfp4/kernels/_triton_nvfp4_kernels.py`` --
with its old launch parameters) and a list of candidates of the current device code (tile,
num_warps, packing variant). Every candidate's output bytes are compared with the old kernel's;
its median time (triton.testing.do_bench) is reported as GB/s and as a ratio to a copy of the
same bytes, timed in the same process. The last lines give the fastest bit-identical candidate per
kernel as a LAUNCH table for rayfp4/kernels/triton_nvfp4.py.

Before the timings, the new E2M1 encoders and the dequantizer are compared with the old ones on
every one of the 2^32 FP32 bit patterns (``--no-exhaustive`` skips it). Candidates are compiled in
parallel worker processes first (``--jobs``), so the sweep is mostly timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rayfp4.kernels import _triton_nvfp4_kernels as K  # noqa: E402
from rayfp4.kernels import triton_nvfp4 as T  # noqa: E402

OLD_CFG = {  # the launch parameters before this tuning (commit 3ac68a6)
    "amax": dict(BM=32, BK=256, num_warps=4),
    "amax_rht": dict(BM=64, G=4, num_warps=4),
    "rows": dict(BM=32, G=8, num_warps=4),
    "rows_sr": dict(BM=32, G=8, num_warps=4),
    "rows_tile": dict(BM=16, G=16, num_warps=4),
    "groups": dict(BM=64, G=4, num_warps=4),
    "groups_rht": dict(BM=64, G=4, num_warps=4),
    "groups_rht_sr": dict(BM=64, G=4, num_warps=4),
    "dequant": dict(BM=32, G=8, num_warps=4),
}
GROUP_TILES = [(64, 4, 4), (128, 4, 4), (64, 8, 4), (128, 8, 8), (64, 16, 8), (256, 4, 8), (128, 8, 4),
               (64, 16, 4), (256, 8, 8), (32, 16, 4)]
ROW_TILES = [(32, 8, 4), (16, 8, 4), (32, 16, 8), (64, 8, 8), (16, 16, 4), (64, 4, 4), (32, 8, 2)]


def candidates(key):
    """Stage 1 (variants at the old tile) and stage 2 (tiles, with the best stage-1 variant)."""
    if key == "amax":
        return [dict(BM=bm, BK=bk, num_warps=w) for bm, bk, w in
                [(32, 256, 4), (64, 256, 8), (16, 512, 4), (32, 512, 8), (64, 128, 4)]], []
    if key == "amax_rht":
        return [dict(BM=bm, G=g, num_warps=w) for bm, g, w in GROUP_TILES], []
    if key == "dequant":
        return [dict(BM=bm, G=g, num_warps=w) for bm, g, w in [(32, 8, 4), (64, 8, 8), (32, 16, 8), (16, 16, 4)]], []
    if key.startswith("groups"):
        return [dict(BM=64, G=4, num_warps=4)], GROUP_TILES
    if key == "rows_tile":
        return ([dict(BM=16, G=16, num_warps=4, PACK=p, RAND=0) for p in (0, 1, 2)],
                [(32, 8, 4), (32, 16, 8), (64, 8, 8), (16, 32, 8), (64, 16, 8), (16, 8, 4)])
    if key == "rows_sr":
        return ([dict(BM=32, G=8, num_warps=4, PACK=p, RAND=r) for p, r in [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]],
                ROW_TILES)
    return [dict(BM=32, G=8, num_warps=4, PACK=p, RAND=0) for p in (0, 1, 2)], ROW_TILES


def load_old(path):
    spec = importlib.util.spec_from_file_location("_old_nvfp4_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Bench:
    """Inputs, outputs and one launcher per kernel key: run(key, cfg, old=False) -> outputs."""

    def __init__(self, t, f, dev, old_mod):
        self.t, self.f, self.dev, self.O = t, f, dev, old_mod
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = (torch.randn(t, f, generator=g) * torch.rand(t, 1, generator=g) * 4).to(torch.bfloat16).to(dev)
        self.w = (torch.randn(f, f, generator=g) * 0.02).to(dev)
        self.xt = self.x.t()
        self.am = T.tensor_amax(self.x)[0:1].clone()
        self.am_rht = T.tensor_amax(self.xt, rht=True)[1:2].clone()
        self.am_w = T.tensor_amax(self.w)[0:1].clone()
        xb, xq = self.x.numel() * 2, self.x.numel() // 2 + self.x.numel() // 16
        wb, wq = self.w.numel() * 4, self.w.numel() // 2 + self.w.numel() // 16
        self.nbytes = {"amax": xb, "amax_rht": xb, "rows": 2 * xb + xq, "rows_sr": 2 * xb + xq,
                       "rows_tile": wb + 2 * wq + self.w.numel() * 2, "groups": xb + xq, "groups_rht": xb + xq,
                       "groups_rht_sr": xb + xq, "dequant": xq + xb}
        q = T.quantize_nvfp4(self.x)
        self.q_words = q.data.view(torch.int64).view(t, f // 16).clone()
        self.q_scale = q.scale.view(torch.uint8).clone()
        e = lambda *s, d: torch.empty(*s, dtype=d, device=dev)  # noqa: E731
        self.buf = dict(words=e(t, f // 16, d=torch.int64), scale=e(t, f // 16, d=torch.uint8),
                        deq=e(t, f, d=torch.bfloat16), wt_words=e(f, t // 16, d=torch.int64),
                        wt_scale=e(f, t // 16, d=torch.uint8), ww=e(f, f // 16, d=torch.int64),
                        ws=e(f, f // 16, d=torch.uint8), wd=e(f, f, d=torch.bfloat16),
                        wtw=e(f, f // 16, d=torch.int64), wts=e(f, f // 16, d=torch.uint8),
                        amax=e(2, d=torch.int32))

    def launcher(self, key, cfg, old=False):
        b, x, xt, t, f = self.buf, self.x, self.xt, self.t, self.f
        kern = self.O if old else K
        cfg = dict(cfg)
        if key == "amax":
            def fn():
                b["amax"].zero_()
                kern.amax_kernel[(triton.cdiv(t, cfg["BM"]), triton.cdiv(f, cfg["BK"]))](
                    x, b["amax"], t, f, f, 1, **cfg)
            return fn, lambda: [b["amax"]]
        if key == "amax_rht":
            def fn():
                b["amax"].zero_()
                kern.amax_groups_kernel[(triton.cdiv(f, cfg["BM"]), triton.cdiv(t // 16, cfg["G"]))](
                    xt, b["amax"], f, t, xt.stride(0), xt.stride(1), RHT=True, SIGNS=T.DEFAULT_SIGN_MASK,
                    ROUND=1, **cfg)
            return fn, lambda: [b["amax"]]
        if key in ("rows", "rows_sr", "rows_tile"):
            tile = key == "rows_tile"
            sr = key == "rows_sr"
            src, words, scale, deq = (self.w, b["ww"], b["ws"], b["wd"]) if tile else (x, b["words"], b["scale"], b["deq"])
            am = self.am_w if tile else self.am
            m, k = src.shape
            if old:
                def fn():
                    kern.quant_rows_kernel[(triton.cdiv(m, cfg["BM"]), triton.cdiv(k // 16, cfg["G"]))](
                        src, words, scale, deq, am, b["wtw"] if tile else words, b["wts"] if tile else scale,
                        m, k, src.stride(0), 1234, T.ONE_SIXTH_F32, TILE_ROWS=16 if tile else 1, SR=sr,
                        WRITE_DEQ=True, WRITE_T=tile, **cfg)
            else:
                def fn():
                    T.launch_quant_rows(src, words, scale, deq, am, b["wtw"] if tile else None,
                                        b["wts"] if tile else None, 1234, 16 if tile else 1, sr, cfg)
            outs = [words, scale, deq] + ([b["wtw"], b["wts"]] if tile else [])
            return fn, lambda: outs
        if key.startswith("groups"):
            rht, sr = "rht" in key, key.endswith("_sr")
            am = self.am_rht if rht else self.am
            if old:
                k_old = kern.quant_groups_kernel
                # Modules from 8a8095f on take the BF16-operand pointer and its strides too.
                extra = (b["wt_words"],) if "deq_ptr" in k_old.arg_names else ()
                strides = (0, 0) if extra else ()

                def fn():
                    k_old[(triton.cdiv(f, cfg["BM"]), triton.cdiv(t // 16, cfg["G"]))](
                        xt, b["wt_words"], b["wt_scale"], am, *extra, f, t, xt.stride(0), xt.stride(1), *strides,
                        1234, T.ONE_SIXTH_F32, RHT=rht, SIGNS=T.DEFAULT_SIGN_MASK, ROUND=1, SR=sr, **cfg)
            else:
                def fn():
                    T.launch_quant_groups(xt, b["wt_words"], b["wt_scale"], am, 1234, rht, sr, cfg=cfg)
            return fn, lambda: [b["wt_words"], b["wt_scale"]]
        if key == "dequant":
            def fn():
                kern.dequant_rows_kernel[(triton.cdiv(t, cfg["BM"]), triton.cdiv(f // 16, cfg["G"]))](
                    self.q_words, self.q_scale, b["deq"], t, f, **cfg)
            return fn, lambda: [b["deq"]]
        raise KeyError(key)

    def outputs(self, key, cfg, old=False):
        fn, outs = self.launcher(key, cfg, old)
        for o in outs():
            o.view(torch.uint8).fill_(0xA5)  # poison: every byte must be written
        fn()
        return [o.clone() for o in outs()]


KEYS = ["amax", "amax_rht", "rows", "rows_sr", "rows_tile", "groups_rht", "groups_rht_sr", "groups", "dequant"]


def cfg_list(key, stage1_best=None):
    s1, tiles = candidates(key)
    if stage1_best is None:
        return s1
    base = {k: v for k, v in stage1_best.items() if k not in ("BM", "G", "num_warps")}
    out = []
    for bm, g, w in tiles:
        c = dict(BM=bm, G=g, num_warps=w, **base)
        if c not in s1:
            out.append(c)
    return out


def _warm(args):
    """Worker: compile (by running once on the real shapes) every candidate of one key."""
    key, cfgs, t, f, old_path, old_cfg = args
    b = Bench(t, f, "cuda", load_old(old_path))
    if old_cfg is not None:
        b.launcher(key, old_cfg, old=True)[0]()
    for c in cfgs:
        try:
            b.launcher(key, c)[0]()
        except Exception as e:  # reported again by the main process
            print(f"  warm {key} {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()
    return key


OLD = None  # the old kernel module, for the probe


@triton.jit
def _probe(out_ptr, base, BLOCK: tl.constexpr):
    i = base + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    y = i.to(tl.int32).to(tl.float32, bitcast=True)
    r8 = ((i * 2654435761) >> 13).to(tl.int32) & 0xFF
    c = (i & 15).to(tl.int32)
    bad_rne = (K._e2m1_rne(y) != OLD._e2m1_rne(y)).to(tl.int32)
    bad_sr = (K._e2m1_sr(y, r8) != OLD._e2m1_sr(y, r8)).to(tl.int32)
    bad_deq = (K._dequant(c, y).to(tl.int32, bitcast=True) != OLD._dequant(c, y).to(tl.int32, bitcast=True)).to(tl.int32)
    tl.atomic_add(out_ptr + 0, tl.sum(bad_rne, axis=0))
    tl.atomic_add(out_ptr + 1, tl.sum(bad_sr, axis=0))
    tl.atomic_add(out_ptr + 2, tl.sum(bad_deq, axis=0))


def exhaustive(dev, total=1 << 32, chunk=1 << 30):
    """Mismatches of the new E2M1 encoders / dequantizer against the old ones over all 2^32 patterns."""
    out = torch.zeros(3, dtype=torch.int32, device=dev)
    block = 1024
    for base in range(0, total, chunk):
        _probe[(chunk // block,)](out, base, BLOCK=block)
    return out.tolist()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--old", default=str(ROOT / "bench" / "_old_kernels.py"))
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--keys", default=",".join(KEYS))
    p.add_argument("--no-exhaustive", action="store_true")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop timing new candidates after this")
    p.add_argument("--dry", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: check the plumbing")
    a = p.parse_args()
    t0 = time.time()
    global OLD
    dev = "cpu" if a.dry else "cuda"
    if a.dry:
        def ms(fn):
            fn()
            return 1.0
        torch.cuda.get_device_name = lambda: "cpu (dry run)"
        a.jobs = 0
    else:
        from triton.testing import do_bench

        def ms(fn):
            return do_bench(fn, warmup=20, rep=80, return_mode="median")

    print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC {torch.cuda.get_device_name()} "
          f"torch {torch.__version__} triton {triton.__version__}", flush=True)
    old = OLD = load_old(a.old)
    if not a.no_exhaustive:
        n = (1 << 16, 1 << 14) if a.dry else (1 << 32, 1 << 30)
        print(f"exhaustive check of {n[0]} patterns, mismatches [rne, sr, dequant]:", exhaustive(dev, *n),
              f"({time.time() - t0:.0f}s)", flush=True)
    keys = a.keys.split(",")
    b = Bench(a.tokens, a.features, dev, old)

    # Compile stage 1 of every key in parallel worker processes (the Triton cache is shared).
    import concurrent.futures as cf
    import multiprocessing as mp

    def warm_all(jobs):
        if not jobs or a.jobs <= 0:
            return
        with cf.ProcessPoolExecutor(max_workers=min(a.jobs, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            list(ex.map(_warm, jobs))

    # one job per (key, chunk of candidates) so that big keys spread over workers
    def jobs_for(key_cfgs, with_old):
        jobs = []
        for key, cfgs in key_cfgs.items():
            for i in range(0, len(cfgs), 2):
                jobs.append((key, cfgs[i:i + 2], a.tokens, a.features, a.old,
                             OLD_CFG.get(key) if (with_old and i == 0) else None))
        return jobs

    s1 = {k: cfg_list(k) for k in keys}
    warm_all(jobs_for(s1, True))
    print(f"stage-1 compiled ({time.time() - t0:.0f}s)", flush=True)

    copy_cache = {}

    def copy_ms(nbytes):
        if nbytes not in copy_cache:
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            copy_cache[nbytes] = ms(lambda: dst.copy_(src))
        return copy_cache[nbytes]

    results = {}  # key -> list of (cfg, ms, same)
    refs = {}

    def measure(key, cfg):
        try:
            got = b.outputs(key, cfg)
            same = all(torch.equal(u.view(torch.uint8), v.view(torch.uint8)) for u, v in zip(got, refs[key]))
            t_ms = ms(b.launcher(key, cfg)[0])
        except Exception as e:
            print(f"  {key} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            return None
        results[key].append((cfg, t_ms, same))
        nb = b.nbytes[key]
        print(f"  {key:14s} {str(cfg):62s} {t_ms:8.4f} ms {nb / t_ms / 1e6:6.0f} GB/s "
              f"ratio {copy_ms(nb) / t_ms:5.2f} {'same' if same else 'DIFFERS'}", flush=True)

    for key in keys:
        refs[key] = b.outputs(key, OLD_CFG[key], old=True)
        results[key] = []
        t_old = ms(b.launcher(key, OLD_CFG[key], old=True)[0])
        results[key].append(("old", t_old, True))
        nb = b.nbytes[key]
        print(f"  {key:14s} {'old kernel, old launch ' + str(OLD_CFG[key]):62s} {t_old:8.4f} ms "
              f"{nb / t_old / 1e6:6.0f} GB/s ratio {copy_ms(nb) / t_old:5.2f}", flush=True)
        for cfg in s1[key]:
            measure(key, cfg)

    # Stage 2: tiles with each key's best stage-1 variant.
    s2 = {}
    for key in keys:
        ok = [(c, m) for c, m, same in results[key] if same and c != "old"]
        if ok:
            s2[key] = cfg_list(key, min(ok, key=lambda r: r[1])[0])
    s2 = {k: v for k, v in s2.items() if v}
    if time.time() - t0 < a.budget_s:
        warm_all(jobs_for(s2, False))
        print(f"stage-2 compiled ({time.time() - t0:.0f}s)", flush=True)
        for key, cfgs in s2.items():
            for cfg in cfgs:
                if time.time() - t0 > a.budget_s:
                    print("  (time budget reached)", flush=True)
                    break
                measure(key, cfg)

    print("\n# summary: old kernel+launch vs fastest bit-identical candidate (same process)")
    print(f"{'kernel':14s} {'MB':>7s} {'old ms':>8s} {'GB/s':>6s} {'ratio':>5s} {'new ms':>8s} {'GB/s':>6s} "
          f"{'ratio':>5s} {'speedup':>7s}  config")
    best = {}
    for key in keys:
        nb = b.nbytes[key]
        t_old = results[key][0][1]
        ok = [(c, m) for c, m, same in results[key][1:] if same]
        if not ok:
            print(f"{key:14s} no bit-identical candidate")
            continue
        c, m = min(ok, key=lambda r: r[1])
        best[key] = c
        cm = copy_ms(nb)
        print(f"{key:14s} {nb / 1e6:7.1f} {t_old:8.4f} {nb / t_old / 1e6:6.0f} {cm / t_old:5.2f} {m:8.4f} "
              f"{nb / m / 1e6:6.0f} {cm / m:5.2f} {t_old / m:6.2f}x  {c}")
    print("\nLAUNCH = {")
    for key in keys:
        if key in best:
            print(f"    {key!r}: dict({', '.join(f'{k}={v}' for k, v in best[key].items())}),")
    print("}")
    print(f"# total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
