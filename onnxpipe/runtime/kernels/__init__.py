"""Kernels of our own: an ONNX Runtime custom-op library (domain ``onnxpipe``) applied at load, in memory.

The model directory stays standard ONNX. When a session asks for kernels (``kernels="on"``/``"auto"``, or the
environment variable ``ONNXPIPE_KERNELS``) and its graph has nodes they compute, the library is built at first use
(``build.py``), registered in the session's options, and the graph is rewritten before onnxruntime sees it
(``rewrite.py``: MatMulNBits -> onnxpipe.MatMulInt4, same inputs and attributes). One line says what happened:
"kernels: onnxpipe MatMulInt4 on 112 of 112 MatMulNBits", or "kernels: off (<reason>)". With "on" a reason to fall
back (no compiler, a failed build, a provider other than CUDA, nothing to rewrite) is an error naming it; with "auto"
the session runs without the kernels and says why.

An MLP's gate and up projections (MatMulNBits, or float16 MatMuls) become one product of 2N rows and an
``onnxpipe.SiluMul`` where the pattern holds (``gate_up.py``; ``ONNXPIPE_KERNELS_FUSE=off`` keeps them apart), so a
float16 model with no MatMulNBits has something to rewrite too: "kernels: onnxpipe 16 gate/up pairs as one with
SiluMul". ``ONNXPIPE_KERNELS_LINEAR=on`` (off by default until a GPU run has timed it) also makes each float16
MatMul by a weight an ``onnxpipe.Linear`` of the transposed weight (``linear.py``: our GEMV at M <= 4, cuBLAS past
it).

Which nodes they take is a policy: ``kernel_skip`` (or ``ONNXPIPE_KERNELS_SKIP``, a comma list) keeps kinds of
MatMulNBits found from the graph (``head``: the one producing the logits; ``qkv``: an attention node's packed input;
``all``: every one) on onnxruntime's kernel, counted in the same line ("... on 80 of 81 MatMulNBits (kept: head (1
node))"); a kind the graph does not have is said there too ("skip head: nothing to skip, ..."). A gate/up pair of
kept nodes still becomes one product: a MatMulNBits of 2N rows and a SiluMul.

``"reference"`` targets the library's CPU reference kernels (a plain C++ loop) on the CPU provider: slow, for the
tests and checks that prove the ABI, the rewrite and the registration on a machine without a GPU. Like "on", it
never falls back silently: a reason not to apply them is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.runtime.kernels.build import KernelBuildError, build_library
from onnxpipe.runtime.kernels.rewrite import SKIP_KINDS, RewriteReport, Target, rewrite_matmul_nbits

__all__ = ["KERNEL_MODES", "SKIP_KINDS", "KernelBuildError", "KernelPlan", "RewriteReport", "build_library",
           "kernel_skip", "kernels_mode", "plan_kernels", "rewrite_matmul_nbits"]

KERNEL_MODES = ("off", "on", "auto", "reference")
ENV = "ONNXPIPE_KERNELS"
ENV_SKIP = "ONNXPIPE_KERNELS_SKIP"
ENV_FUSE = "ONNXPIPE_KERNELS_FUSE"  # "off": no gate/up pair made one MatMulInt4 + SiluMul (gate_up.py); default on
ENV_LINEAR = "ONNXPIPE_KERNELS_LINEAR"  # "on": float MatMuls by a weight as onnxpipe.Linear (linear.py); default off


def kernels_mode(value: str | None = None) -> str:
    """The kernels mode asked for: ``value``, else ``$ONNXPIPE_KERNELS``, else "off"; an unknown one is an error."""
    mode = value if value is not None else (os.environ.get(ENV) or "off")
    mode = mode.strip().lower()
    if mode not in KERNEL_MODES:
        source = "kernels" if value is not None else ENV
        raise OnnxpipeError(f"{source}={mode!r}: choose one of {', '.join(KERNEL_MODES)}")
    return mode


def kernel_skip(value: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The kinds of node the kernels leave to onnxruntime: ``value`` (a comma list or a sequence), else
    ``$ONNXPIPE_KERNELS_SKIP``, else none; an unknown kind is an error naming the source and the kinds."""
    raw = value if value is not None else os.environ.get(ENV_SKIP, "")
    source = "kernel_skip" if value is not None else ENV_SKIP
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    kinds: list[str] = []
    for item in items:
        kind = str(item).strip().lower()
        if not kind:
            continue
        if kind not in SKIP_KINDS:
            shown = raw if isinstance(raw, str) else ",".join(map(str, raw))
            raise OnnxpipeError(f"{source}={shown!r}: unknown kind {kind!r}; kinds: {', '.join(SKIP_KINDS)}")
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


