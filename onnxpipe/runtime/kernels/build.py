"""Build the kernels library at first use: ``libonnxpipe_kernels.so`` (the CPU reference kernels, the system C++
compiler) or ``libonnxpipe_kernels_cuda.so`` (the CUDA kernels, nvcc), cached by what went into it.

Where the compiler comes from:
- C++: ``$ONNXPIPE_CXX``, else ``c++`` or ``g++`` on the PATH.
- nvcc: ``$ONNXPIPE_NVCC``, else ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on the PATH, ``/usr/local/cuda*/bin/nvcc`` (newest
  first), else the PyPI packages ``nvidia-cuda-nvcc`` + ``nvidia-cuda-runtime`` + ``nvidia-cuda-cccl`` (CUDA 13:
  ``nvidia/cu13/`` on the Python path, a toolkit layout of its own; every such folder's include/ and lib/ is searched,
  so the three may be installed apart). The runtime is linked statically (``-cudart static``), so the library needs
  nothing at load but the driver that onnxruntime's CUDA EP already uses; cuBLAS (MatMulInt4 past M = 32) is not
  linked at all: the kernel takes the libcublas that EP has loaded into the process (csrc/cublas_abi.h, ``-ldl``).
- the GPU architectures: ``$ONNXPIPE_CUDA_ARCH`` ("90" or "80,90"), else the visible GPUs' compute capability
  (``nvidia-smi --query-gpu=compute_cap``), else sm_80 and sm_90 with PTX for later GPUs.

The cache: ``$ONNXPIPE_KERNEL_CACHE`` (default ``~/.cache/onnxpipe/kernels``) / <hash of the sources, the flags and the
compiler's version> / the library. A build writes a file beside the target and renames it into place under a lock,
so two processes building at once both end with the same complete library, and a changed source builds anew.
A failed build is one line (``KernelBuildError``) naming the compiler and its first error line.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from onnxpipe.errors import OnnxpipeError

CSRC = Path(__file__).parent / "csrc"
Kind = Literal["cpu", "cuda"]
LIBRARY = {"cpu": "libonnxpipe_kernels.so", "cuda": "libonnxpipe_kernels_cuda.so"}
SOURCES: dict[str, tuple[str, ...]] = {
    "cpu": ("ops.cc", "ort_abi.h", "cublas_abi.h", "int4_prefill.h"),
    "cuda": ("ops.cc", "ort_abi.h", "cublas_abi.h", "int4_prefill.h", "int4_gemm.cu", "int4_gemm.h", "int4_dequant.cu",
             "silu_mul.cu", "linear.cu", "kernel_common.cuh"),
}
COMPILED: dict[str, tuple[str, ...]] = {"cpu": ("ops.cc",),
                                        "cuda": ("ops.cc", "int4_gemm.cu", "int4_dequant.cu", "silu_mul.cu", "linear.cu")}
LINK_LIBS = ("-ldl",)  # dlopen/dlsym (cuBLAS found in the process, cublas_abi.h); after the sources, for --as-needed
CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-cudart", "static",
              "-DONNXPIPE_CUDA")
DEFAULT_ARCHS = ("80", "90")
BUILD_TIMEOUT_S = 600


class KernelBuildError(OnnxpipeError):
    """The kernels library cannot be built here (no compiler, or the compiler failed): one line saying why."""


@dataclass(frozen=True)
class Compiler:
    """A compiler found on this machine: its path, its version line, and where it came from."""

    path: str
    version: str
    origin: str  # "ONNXPIPE_CXX", "PATH", "CUDA_HOME", "/usr/local/cuda-13.0", "PyPI nvidia-cuda-nvcc", ...


def kernel_cache() -> Path:
    return Path(os.environ.get("ONNXPIPE_KERNEL_CACHE") or Path.home() / ".cache" / "onnxpipe" / "kernels")


def find_cxx() -> Compiler:
    """The system C++ compiler, or KernelBuildError saying none was found."""
    explicit = os.environ.get("ONNXPIPE_CXX")
    if explicit:
        return _probe(explicit, "ONNXPIPE_CXX")
    for name in ("c++", "g++"):
        path = shutil.which(name)
        if path:
            return _probe(path, "PATH")
    raise KernelBuildError("no C++ compiler: neither c++ nor g++ is on the PATH (install one, or set ONNXPIPE_CXX)")


def find_nvcc() -> Compiler:
    """nvcc from ONNXPIPE_NVCC, CUDA_HOME, the PATH, /usr/local/cuda*, or the PyPI packages; else KernelBuildError."""
    explicit = os.environ.get("ONNXPIPE_NVCC")
    if explicit:
        return _probe(explicit, "ONNXPIPE_NVCC")
    candidates: list[tuple[str, str]] = []
    if os.environ.get("CUDA_HOME"):
        candidates.append((os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"), "CUDA_HOME"))
    if shutil.which("nvcc"):
        candidates.append((str(shutil.which("nvcc")), "PATH"))
    for home in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        candidates.append((os.path.join(home, "bin", "nvcc"), home))
    for pypi in _pypi_cuda_homes():
        candidates.append((str(pypi / "bin" / "nvcc"), "PyPI nvidia-cuda-nvcc"))
    for path, origin in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return _probe(path, origin)
    raise KernelBuildError("no CUDA compiler: nvcc is not in CUDA_HOME, on the PATH or in /usr/local/cuda*, and the "
                           "PyPI packages are not installed (pip install nvidia-cuda-nvcc nvidia-cuda-runtime "
                           "nvidia-cuda-cccl)")


def cuda_archs() -> tuple[tuple[str, ...], bool]:
    """(the SM versions to build, whether to embed PTX for later GPUs): ONNXPIPE_CUDA_ARCH, the visible GPUs, or
    the default sm_80 + sm_90 with PTX."""
    explicit = os.environ.get("ONNXPIPE_CUDA_ARCH")
    if explicit:
        archs = tuple(a.strip().replace(".", "").removeprefix("sm_") for a in explicit.split(",") if a.strip())
        if not archs or not all(a.isdigit() for a in archs):
            raise KernelBuildError(f"ONNXPIPE_CUDA_ARCH={explicit!r}: give compute capabilities such as 90 or 80,90")
        return archs, False
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            found = sorted({line.strip().replace(".", "") for line in out.stdout.splitlines() if line.strip()})
            if out.returncode == 0 and found and all(a.isdigit() for a in found):
                return tuple(found), False
        except (OSError, subprocess.TimeoutExpired):
            pass
    return DEFAULT_ARCHS, True


def build_flags(kind: Kind, compiler: Compiler | None = None) -> list[str]:
    """The compiler flags of a build of ``kind`` (for CUDA: the architectures, and with a PyPI nvcc the include/
    and lib/ folders of the other nvidia/cu1X packages on the Python path)."""
    if kind == "cpu":
        return list(CXX_FLAGS)
    archs, ptx = cuda_archs()
    flags = list(NVCC_FLAGS) + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx:
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    if compiler is not None and Path(compiler.path).parent.parent.parent.name == "nvidia":
        for home in _pypi_cuda_homes():
            flags += [f"-I{home / 'include'}"] if (home / "include").is_dir() else []
            flags += [f"-L{home / 'lib'}"] if (home / "lib").is_dir() else []
    return flags


def _pypi_cuda_homes() -> list[Path]:
    """The nvidia/cu1X folders of CUDA's PyPI packages on the Python path (newest CUDA first)."""
    homes: list[Path] = []
    for site in sys.path:
        for home in sorted(glob.glob(os.path.join(site or ".", "nvidia", "cu1[3-9]")), reverse=True):
            if Path(home) not in homes:
                homes.append(Path(home))
    return homes


