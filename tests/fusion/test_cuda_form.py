"""optimize --target cuda: the attention form ORT's CUDA GroupQueryAttention kernel runs (no attention_bias, right
padding, rotary and packed QKV folded into the op), checked here on ORT's CPU kernels, which run the same form.

The CUDA kernels themselves are exercised on the GPU machine (tests/gpu/test_cuda_optimize.py, marked gpu;
scripts/bench_gpu.py), not here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxpipe.fusion import optimize_model
from onnxpipe.runtime import load

GQA_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
PROMPTS = [[5, 9, 12, 3, 7, 100, 20], [44, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _gqa_nodes(path: Path) -> list:
    return [n for n in onnx.load(str(path / "model.onnx")).graph.node if n.op_type == "GroupQueryAttention"]


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_cuda_form_fuses_and_keeps_parity(family, cuda_form):
    path = cuda_form(family)
    manifest = json.loads((path / "onnxpipe.json").read_text())
    assert manifest["graph"]["padding_side"] == "right" and manifest["graph"]["target"] == "cuda"
    step = manifest["steps"][-1]
    assert step["check"]["passed"] and step["check"]["rel_err"] < 1e-5 and step["check"]["greedy_agreement"] == 1.0
    attention = next(p for p in step["passes"] if p["name"] == "attention")
    assert attention["status"] == "kept" and attention["fused"]["attention blocks fused"] == "2/2"
    nodes = _gqa_nodes(path)
    assert len(nodes) == 2
    ops = {n.op_type for n in onnx.load(str(path / "model.onnx")).graph.node}
    for node in nodes:
        assert len(node.input) <= 9  # no position_ids / attention_bias: the CUDA kernel has no bias input
        assert _attrs(node)["do_rotary"] == 1 and list(node.input[7:9]) == ["rotary.cos_cache", "rotary.sin_cache"]
        # packed QKV where q, k and v are three projections of one input, or (phi3) three consecutive slices of its
        # fused qkv projection; qwen3 normalizes q and k first, so the op takes them apart
        packed = node.input[1] == "" and node.input[2] == ""
        assert packed == (family != "qwen3"), family
    assert "RotaryEmbedding" not in ops
    if family == "mistral":
        assert all(_attrs(n)["local_window_size"] == 5 for n in nodes)


def _hf_greedy_single(hf, prompt, new):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    row = out[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_form_generates_what_transformers_does(family, shared, cuda_form, tiny_hf):
    """A right-padded batch (mistral's rows outgrow its window of 5; gpt2's positions come from position_ids), with a
    growing or a shared KV buffer, gives each row's transformers greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf(family), dtype=torch.float32).eval()
    lm = load(cuda_form(family), "cpu")
    assert lm.session.padding_side == "right"
    lm.session.shares_buffer = shared
    batch = lm.generate(PROMPTS, max_new_tokens=16)
    for prompt, row in zip(PROMPTS, batch):
        assert row.token_ids == _hf_greedy_single(hf, prompt, 16)