@dataclass
class KernelPlan:
    """What the kernels do for one session: ``edit`` (the session's edit hook) builds and registers the library
    where the graph has something to rewrite, then rewrites it; or the plan is off with the reason (``why_off``)."""

    mode: str
    target: Target | None = None
    session_options: Any = None
    announce: Callable[[str], None] | None = field(default=None, repr=False)
    library: Path | None = None
    why_off: str | None = None
    report: RewriteReport | None = None
    skip: tuple[str, ...] = ()  # kinds of node left to onnxruntime (kernel_skip)
    logits: str = "logits"  # the graph's logits value: where the walk to the LM head starts
    fuse: bool = True  # gate/up pairs as one MatMulInt4 + SiluMul (ONNXPIPE_KERNELS_FUSE=off: not)
    linear: bool = False  # float MatMuls by a weight as onnxpipe.Linear (ONNXPIPE_KERNELS_LINEAR=on)
    folder: Path | None = None  # the model directory: where the external weights a fusion reads lie

    @property
    def active(self) -> bool:
        return self.mode != "off" and self.why_off is None

    def edit(self, proto: Any) -> None:
        """The in-memory rewrite of ``proto`` (an onnx.ModelProto); nothing where the plan is off. The library is
        built and registered only once there is a node to rewrite (a graph without one builds nothing)."""
        if not self.active or self.target is None:
            return
        would = rewrite_matmul_nbits(proto, self.target, apply=False, skip=self.skip, logits=self.logits,
                                     fuse=self.fuse, folder=self.folder, linear=self.linear)
        if would.rewritten == 0 and would.fused == 0 and would.linear == 0:
            self.report = would
            self.why_off = ("nothing to rewrite: the graph has no MatMulNBits and no gate/up pair to fuse"
                            if not would.total else f"nothing to rewrite: {would.reasons()}")
            return
        if self.library is None and not self._load():
            return
        self.report = rewrite_matmul_nbits(proto, self.target, skip=self.skip, logits=self.logits, fuse=self.fuse,
                                           folder=self.folder, linear=self.linear)

    def _load(self) -> bool:
        """Build the target's library and register it in the session options; False (and why_off) where not."""
        try:
            library = build_library("cpu" if self.target == "cpu" else "cuda", announce=self.announce)
        except KernelBuildError as e:
            self.why_off = str(e)
            return False
        try:
            self.session_options.register_custom_ops_library(str(library))
        except Exception as e:  # onnxruntime's own error for a library it cannot load
            text = first_line(e, 200)
            self.why_off = f"onnxruntime did not load {library}: {text}"
            return False
        self.library = library
        return True

    def fell_back(self, why: str) -> None:
        """The session could not use the rewritten graph (say why, once)."""
        if self.mode != "off" and self.why_off is None:
            self.why_off = why

    def line(self) -> str:
        if self.mode == "off":
            return "kernels: off (not asked for)"
        if self.why_off is not None:
            return f"kernels: off ({self.why_off})"
        if self.report is None:
            return "kernels: off (the graph was not rewritten)"
        line = f"kernels: {self.report.line()}"
        if self.report.kept:
            line += f" (kept: {self.report.reasons()})"
        if self.report.skip_notes:
            line += f" ({'; '.join(self.report.skip_notes)})"
        if self.target == "cpu":
            line += " [CPU reference kernels]"
        return line

    def finish(self, say: Callable[[str], None]) -> None:
        """Say the one line; with mode "on" (or "reference") a fallback is an error naming its reason."""
        if self.mode == "off":
            return
        if self.mode in ("on", "reference") and not self.active:
            raise OnnxpipeError(f"kernels={self.mode}: {self.why_off}" +
                                (" (kernels=auto runs without them)" if self.mode == "on" else ""))
        say(self.line())


def plan_kernels(mode: str, chain: Sequence[str], session_options: Any,
                 announce: Callable[[str], None] | None = None, *, skip: tuple[str, ...] = (),
                 logits: str = "logits") -> KernelPlan:
    """The kernels' plan for a session whose providers are ``chain`` (short names, in order of preference) and
    whose options are ``session_options``: which kernels (``target``), or off and why. Its ``edit`` builds, registers
    and rewrites. Never raises for a reason to fall back: the plan carries it (``finish`` makes it an error for "on"
    and "reference"). ``skip``: kinds of node left to onnxruntime (``kernel_skip``), the head found from ``logits``."""
    switches = {}
    for env, default in ((ENV_FUSE, "on"), (ENV_LINEAR, "off")):
        value = os.environ.get(env, default).strip().lower() if mode != "off" else default  # read where kernels run
        if value not in ("on", "off"):
            raise OnnxpipeError(f"{env}={value!r}: choose on or off")
        switches[env] = value == "on"
    plan = KernelPlan(mode, session_options=session_options, announce=announce, skip=skip, logits=logits,
                      fuse=switches[ENV_FUSE], linear=switches[ENV_LINEAR])
    if mode == "off":
        return plan
    first = chain[0] if chain else "cpu"
    if mode == "reference":
        if first != "cpu":
            plan.why_off = f"the reference kernels run on the CPU provider only, not {first}"
            return plan
        plan.target = "cpu"
    elif first != "cuda":
        plan.why_off = f"provider {first} is not CUDA"
        return plan
    else:
        plan.target = "cuda"
    return plan
