"""The build: toolchain discovery, cache keys, index, error reporting, and one real sm90a kernel.

The real compile (``slow``) builds the one kernel CI needs (sm90a_bf16_kk, about 100-115 s and
3.5 GB on the 2-core machine) into the normal cache, so a second run is a cache hit. Everything
else uses a fake ``nvcc`` script and runs in a second.
"""

from __future__ import annotations

import ctypes
import stat
import sys
import time
from pathlib import Path

import pytest

from cutlass_kernels import build, specs

KK = specs.BY_KEY["sm90a_bf16_kk"]


def _fake_nvcc(tmp_path: Path, body: str) -> build.Nvcc:
    script = tmp_path / "nvcc"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return build.Nvcc(str(script), (13, 0), "release 13.0, V13.0.88")


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    for var in ("NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(build, "FALLBACK_NVCC", ())
    with pytest.raises(build.BuildError, match=r"nvcc \(the CUDA compiler, 13.x\) was not found"):
        build.find_nvcc()


def test_nvcc_from_env_and_version(monkeypatch, tmp_path):
    fake = _fake_nvcc(tmp_path, 'echo "Cuda compilation tools, release 12.4, V12.4.131"\n')
    monkeypatch.setenv("NVCC", fake.path)
    found = build.find_nvcc()
    assert found.path == fake.path and found.version == (12, 4) and found.banner == "release 12.4, V12.4.131"


def test_old_nvcc_is_refused_for_sm100a(monkeypatch, tmp_path):
    pytest.importorskip("cutlass_library")
    fake = build.Nvcc(_fake_nvcc(tmp_path, "exit 1\n").path, (12, 4), "release 12.4, V12.4.131")
    monkeypatch.setattr(build, "find_nvcc", lambda: fake)
    with pytest.raises(build.BuildError, match=r"needs nvcc >= 12.8"):
        build.build([specs.BY_KEY["sm100a_nvfp4_128x128"]], root=tmp_path / "cache", show_progress=False)


def test_flags_and_cache_key():
    inc = [Path("/x/include")]
    f90 = build.compile_flags("sm90a", inc)
    f100 = build.compile_flags("sm100a", inc)
    assert "arch=compute_90a,code=sm_90a" in f90 and "arch=compute_100a,code=sm_100a" in f100
    assert "-cudart" in f90 and "static" in f90 and "-shared" in f90
    nv = build.Nvcc("nvcc", (13, 0), "release 13.0, V13.0.88")
    h = build.kernel_hash("src", nv, f90)
    assert h == build.kernel_hash("src", nv, build.compile_flags("sm90a", [Path("/elsewhere")]))  # paths don't count
    assert h != build.kernel_hash("src2", nv, f90)
    assert h != build.kernel_hash("src", build.Nvcc("nvcc", (13, 1), "release 13.1, V13.1.0"), f90)
    assert h != build.kernel_hash("src", nv, f100)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYFP4_CACHE", str(tmp_path))
    assert build.cache_root() == tmp_path / "cutlass"
    monkeypatch.delenv("RAYFP4_CACHE")
    assert build.cache_root() == Path.home() / ".cache" / "rayfp4" / "cutlass"


def test_build_with_fake_nvcc_indexes_and_caches(monkeypatch, tmp_path):
    pytest.importorskip("cutlass_library")
    # A "compiler" that writes its -o argument: exercises generation, hashing, atomic install, index.
    fake = _fake_nvcc(tmp_path, 'while [ "$1" != "-o" ]; do shift; done; echo lib > "$2"\n')
    monkeypatch.setattr(build, "find_nvcc", lambda: fake)
    root = tmp_path / "cache"
    first = build.build([KK], root=root, show_progress=False)
    assert not first[0].cached and first[0].path.exists()
    assert first[0].path.parent.name.startswith("sm90a_bf16_kk-")
    assert "RAYFP4_EXPORT int rayfp4_sm90a_bf16_kk_run(" in (first[0].path.parent / "sm90a_bf16_kk.cu").read_text()
    rec = build.read_index(root)["sm90a_bf16_kk"]
    assert rec["library"] == f"{first[0].path.parent.name}/librayfp4_sm90a_bf16_kk.so"
    assert rec["cutlass_name"].startswith("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_void_bf16")
    assert rec["nvcc"] == fake.banner and rec["arch"] == "sm90a"
    again = build.build([KK], root=root, show_progress=False)
    assert again[0].cached and again[0].path == first[0].path
    assert not list(root.glob(".sm90a_bf16_kk-*"))  # no temp dirs left


def test_compile_error_shows_the_log(monkeypatch, tmp_path):
    pytest.importorskip("cutlass_library")
    fake = _fake_nvcc(tmp_path, 'echo "kernel.cu(12): error: something broke"; exit 2\n')
    monkeypatch.setattr(build, "find_nvcc", lambda: fake)
    root = tmp_path / "cache"
    with pytest.raises(build.BuildError, match=r"(?s)nvcc failed for .*sm90a_bf16_kk.*exit 2.*something broke"):
        build.build([KK], root=root, show_progress=False)
    assert not build.read_index(root)
    assert not list(root.glob("sm90a_bf16_kk-*")) and not list(root.glob(".sm90a_bf16_kk-*"))


def test_cli_list_needs_no_toolchain(capsys):
    assert build.main(["--arch", "all", "--list"]) == 0
    out = capsys.readouterr().out
    assert "sm90a_bf16_kk" in out and "sm100a_nvfp4_256x256" in out and "sm90a_bf16_mk" not in out


def test_cli_reports_missing_nvcc(monkeypatch, capsys, tmp_path):
    def missing():
        raise build.BuildError("nvcc (the CUDA compiler, 13.x) was not found")

    monkeypatch.setattr(build, "find_nvcc", missing)
    assert build.main(["--arch", "sm90a", "--cache", str(tmp_path)]) == 1
    assert "error: nvcc (the CUDA compiler, 13.x) was not found" in capsys.readouterr().err


def test_cli_reports_missing_cutlass_library(monkeypatch, capsys, tmp_path):
    fake = build.Nvcc("nvcc", (13, 0), "release 13.0, V13.0.88")
    monkeypatch.setattr(build, "find_nvcc", lambda: fake)
    for mod in [m for m in sys.modules if m == "cutlass_library" or m.startswith("cutlass_library.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "cutlass_library", None)  # makes `import cutlass_library` fail
    assert build.main(["--arch", "sm90a", "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'nvidia-cutlass==4.2.0.0'" in err


def _toolchain_reason() -> str | None:
    try:
        import cutlass_library  # noqa: F401
    except ImportError:
        return "nvidia-cutlass is not installed (pip install 'nvidia-cutlass==4.2.0.0')"
    try:
        build.find_nvcc()
    except build.BuildError as e:
        return str(e)
    return None


@pytest.mark.slow
# A real nvcc compile (~95 s on the 2-core machine): the full suite's, run when cutlass_kernels/
# changes; CI checks the generated sources and the build commands (the tests above).
@pytest.mark.extended
def test_real_build_of_one_sm90a_kernel():
    """Compile sm90a_bf16_kk for real (no GPU needed) into the cache; a second build is a hit."""
    reason = _toolchain_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    (res,) = build.build([KK], show_progress=True)
    print(f"sm90a_bf16_kk: {'cached' if res.cached else f'built in {res.seconds:.0f} s, peak {res.peak_mb:.0f} MB'}"
          f" ({time.monotonic() - t0:.0f} s wall)", file=sys.stderr)
    lib = ctypes.CDLL(str(res.path), mode=ctypes.RTLD_LOCAL)
    name = lib.rayfp4_sm90a_bf16_kk_name
    name.restype = ctypes.c_char_p
    assert name().decode() == build.read_index()["sm90a_bf16_kk"]["cutlass_name"]
    for sym in ("rayfp4_sm90a_bf16_kk_run", "rayfp4_sm90a_bf16_kk_workspace_size"):
        assert hasattr(lib, sym)
    (again,) = build.build([KK], show_progress=False)
    assert again.cached and again.path == res.path
