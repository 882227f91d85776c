"""Kernels applied at load: a tiny int4 model through DecoderSession with the CPU reference kernels gives the same
greedy tokens as onnxruntime's own MatMulNBits, says one line, and leaves the model directory as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from runtime.test_kernels import cpu_library, kernel_cache  # noqa: F401  (fixtures)

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import quantize_model
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.session import DecoderSession

EVAL = Path(__file__).resolve().parents[2] / "data" / "eval.txt"


@pytest.fixture(scope="module")
def int4_model(byte_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, int4 RTN with block 32, the LM head int4 too, and fp32 compute in MatMulNBits (accuracy
    level 0: onnxruntime's kernel then computes what the reference does, rather than int8 activations)."""
    root = tmp_path_factory.mktemp("kernels-int4")
    (root / "eval.txt").write_text(EVAL.read_text()[:3000])
    quantize_model(byte_model("llama"), root / "int4", "int4", eval_file=root / "eval.txt", eval_context=64,
                   algo="rtn", block_size=32, accuracy_level=0, lm_head="int4")
    return root / "int4"


def assert_same_run(ours: DecoderSession, plain: DecoderSession) -> None:
    """Two prompts' 8 greedy tokens equal, and the first prompt's logits within 1e-4 of their largest."""
    prompts = [[5, 17, 99, 3, 200, 41], [7, 7, 8]]
    a = LanguageModel(ours, None).generate(prompts, max_new_tokens=8, stop_token_ids=[])
    b = LanguageModel(plain, None).generate(prompts, max_new_tokens=8, stop_token_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    ids = np.array([prompts[0]], np.int64)
    mask, pos = np.ones_like(ids), np.arange(ids.shape[1])[None]
    la, lb = ours.forward(ids, mask, pos, ours.new_cache(1)), plain.forward(ids, mask, pos, plain.new_cache(1))
    assert np.abs(la - lb).max() <= 1e-4 * np.abs(lb).max()


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_reference_kernels_give_the_same_greedy_tokens(int4_model: Path, cpu_library: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNXPIPE_KERNELS", raising=False)
    before = _tree_digest(int4_model)
    said: list[str] = []
    ours = DecoderSession(int4_model, "cpu", announce=said.append, kernels="reference")
    plain = DecoderSession(int4_model, "cpu", announce=said.append)
    body = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(int4_model / "model.onnx")).graph.node)
    assert ours.kernels.active and ours.kernels.report is not None
    assert ours.kernels.report.rewritten == body == 15  # 2 layers x 7 projections and the head
    assert [m for m in said if m.startswith("kernels:")] == [ours.kernels.line()]
    assert ours.kernels.line() == ("kernels: onnxpipe MatMulInt4 on 15 of 15 MatMulNBits, 2 gate/up pairs as one with "
                                   "SiluMul [CPU reference kernels]")
    # the rewrite comes after the session's own edits: the LM head (now MatMulInt4) still runs at the read position
    assert ours.last_position and plain.last_position
    assert not plain.kernels.active and "MatMulInt4" not in "".join(said[said.index(ours.kernels.line()) + 1:])
    prompts = [[5, 17, 99, 3, 200, 41], [7, 7, 8]]
    a = LanguageModel(ours, None).generate(prompts, max_new_tokens=12, stop_token_ids=[])
    b = LanguageModel(plain, None).generate(prompts, max_new_tokens=12, stop_token_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b] and all(len(r.token_ids) == 12 for r in a)
    # the logits too, to fp32 compute's rounding (the kernels accumulate in double, onnxruntime in float)
    ids = np.array([prompts[0]], np.int64)
    mask, pos = np.ones_like(ids), np.arange(ids.shape[1])[None]
    la = ours.forward(ids, mask, pos, ours.new_cache(1))
    lb = plain.forward(ids, mask, pos, plain.new_cache(1))
    assert np.abs(la - lb).max() <= 1e-4 * np.abs(lb).max()
    assert _tree_digest(int4_model) == before  # applied in memory: the model directory is untouched