def library_path(kind: Kind, compiler: Compiler, flags: list[str], cache: Path | None = None) -> Path:
    """Where the library of these sources, flags and compiler lives in the cache (built or not)."""
    digest = hashlib.sha256()
    for name in SOURCES[kind]:
        src = CSRC / name
        if not src.is_file():
            raise KernelBuildError(f"{src}: a source of the {kind} kernels library is missing")
        digest.update(name.encode() + b"\0" + src.read_bytes() + b"\0")
    digest.update(("\0".join([*flags, *LINK_LIBS]) + "\0" + compiler.version).encode())
    return (cache or kernel_cache()) / digest.hexdigest()[:16] / LIBRARY[kind]


def build_library(kind: Kind = "cpu", *, cache: Path | None = None,
                  announce: Callable[[str], None] | None = None) -> Path:
    """The path of the ``kind`` library, built now if the cache has none for these sources, flags and compiler.
    Raises KernelBuildError (one line) where no compiler is found or the build fails."""
    if kind not in LIBRARY:
        raise KernelBuildError(f"unknown kernels library {kind!r}; choose one of {', '.join(LIBRARY)}")
    compiler = find_cxx() if kind == "cpu" else find_nvcc()
    flags = build_flags(kind, compiler)
    target = library_path(kind, compiler, flags, cache)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"the kernel cache {target.parent} cannot be made: {e.strerror}") from None
    try:
        with _lock(target.parent / ".lock"):
            if target.is_file():  # another process built it while this one waited
                return target
            (announce or (lambda _m: None))(f"kernels: building {target.name} with {compiler.path} (once)")
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            try:
                _compile(kind, compiler, flags, Path(tmp))
                os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache is read by other users
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as e:  # the cache folder: not writable, full
        raise KernelBuildError(f"the kernel cache {target.parent} cannot be written: {e.strerror or e}") from None
    return target


def _compile(kind: Kind, compiler: Compiler, flags: list[str], out: Path) -> None:
    sources = [str(CSRC / name) for name in COMPILED[kind]]
    cmd = [compiler.path, *flags, "-I", str(CSRC), "-o", str(out), *sources, *LINK_LIBS]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=str(out.parent))
    except subprocess.TimeoutExpired:
        raise KernelBuildError(f"building the {kind} kernels with {compiler.path} took over {BUILD_TIMEOUT_S} s") from None
    except OSError as e:
        raise KernelBuildError(f"building the {kind} kernels: {compiler.path} did not run ({e.strerror})") from None
    if done.returncode != 0:
        raise KernelBuildError(f"building the {kind} kernels with {compiler.path} failed: "
                               f"{first_error(done.stderr + done.stdout)}")


def first_error(text: str) -> str:
    """The compiler's first error line (else its first line), trimmed to one line of a message."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    line = (errors or lines or ["no output"])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _probe(path: str, origin: str) -> Compiler:
    """The compiler at ``path`` and its version line; KernelBuildError if it does not run."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"the compiler {path} ({origin}) does not run: {getattr(e, 'strerror', None) or e}") from None
    lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    if done.returncode != 0 or not lines:
        raise KernelBuildError(f"the compiler {path} ({origin}) does not run: {first_error(done.stderr + done.stdout)}")
    version = next((ln for ln in lines if "release" in ln.lower()), lines[0])  # nvcc: "Cuda compilation tools, release 13.0"
    return Compiler(path=path, version=version, origin=origin)


class _lock:
    """An exclusive lock on a file (fcntl), held while one process builds."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_lock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
