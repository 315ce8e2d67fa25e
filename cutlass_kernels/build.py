"""Build rayfp4's CUTLASS GEMMs into cached shared libraries: ``python -m cutlass_kernels.build``.

    python -m cutlass_kernels.build --arch sm90a|sm100a|all [--kernels KEY,...] [--force] [--list]

Runs on any machine with ``nvcc`` (13.x) and the ``nvidia-cutlass`` wheel; no GPU is needed, and
none is used. Each kernel is its own translation unit and its own ``.so`` (``specs.py`` lists
them): one CUTLASS kernel costs about 100 s of ``nvcc`` and 3.5-4 GB of memory, so builds are
sequential by default, CI builds a single kernel, and a later build of a larger set reuses the
kernels already built.

The cache: ``$RAYFP4_CACHE/cutlass`` (default ``~/.cache/rayfp4/cutlass``), one directory per
kernel named ``<key>-<hash>``, the hash covering the generated source (which includes the CUTLASS
version and kernel type), the nvcc version and the flags; so changing any of them rebuilds, and
nothing else does. ``index.json`` beside them maps each kernel key to the library last built for
it; the binding reads only that file and the libraries, so a machine that just runs kernels
(e.g. the GPU box, which has no nvcc and no nvidia-cutlass) needs only the cache directory.

sm_100a (Blackwell) libraries build here like any other, but they can only run on compute
capability 10.x; ``binding.available`` never offers them elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .specs import KernelSpec, kernels_for

#: Minimum nvcc for each arch: sm_90a wgmma needs 12.0; the FP4 tcgen05 block-scaled MMA, 12.8.
_MIN_NVCC = {"sm90a": (12, 0), "sm100a": (12, 8)}
_GENCODE = {"sm90a": "arch=compute_90a,code=sm_90a", "sm100a": "arch=compute_100a,code=sm_100a"}
INDEX = "index.json"
#: Where nvcc is looked for after $NVCC, $CUDA_HOME/bin and PATH.
FALLBACK_NVCC = ("/usr/local/cuda/bin/nvcc",)


class BuildError(RuntimeError):
    """Something the user can fix stops the build (missing nvcc or headers, a compile error)."""


def cache_root() -> Path:
    """``$RAYFP4_CACHE/cutlass`` or ``~/.cache/rayfp4/cutlass``."""
    base = os.environ.get("RAYFP4_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "rayfp4"
    return root / "cutlass"


# --------------------------------------------------------------------------------------------
# Toolchain


@dataclass(frozen=True)
class Nvcc:
    path: str
    version: tuple[int, int]
    banner: str  # the "release X.Y, VX.Y.Z" line: part of the cache key


def find_nvcc() -> Nvcc:
    """nvcc from ``$NVCC``, ``$CUDA_HOME/bin``, PATH or /usr/local/cuda/bin. Raises BuildError."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), *FALLBACK_NVCC]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            try:
                out = subprocess.run([c, "--version"], capture_output=True, text=True, timeout=60).stdout
            except (OSError, subprocess.SubprocessError) as e:
                raise BuildError(f"nvcc at {c} does not run: {e}") from e
            m = re.search(r"release (\d+)\.(\d+), (V[\d.]+)", out)
            if not m:
                raise BuildError(f"cannot read the version of nvcc at {c} from: {out.strip()!r}")
            return Nvcc(c, (int(m.group(1)), int(m.group(2))), m.group(0))
    raise BuildError(
        "nvcc (the CUDA compiler, 13.x) was not found: looked at $NVCC, $CUDA_HOME/bin, PATH and "
        "/usr/local/cuda/bin. Install the CUDA toolkit (no GPU is needed to build) or set NVCC."
    )


def compile_flags(arch: str, include_dirs: list[Path]) -> list[str]:
    """nvcc flags for one kernel library.

    ``-gencode ...,code=sm_90a`` (not ``-arch=sm_90a``): the "a" targets enable wgmma/tcgen05 and
    the gencode form emits exactly that SASS, no PTX for other GPUs to JIT. ``-cudart static`` and
    hidden visibility keep the library free of a libcudart/torch dependency; only our
    ``rayfp4_*`` entry points are exported.
    """
    return [
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "-gencode",
        _GENCODE[arch],
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC,-fvisibility=hidden",
        "-shared",
        "-cudart",
        "static",
        *[f"-I{d}" for d in include_dirs],
    ]


def _portable_flags(flags: list[str]) -> list[str]:
    # The include paths differ between machines (venv location) but not the headers they point
    # to, whose version is in the source text: keep them out of the cache key.
    return [f for f in flags if not f.startswith("-I")]