def test_gpt2_cuda_form_is_group_query_attention_with_groups_of_one(cuda_form):
    """GPT-2's blocks have no grouped heads and no rotary: the CUDA form is GroupQueryAttention with kv_num_heads =
    num_heads and do_rotary=0, fed c_attn's [B, S, 3 hidden] as the packed query, with the shared buffer and right
    padding that CUDA graphs need; position_ids stays an input and still feeds the position table."""
    path = cuda_form("gpt2")
    manifest = json.loads((path / "onnxpipe.json").read_text())
    graph = manifest["graph"]
    assert graph["padding_side"] == "right" and graph["kv"]["shares_buffer"] and graph["target"] == "cuda"
    assert graph["attention_mask_use"] == "row sums and width"
    step = manifest["steps"][-1]
    assert step["check"]["passed"] and step["check"]["rel_err"] < 1e-5 and step["check"]["greedy_agreement"] == 1.0
    attention = next(p for p in step["passes"] if p["name"] == "attention")
    assert attention["status"] == "kept" and attention["fused"]["attention blocks fused"] == "2/2"
    assert attention["check"]["passed"]
    proto = onnx.load(str(path / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "MultiHeadAttention" not in ops and "Split" not in ops
    nodes = _gqa_nodes(path)
    assert len(nodes) == 2
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in nodes:
        attrs = _attrs(node)
        assert attrs["num_heads"] == attrs["kv_num_heads"] == 4 and attrs["do_rotary"] == 0
        assert attrs["scale"] == pytest.approx(0.25)  # 1/sqrt(head_dim 16)
        assert len(node.input) == 7 and node.input[1] == node.input[2] == ""  # packed, no bias input
        packed = producers[node.input[0]]  # Reshape(Gemm(x, c_attn.weight[, c_attn.bias]), [B, S, 192])
        assert packed.op_type == "Reshape" and producers[packed.input[0]].op_type == "Gemm"
    assert "position_ids" in [i.name for i in proto.graph.input]
    assert any(n.op_type == "Gather" and "position_ids" in n.input for n in proto.graph.node)
    load(path, "cpu", cuda_graph=True)  # the form CUDA graphs need: accepted (runs without them on the CPU)


def test_cuda_form_of_a_trained_gpt2_generates_what_transformers_does(tmp_path):
    """The trained gpt2-stdlib (non-zero c_attn biases, unlike the tiny random model's): its CUDA form passes every
    pass's check, and a right-padded batch of prompts of different lengths, through the shared buffer, through
    the CUDA-graph slots driven on the CPU and through steps that feed themselves, gives each row's transformers
    greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from onnxpipe.export import export_decoder

    hf_dir = Path(__file__).resolve().parents[2] / "models" / "gpt2-stdlib"
    export_decoder(hf_dir, tmp_path / "exported")
    result = optimize_model(tmp_path / "exported", tmp_path / "cuda", level=3, target="cuda")
    assert [p.name for p in result.passes if p.status == "rolled_back"] == []
    assert result.check.passed and result.check.greedy_agreement == 1.0
    gqa = _gqa_nodes(tmp_path / "cuda")
    assert len(gqa) == 4 and all(_attrs(n)["kv_num_heads"] == 4 and n.input[1] == "" for n in gqa)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = [[17, 900, 45, 3021, 8, 77, 1200, 5], [301, 12], [44, 45, 46, 47, 48]]
    want = [_hf_greedy_single(hf, p, 12) for p in prompts]
    lm = load(tmp_path / "cuda", "cpu")
    assert lm.session.shares_buffer and lm.session.padding_side == "right"
    assert [r.token_ids for r in lm.generate(prompts, max_new_tokens=12)] == want
    lm.session.cuda_graph = True  # the CUDA-graph slots, minus the capture
    assert [r.token_ids for r in lm.generate(prompts, max_new_tokens=12)] == want
    assert sum(slot.runs for slot in lm.session._graphs.values()) > 0
    # and the greedy steps that feed themselves (step tail): the positions they write feed gpt2's position table
    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    fed = DecoderSession(tmp_path / "cuda", "cpu", feed_back=True)
    assert fed.fed
    fed.cuda_graph = True
    assert [r.token_ids for r in LanguageModel(fed, None).generate(prompts, max_new_tokens=12)] == want


def test_a_llama_without_grouped_heads_gets_the_cuda_form_too(tmp_path):
    """kv heads = heads (Llama-2-7B's shape): the plain attention pattern, which on the CPU target gives
    MultiHeadAttention, gives the whole CUDA form here: groups of one, rotary folded, q/k/v packed, shared buffer."""
    import sys

    from onnxpipe.export import export_decoder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", num_key_value_heads=4)
    export_decoder(hf, tmp_path / "exported")
    result = optimize_model(tmp_path / "exported", tmp_path / "cuda", level=3, target="cuda")
    assert result.check.passed and [p.status for p in result.passes if p.name == "attention"] == ["kept"]
    nodes = _gqa_nodes(tmp_path / "cuda")
    assert len(nodes) == 2
    for node in nodes:
        attrs = _attrs(node)
        assert attrs["num_heads"] == attrs["kv_num_heads"] == 4 and attrs["do_rotary"] == 1
        assert node.input[1] == node.input[2] == ""
    graph = json.loads((tmp_path / "cuda" / "onnxpipe.json").read_text())["graph"]
    assert graph["kv"]["shares_buffer"] and graph["padding_side"] == "right"


def test_rotary_not_folded_when_head_dim_is_not_a_multiple_of_16(tiny_hf, tmp_path):
    """Near miss: GroupQueryAttention's rotary needs head_dim % 16 == 0; with head_dim 8 the RotaryEmbedding ops
    stay, the op gets no caches, and the result still checks out (right padding, positions from seqlens)."""
    import sys

    from onnxpipe.export import export_decoder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    export_decoder(hf, tmp_path / "exported")
    optimize_model(tmp_path / "exported", tmp_path / "cuda", level=3, target="cuda")
    nodes = _gqa_nodes(tmp_path / "cuda")
    assert len(nodes) == 2 and all(_attrs(n)["do_rotary"] == 0 and len(n.input) == 7 for n in nodes)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "cuda" / "model.onnx")).graph.node]
    assert ops.count("RotaryEmbedding") == 4
    step = json.loads((tmp_path / "cuda" / "onnxpipe.json").read_text())["steps"][-1]
    assert step["check"]["passed"]


def test_a_cpu_form_graph_is_refused_on_cuda(tiny_onnx, tmp_path):
    """The CPU form's GroupQueryAttention takes an attention bias the CUDA kernel lacks: loading it for CUDA says
    what to do instead of failing mid-generation."""
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.runtime.providers import _refuse_cpu_attention_form

    graph = {"target": "cpu", "fused_ops": ["GroupQueryAttention", "RotaryEmbedding"]}
    with pytest.raises(OnnxpipeError, match="--target cuda"):
        _refuse_cpu_attention_form(Path("m/model.onnx"), graph, ["cuda", "cpu"])
    _refuse_cpu_attention_form(Path("m/model.onnx"), graph, ["cpu"])  # the CPU runs it
    _refuse_cpu_attention_form(Path("m/model.onnx"), {**graph, "target": "cuda"}, ["cuda", "cpu"])
    _refuse_cpu_attention_form(Path("m/model.onnx"), {"target": "cpu", "fused_ops": ["MultiHeadAttention"]},
                               ["cuda", "cpu"])


def test_parity_check_catches_a_wrong_cuda_form(tiny_onnx, tmp_path, monkeypatch):
    """The check can fail: a GroupQueryAttention that reads seqlens_k one short (the mask's sum minus 2) is
    rolled back, and the output has no fused attention."""
    from onnxpipe.fusion import attention

    real = attention.AttentionFusion._gqa_cuda

    def off_by_one(self, op, *args):
        out = real(self, op, *args)
        gqa = out[0].producer()
        gqa.replace_input_with(5, op.Sub(gqa.inputs[5], op.Constant(value=attention.ir.tensor(np.array(1, np.int32)))))
        return out

    monkeypatch.setattr(attention.AttentionFusion, "_gqa_cuda", off_by_one)
    optimize_model(tiny_onnx("llama"), tmp_path / "o", level=3, target="cuda")
    step = json.loads((tmp_path / "o" / "onnxpipe.json").read_text())["steps"][-1]
    report = next(p for p in step["passes"] if p["name"] == "attention")
    assert report["status"] == "rolled_back" and "parity failed" in report["reason"]
    assert not _gqa_nodes(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "onnxpipe.json").read_text())["graph"]["padding_side"] == "left"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scoring_a_right_padded_batch_equals_the_exported_graph(family, cuda_form, tiny_onnx):
    """The CUDA form's log-likelihoods of a right-padded ragged batch equal the exported graph's. gpt2 reads its
    positions from position_ids, which the scorer feeds."""
    from onnxpipe.score.scorer import WindowScorer

    rng = np.random.default_rng(0)
    windows = [(rng.integers(3, 250, size=n), 1) for n in (12, 5, 9)]
    ours = WindowScorer.open(cuda_form(family), "cpu")
    ref = WindowScorer.open(tiny_onnx(family), "cpu")
    assert ours.right_padded and ref.right_padded
    (ll, n, _), (ll_ref, n_ref, _) = ours.score(windows), ref.score(windows)
    assert list(n) == list(n_ref) == [11, 4, 8]
    np.testing.assert_allclose(ll, ll_ref, rtol=1e-5, atol=1e-4)


def test_cuda_graphs_need_the_cuda_form_and_the_cuda_ep(cuda_form, tiny_onnx):
    """CUDA graphs replay fixed shapes: a CPU-form graph is refused with a one-line reason; on a machine without
    the CUDA EP the CUDA form runs without them, says so, and generates the same tokens."""
    from onnxpipe.errors import OnnxpipeError

    with pytest.raises(OnnxpipeError, match="--target cuda"):
        load(tiny_onnx("llama"), "cpu", cuda_graph=True)
    said: list[str] = []
    lm = load(cuda_form("llama"), "cpu", cuda_graph=True, announce=said.append)
    manifest = json.loads((cuda_form("llama") / "onnxpipe.json").read_text())
    assert manifest["graph"]["kv"]["shares_buffer"] and manifest["graph"]["attention_mask_use"] == "row sums and width"
    if lm.provider == "cpu":
        assert not lm.session.cuda_graph and any("without them" in m for m in said)
    plain = load(cuda_form("llama"), "cpu")
    assert [r.token_ids for r in lm.generate(PROMPTS, max_new_tokens=8)] == \
        [r.token_ids for r in plain.generate(PROMPTS, max_new_tokens=8)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_graph_slots_without_graphs_give_the_same_tokens(family, cuda_form):
    """The CUDA-graph decode path minus the capture (fixed buffers per batch and capacity, the fixed-width mask,
    in-place input updates, the step head), driven on the CPU: same tokens as the plain path, greedy and sampled,
    and a second generation reuses the slot's buffers. gpt2: the slot's position_ids buffer feeds its learned
    positions."""
    plain = load(cuda_form(family), "cpu")
    slots = load(cuda_form(family), "cpu")
    slots.session.cuda_graph = True  # what a CUDA session with graphs does, minus the capture
    for opts in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}):
        want = [r.token_ids for r in plain.generate(PROMPTS, max_new_tokens=12, **opts)]
        assert [r.token_ids for r in slots.generate(PROMPTS, max_new_tokens=12, **opts)] == want
    assert [r.token_ids for r in slots.generate(PROMPTS[:1], max_new_tokens=12)] == \
        [r.token_ids for r in plain.generate(PROMPTS[:1], max_new_tokens=12)]
    runs = {key: slot.runs for key, slot in slots.session._graphs.items()}
    # capacity: the tiny models' 128 positions; gpt2's sampled third row ends on EOS at its 11th token, after 10 slot
    # steps: the last step runs its two other rows, reordered out of the slot's buffers, on the plain path
    batch3 = 2 * 11 if family == "llama" else 11 + 10
    assert runs[(3, 128)] == batch3 and runs[(1, 128)] == 11, runs


def test_quantizing_the_cuda_form_checks_it_right_padded(tmp_path, monkeypatch):
    """quantize keeps the input's padding side and feeds both sides of its decode-path check that way (an
    exported reference would be fed left-padded; a CUDA-form one padded left reads pad tokens as real); fp16 of the
    CUDA form of the trained llama-stdlib then passes the fp16 tolerance."""
    from onnxpipe import parity
    from onnxpipe.export import export_decoder
    from onnxpipe.quant import quantize_model

    seen = []
    real = parity.check_decoders

    def spy(*args, **kwargs):
        seen.append((kwargs.get("reference_padding_side", "left"), kwargs.get("padding_side", "left")))
        return real(*args, **kwargs)

    root = Path(__file__).resolve().parents[2]
    export_decoder(root / "models" / "llama-stdlib", tmp_path / "exported")
    result = optimize_model(tmp_path / "exported", tmp_path / "cuda", level=3, target="cuda")
    # each pass after the attention pass is checked against a right-padded reference: none is rolled back
    assert [p.name for p in result.passes if p.status == "rolled_back"] == []
    monkeypatch.setattr(parity, "check_decoders", spy)
    quantize_model(tmp_path / "cuda", tmp_path / "fp16", "fp16", max_eval_tokens=512)
    assert seen == [("right", "right")]
    manifest = json.loads((tmp_path / "fp16" / "onnxpipe.json").read_text())
    assert manifest["graph"]["padding_side"] == "right" and manifest["graph"]["kv"]["shares_buffer"]
    check = manifest["steps"][-1]["check"]
    assert check["passed"] and check["greedy_agreement"] == 1.0, check


@pytest.mark.parametrize("bounds, packs", [
    ([(0, 64), (64, 96), (96, 2**63 - 1)], True),   # phi3's export: q, k, v in order, the last slice open-ended
    ([(0, 64), (64, 96), (96, 128)], True),
    ([(0, 64), (96, 128), (64, 96)], False),        # k and v swapped: packing would feed v as k
    ([(0, 64), (64, 96), (100, 128)], False),       # a gap
    ([(0, 32), (64, 96), (96, 128)], False),        # q is not the whole query width
])
def test_sliced_qkv_packs_only_consecutive_slices(bounds, packs):
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from onnxpipe.fusion.attention import _sliced_qkv

    def const(name, v):
        return helper.make_tensor(name, TensorProto.INT64, [1], [v])

    inits, nodes = [const("axis", 2)], []
    for i, (a, b) in enumerate(bounds):
        inits += [const(f"s{i}", a), const(f"e{i}", b)]
        nodes.append(helper.make_node("Slice", ["qkv", f"s{i}", f"e{i}", "axis"], [f"out{i}"]))
    nodes.append(helper.make_node("Concat", ["out0", "out1", "out2"], ["y"], axis=2))  # one reader each
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 3, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(helper.make_model(graph))
    values = {v.name: v for n in model.graph for v in n.outputs}
    got = _sliced_qkv(values["out0"], values["out1"], values["out2"], 64, 32)
    assert (got is not None and got.name == "qkv") == packs


@pytest.mark.parametrize("split, order, packs", [
    (None, (0, 1, 2), True),                 # GPT-2's export: Split(num_outputs=3), equal thirds
    ([64, 64, 64], (0, 1, 2), True),
    (None, (0, 2, 1), False),                # k and v swapped: packing would feed v as k
    ([64, 32, 96], (0, 1, 2), False),        # not q | k | v widths
])
def test_split_qkv_packs_only_an_in_order_split(split, order, packs):
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from onnxpipe.fusion.attention import _split_qkv

    inits, inputs = [], ["qkv"]
    if split is not None:
        inits.append(helper.make_tensor("sizes", TensorProto.INT64, [3], split))
        inputs.append("sizes")
    attrs = {"num_outputs": 3} if split is None else {}
    nodes = [helper.make_node("Split", inputs, ["out0", "out1", "out2"], axis=2, **attrs),
             helper.make_node("Concat", ["out0", "out1", "out2"], ["y"], axis=2)]  # one reader each
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 3, 192])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    values = {v.name: v for n in model.graph for v in n.outputs}
    q, k, v = (values[f"out{i}"] for i in order)
    got = _split_qkv(q, k, v, 64, 64)
    assert (got is not None and got.name == "qkv") == packs
