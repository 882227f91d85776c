"""Building the kernels library: the cache (a second load does not rebuild, a changed source does), two processes
building at once, and a missing or failing compiler as one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runtime.test_kernels import cpu_library, kernel_cache  # noqa: F401  (fixtures)

from onnxpipe.runtime.kernels import build
from onnxpipe.runtime.kernels.build import KernelBuildError, build_library


@pytest.fixture()
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the kernels' sources the test may change, and a cache of its own."""
    copy = tmp_path / "csrc"
    shutil.copytree(build.CSRC, copy)
    monkeypatch.setattr(build, "CSRC", copy)
    monkeypatch.setenv("ONNXPIPE_KERNEL_CACHE", str(tmp_path / "cache"))
    return copy


def _count_compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = build._compile

    def counted(kind, compiler, flags, out):  # noqa: ANN001, ANN202
        calls.append(kind)
        real(kind, compiler, flags, out)

    monkeypatch.setattr(build, "_compile", counted)
    return calls


def test_second_load_does_not_rebuild_and_a_changed_source_does(cpu_library: Path, sources: Path,  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_compiles(monkeypatch)
    first = build_library("cpu")
    assert calls == ["cpu"] and first.is_file() and first.parent.parent == sources.parent / "cache"
    inode = first.stat().st_ino
    assert build_library("cpu") == first and calls == ["cpu"] and first.stat().st_ino == inode
    (sources / "ops.cc").write_text((sources / "ops.cc").read_text() + "\n// changed\n")
    second = build_library("cpu")
    assert calls == ["cpu", "cpu"] and second != first and second.is_file() and first.is_file()
    assert not list(second.parent.glob(".*.tmp"))  # nothing half-written left beside it


def test_a_failing_build_is_one_line_naming_the_compiler_and_its_first_error(sources: Path) -> None:
    (sources / "ops.cc").write_text((sources / "ops.cc").read_text() + "\nthis is not C++;\n")
    with pytest.raises(KernelBuildError) as info:
        build_library("cpu")
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"building the cpu kernels with {build.find_cxx().path} failed: ")
    assert "ops.cc" in text and "error" in text
    assert not list((sources.parent / "cache").rglob("*.so")) and not list((sources.parent / "cache").rglob(".*.tmp"))


def test_a_missing_source_is_named(sources: Path) -> None:
    (sources / "ort_abi.h").unlink()
    with pytest.raises(KernelBuildError, match=r"ort_abi\.h: a source of the cpu kernels library is missing"):
        build_library("cpu")


def test_no_compiler_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONNXPIPE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ONNXPIPE_CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++ or g++ here
    with pytest.raises(KernelBuildError, match=r"^no C\+\+ compiler: neither c\+\+ nor g\+\+ is on the PATH"):
        build_library("cpu")
    monkeypatch.setenv("ONNXPIPE_CXX", str(tmp_path / "cxx"))
    with pytest.raises(KernelBuildError, match=r"^the compiler .*cxx \(ONNXPIPE_CXX\) does not run"):
        build_library("cpu")


def test_a_cache_that_cannot_be_made_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ONNXPIPE_KERNEL_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(KernelBuildError, match=r"^the kernel cache .*file/cache/[0-9a-f]{16} cannot be made: "):
        build_library("cpu")


def test_a_cache_that_cannot_be_written_is_one_line(sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(build.tempfile, "mkstemp", refuse)  # what a read-only folder does (the tests run as root)
    with pytest.raises(KernelBuildError, match=r"^the kernel cache .* cannot be written: Permission denied$"):
        build_library("cpu")


def test_cuda_architectures_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXPIPE_CUDA_ARCH", "8.0, sm_90")
    assert build.cuda_archs() == (("80", "90"), False)
    flags = build.build_flags("cuda")
    assert "-gencode=arch=compute_90,code=sm_90" in flags and "-cudart" in flags and "-DONNXPIPE_CUDA" in flags
    monkeypatch.setenv("ONNXPIPE_CUDA_ARCH", "hopper")
    with pytest.raises(KernelBuildError, match=r"ONNXPIPE_CUDA_ARCH='hopper'"):
        build.cuda_archs()


def test_two_processes_building_at_once_both_get_the_library(cpu_library: Path, tmp_path: Path) -> None:  # noqa: F811
    """Both start on an empty cache; the lock lets one compile, the other finds its result: one library, no
    leftovers, and each process loads it."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["ONNXPIPE_KERNEL_CACHE"] = {str(tmp_path / "cache")!r}
        import onnxruntime as ort
        from onnxpipe.runtime.kernels.build import build_library
        path = build_library("cpu")
        ort.SessionOptions().register_custom_ops_library(str(path))
        print(path)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1 and not list((tmp_path / "cache").rglob(".*.tmp"))