def test_the_environment_turns_them_on_and_auto_on_the_cpu_falls_back(int4_model: Path, cpu_library: Path,  # noqa: F811
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXPIPE_KERNELS", "reference")
    assert DecoderSession(int4_model, "cpu").kernels.active
    said: list[str] = []
    monkeypatch.setenv("ONNXPIPE_KERNELS", "auto")
    session = DecoderSession(int4_model, "cpu", announce=said.append)
    assert not session.kernels.active and "kernels: off (provider cpu is not CUDA)" in said
    with pytest.raises(OnnxpipeError, match=r"^kernels=on: provider cpu is not CUDA"):
        DecoderSession(int4_model, "cpu", kernels="on")


def test_reference_without_a_compiler_is_an_error_naming_it(int4_model: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXPIPE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNXPIPE_CXX", str(tmp_path / "no-cxx"))
    with pytest.raises(OnnxpipeError, match=r"^kernels=reference: the compiler .*no-cxx \(ONNXPIPE_CXX\) does not run"):
        DecoderSession(int4_model, "cpu", kernels="reference")


def test_a_rewritten_graph_onnxruntime_does_not_take_is_named(int4_model: Path, cpu_library: Path,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrite names an op the library lacks: the session falls back to the graph as it is, and the kernels
    say why (an error for "reference", as for "on")."""
    from onnxpipe.runtime.kernels import rewrite

    monkeypatch.setattr(rewrite, "OP", "MatMulInt5")
    with pytest.raises(OnnxpipeError, match=r"^kernels=reference: onnxruntime did not take the edited graph .*"
                                            r"MatMulInt5"):
        DecoderSession(int4_model, "cpu", kernels="reference")


def test_skip_head_keeps_the_node_computing_the_logits(int4_model: Path, cpu_library: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_skip="head" (or ONNXPIPE_KERNELS_SKIP=head) leaves the LM head, found from the graph after the
    session's own edits (the last-position gather, the step tail), on MatMulNBits; the tokens stay the plain run's."""
    monkeypatch.delenv("ONNXPIPE_KERNELS_SKIP", raising=False)
    nodes = [n for n in onnx.load(str(int4_model / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    widest = max(nodes, key=lambda n: next(a.i for a in n.attribute if a.name == "N"))  # N = the vocabulary
    said: list[str] = []
    ours = DecoderSession(int4_model, "cpu", announce=said.append, kernels="reference", kernel_skip="head")
    assert ours.kernels.report is not None and ours.kernels.report.kept == {widest.name: "head"}
    line = ("kernels: onnxpipe MatMulInt4 on 14 of 15 MatMulNBits, 2 gate/up pairs as one with SiluMul (kept: head "
            "(1 node)) [CPU reference kernels]")
    assert [m for m in said if m.startswith("kernels:")] == [line] and ours.last_position
    plain = DecoderSession(int4_model, "cpu")
    prompts = [[5, 17, 99, 3, 200, 41], [7, 7, 8]]
    a = LanguageModel(ours, None).generate(prompts, max_new_tokens=6, stop_token_ids=[])
    b = LanguageModel(plain, None).generate(prompts, max_new_tokens=6, stop_token_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    monkeypatch.setenv("ONNXPIPE_KERNELS_SKIP", "head")  # the variable, for every command
    assert DecoderSession(int4_model, "cpu", kernels="reference").kernels.line() == line


def test_skip_all_keeps_every_matmulnbits_and_still_fuses_the_pairs(int4_model: Path, cpu_library: Path,  # noqa: F811
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_skip="all" leaves every MatMulNBits on onnxruntime's kernel; each gate/up pair still becomes one
    MatMulNBits of 2N rows and a SiluMul (the batch-1 int4 policy to time against MatMulInt4); the tokens stay the
    plain run's and the logits within 1e-4 of their largest."""
    monkeypatch.delenv("ONNXPIPE_KERNELS_SKIP", raising=False)
    said: list[str] = []
    ours = DecoderSession(int4_model, "cpu", announce=said.append, kernels="reference", kernel_skip="all")
    report = ours.kernels.report
    assert report is not None and report.rewritten == 0 and report.fused == report.fused_kept == 2
    assert set(report.kept.values()) == {"all"} and len(report.kept) == report.total == 15
    assert [m for m in said if m.startswith("kernels:")] == [
        "kernels: onnxpipe MatMulInt4 on 0 of 15 MatMulNBits, 2 gate/up pairs as one with SiluMul (2 as one "
        "MatMulNBits) (kept: all (15 nodes)) [CPU reference kernels]"]
    plain = DecoderSession(int4_model, "cpu")
    prompts = [[5, 17, 99, 3, 200, 41], [7, 7, 8]]
    a = LanguageModel(ours, None).generate(prompts, max_new_tokens=6, stop_token_ids=[])
    b = LanguageModel(plain, None).generate(prompts, max_new_tokens=6, stop_token_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_a_bad_skip_kind_is_one_line_naming_the_variable(int4_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXPIPE_KERNELS_SKIP", "lm_head")
    with pytest.raises(OnnxpipeError, match=r"^ONNXPIPE_KERNELS_SKIP='lm_head': unknown kind 'lm_head'; kinds: head, "
                                            r"qkv, all$"):
        DecoderSession(int4_model, "cpu")  # refused with the kernels off too: a typo is never silent
    with pytest.raises(OnnxpipeError, match=r"^kernel_skip='wide': unknown kind 'wide'"):
        DecoderSession(int4_model, "cpu", kernels="reference", kernel_skip="wide")


def test_skip_head_on_a_model_whose_head_is_not_int4_says_there_is_nothing_to_skip(
        byte_model: Callable[[str], Path], tmp_path: Path, cpu_library: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "eval.txt").write_text(EVAL.read_text()[:3000])
    quantize_model(byte_model("llama"), tmp_path / "int4", "int4", eval_file=tmp_path / "eval.txt", eval_context=64,
                   algo="rtn", block_size=32, accuracy_level=0, lm_head="fp32")
    monkeypatch.setenv("ONNXPIPE_KERNELS_SKIP", "head")
    said: list[str] = []
    DecoderSession(tmp_path / "int4", "cpu", announce=said.append, kernels="reference")
    assert [m for m in said if m.startswith("kernels:")] == [
        "kernels: onnxpipe MatMulInt4 on 14 of 14 MatMulNBits, 2 gate/up pairs as one with SiluMul (skip head: "
        "nothing to skip, the 'logits' output does not come from a MatMulNBits (the LM head is not quantized)) "
        "[CPU reference kernels]"]


def test_the_kinds_are_found_on_the_cuda_form_graph(byte_model: Callable[[str], Path], tmp_path: Path) -> None:
    """On `optimize --target cuda`'s graph (q, k and v packed into one MatMul before GroupQueryAttention), int4 with
    the head: qkv is one MatMulNBits a layer, head the one computing the logits, and nothing else is taken for them."""
    from onnxpipe.fusion import optimize_model
    from onnxpipe.runtime.kernels.rewrite import rewrite_matmul_nbits

    (tmp_path / "eval.txt").write_text(EVAL.read_text()[:3000])
    optimize_model(byte_model("llama"), tmp_path / "cuda", level=3, target="cuda")
    quantize_model(tmp_path / "cuda", tmp_path / "int4", "int4", eval_file=tmp_path / "eval.txt", eval_context=64,
                   algo="rtn", block_size=32, lm_head="int4")
    proto = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    nbits = {n.name: n for n in proto.graph.node if n.op_type == "MatMulNBits"}
    gqa_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "GroupQueryAttention"}
    report = rewrite_matmul_nbits(proto, "cpu", apply=False, skip=("qkv", "head"))
    qkv = sorted(k for k, why in report.kept.items() if why == "qkv")
    head = [k for k, why in report.kept.items() if why == "head"]
    assert len(qkv) == len(gqa_inputs) == 2 and all(nbits[k].output[0] in gqa_inputs for k in qkv)
    width = {k: next(a.i for a in n.attribute if a.name == "N") for k, n in nbits.items()}
    assert head == [max(width, key=width.__getitem__)] and sorted(width.values())[-2] < width[head[0]]  # the vocab
    assert report.total == len(nbits) and report.rewritten == len(nbits) - 3 and not report.skip_notes


def test_a_float_model_gets_its_gate_up_pairs_fused(byte_model: Callable[[str], Path], cpu_library: Path,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No MatMulNBits: the kernels still make each layer's gate and up one MatMul with SiluMul; the greedy tokens
    are the plain run's, the logits within float rounding; ONNXPIPE_KERNELS_FUSE=off leaves nothing to do."""
    monkeypatch.delenv("ONNXPIPE_KERNELS_FUSE", raising=False)
    said: list[str] = []
    ours = DecoderSession(byte_model("llama"), "cpu", announce=said.append, kernels="reference")
    plain = DecoderSession(byte_model("llama"), "cpu")
    assert [m for m in said if m.startswith("kernels:")] == [
        "kernels: onnxpipe 2 gate/up pairs as one with SiluMul [CPU reference kernels]"]
    assert_same_run(ours, plain)
    monkeypatch.setenv("ONNXPIPE_KERNELS_FUSE", "off")
    with pytest.raises(OnnxpipeError, match=r"^kernels=reference: nothing to rewrite: the graph has no MatMulNBits"):
        DecoderSession(byte_model("llama"), "cpu", kernels="reference")