def kernel_hash(source: str, nvcc: Nvcc, flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (source, nvcc.banner, " ".join(_portable_flags(flags))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The index


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_index(root: Path | None = None) -> dict:
    """key -> record of the library last built for it (empty if nothing was built)."""
    path = (root or cache_root()) / INDEX
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BuildError(f"the kernel index {path} is corrupt ({e}); delete it and rebuild") from e


def _record(root: Path, key: str, record: dict) -> None:
    with _locked(root):
        index = read_index(root)
        index[key] = record
        tmp = root / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
        tmp.replace(root / INDEX)


# --------------------------------------------------------------------------------------------
# Compiling


def _say(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def _compile(cmd: list[str], log_path: Path, label: str, show_progress: bool) -> tuple[float, float]:
    """Run nvcc, showing elapsed time; return (seconds, peak memory in MB of nvcc's process tree)."""
    t0 = time.monotonic()
    tty = sys.stderr.isatty()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        last = t0
        while True:
            # wait4 gives the child's rusage; ru_maxrss covers the compiler stages it waited for.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.5)
            now = time.monotonic()
            if show_progress and (tty or now - last >= 30):
                last = now
                _say(f"\r  {label}: compiling, {now - t0:5.0f} s", end="" if tty else "\n")
        proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.monotonic() - t0
    if show_progress and tty:
        _say("")
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(f"nvcc failed for {label} (exit {proc.returncode}); log {log_path}:\n{tail}")
    return secs, usage.ru_maxrss / 1024.0


@dataclass
class Built:
    key: str
    path: Path
    cached: bool
    seconds: float
    peak_mb: float


def build(
    specs: list[KernelSpec],
    *,
    root: Path | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> list[Built]:
    """Generate, compile and index ``specs``; kernels already in the cache are not rebuilt.

    Raises BuildError when nvcc or the CUTLASS headers are missing or a compile fails, and
    CutlassLibraryMissing (a BuildError-like RuntimeError) when nvidia-cutlass is not installed.
    """
    from . import generate  # needs cutlass_library; imported here so the binding does not

    root = root or cache_root()
    nvcc = find_nvcc()
    for s in specs:
        need = _MIN_NVCC[s.arch]
        if nvcc.version < need:
            raise BuildError(
                f"{s.key} ({s.arch}) needs nvcc >= {need[0]}.{need[1]}; {nvcc.path} is {nvcc.banner}"
            )
    includes = generate.cutlass_include_dirs()
    sources = generate.generate(specs)
    results = []
    for i, s in enumerate(specs, 1):
        op, source = sources[s.key]
        flags = compile_flags(s.arch, includes)
        digest = kernel_hash(source, nvcc, flags)
        out_dir = root / f"{s.key}-{digest}"
        lib = out_dir / s.lib_name
        label = f"[{i}/{len(specs)}] {s.key}"
        if lib.exists() and not force:
            if show_progress:
                _say(f"  {label}: cached ({lib})")
            _record(root, s.key, {**_meta(s, op, nvcc, digest, lib), **_previous_cost(out_dir)})
            results.append(Built(s.key, lib, True, 0.0, 0.0))
            continue
        if show_progress:
            _say(f"  {label}: {op.procedural_name()}\n  {label}: nvcc {s.arch} (about 100 s and 4 GB)")
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{s.key}-", dir=root))
        try:
            (work / f"{s.key}.cu").write_text(source)
            cmd = [nvcc.path, *flags, "-o", str(work / s.lib_name), str(work / f"{s.key}.cu")]
            (work / "command.txt").write_text(" ".join(cmd) + "\n")
            secs, peak = _compile(cmd, work / "nvcc.log", label, show_progress)
            (work / "cost.json").write_text(json.dumps({"compile_s": round(secs, 1), "peak_mb": round(peak)}))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            work.rename(out_dir)  # atomic: a library in the cache is always complete
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _record(root, s.key, {**_meta(s, op, nvcc, digest, lib), "compile_s": round(secs, 1), "peak_mb": round(peak)})
        if show_progress:
            _say(f"  {label}: built in {secs:.0f} s, peak {peak / 1024:.1f} GB -> {lib}")
        results.append(Built(s.key, lib, False, secs, peak))
    return results


def _previous_cost(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "cost.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _meta(spec: KernelSpec, op, nvcc: Nvcc, digest: str, lib: Path) -> dict:
    from .generate import cutlass_version

    return {
        "arch": spec.arch,
        "family": spec.family,
        "order": spec.order,
        "out": spec.out,
        "cutlass_name": op.procedural_name(),
        "cutlass_version": cutlass_version(),
        "nvcc": nvcc.banner,
        "hash": digest,
        # Relative to the cache root, so a copied cache (e.g. carried to the GPU box) still works.
        "library": str(lib.relative_to(lib.parent.parent)),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cutlass_kernels.build",
        description="Build rayfp4's CUTLASS GEMMs (no GPU needed). sm100a libraries run only on Blackwell.",
    )
    p.add_argument("--arch", required=True, choices=["sm90a", "sm100a", "all"])
    p.add_argument("--kernels", default=None, help="comma-separated kernel keys (default: the arch's default set)")
    p.add_argument("--cache", type=Path, default=None, help="cache root (default: $RAYFP4_CACHE/cutlass or ~/.cache/rayfp4/cutlass)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--list", action="store_true", help="print the kernels that would be built and exit")
    a = p.parse_args(argv)
    try:
        specs = kernels_for(a.arch, a.kernels.split(",") if a.kernels else None)
    except ValueError as e:
        p.error(str(e))
    if a.list:
        for s in specs:
            print(f"{s.key:24s} {s.arch:7s} {s.family:10s} order={s.order} tile={s.tile} cluster={s.cluster}")
        return 0
    root = a.cache.expanduser() / "cutlass" if a.cache else cache_root()
    _say(f"cutlass_kernels: building {len(specs)} kernel(s) for {a.arch} into {root}")
    t0 = time.monotonic()
    try:
        done = build(specs, root=root, force=a.force)
    except BuildError as e:
        _say(f"cutlass_kernels: error: {e}")
        return 1
    except RuntimeError as e:  # CutlassLibraryMissing and friends
        _say(f"cutlass_kernels: error: {e}")
        return 1
    n_new = sum(not b.cached for b in done)
    _say(f"cutlass_kernels: {n_new} built, {len(done) - n_new} cached, {time.monotonic() - t0:.0f} s total")
    for b in done:
        print(b.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
