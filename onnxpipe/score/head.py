"""The log-softmax over the vocabulary on the device that holds the logits (WindowScorer's device head)."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpipe.runtime.sessions import Provider, open_session


class LogitsHead:
    """log p(target) and argmax == target for chosen rows of the logits, computed by a small onnxruntime graph on
    the device that holds them. The model session's logits stay on its device (IO binding) and only two numbers
    per scored token come back: on a GPU the [tokens x vocab] logits never cross the bus and the log-softmax
    runs there, not in single-threaded numpy. fp32 arithmetic, max-shifted log-sum-exp."""

    def __init__(self, model_session: Any, logits_name: str, device: str = "cpu", threads: int | None = None):
        self.model_session = model_session
        self.logits_name = logits_name
        self.device = device
        out = next(o for o in model_session.get_outputs() if o.name == logits_name)
        providers: list[Provider] = [("cuda", {"device_id": "0"})] if device == "cuda" else []
        # a CUDA EP that does not start is an error here, which WindowScorer.open turns into the host head, said once
        self.session = open_session(_head_graph("float16" in out.type), providers + ["cpu"], threads=threads,
                                    purpose="the scoring log-softmax", name="score_head")

    def run(self, feed: dict[str, np.ndarray], index: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """index: rows of the logits flattened to [batch * width, vocab]; target: the token each row predicts."""
        io = self.model_session.io_binding()
        for name, value in feed.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.logits_name, self.device, 0)
        self.model_session.run_with_iobinding(io)
        head = self.session.io_binding()
        head.bind_ortvalue_input("logits", io.get_outputs()[0])
        head.bind_cpu_input("index", np.ascontiguousarray(index, np.int64))
        head.bind_cpu_input("target", np.ascontiguousarray(target, np.int64))
        head.bind_output("logprob")
        head.bind_output("greedy")
        self.session.run_with_iobinding(head)
        logprob, greedy = head.copy_outputs_to_cpu()
        return logprob.astype(np.float64), greedy


def _head_graph(fp16: bool) -> bytes:
    """logits [B, W, V], index [N], target [N] -> logprob [N] (float), greedy [N] (bool)."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    nodes = [
        const("last", [-1]),
        helper.make_node("Flatten", ["logits"], ["flat"], axis=2),  # [B * W, V]
        helper.make_node("Gather", ["flat", "index"], ["rows"], axis=0),  # [N, V]
        helper.make_node("Cast", ["rows"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["x", "last"], ["peak"], keepdims=1),
        helper.make_node("Sub", ["x", "peak"], ["shifted"]),
        helper.make_node("Exp", ["shifted"], ["e"]),
        helper.make_node("ReduceSum", ["e", "last"], ["sum"], keepdims=1),
        helper.make_node("Log", ["sum"], ["lse"]),  # log-sum-exp less the peak, [N, 1]
        helper.make_node("Unsqueeze", ["target", "last"], ["target_col"]),
        helper.make_node("GatherElements", ["shifted", "target_col"], ["picked"], axis=1),
        helper.make_node("Sub", ["picked", "lse"], ["logprob_col"]),
        helper.make_node("Squeeze", ["logprob_col", "last"], ["logprob"]),
        helper.make_node("ArgMax", ["x"], ["argmax"], axis=-1, keepdims=0),  # first maximum, as numpy's argmax
        helper.make_node("Equal", ["argmax", "target"], ["greedy"]),
    ]
    graph = helper.make_graph(
        nodes, "score_head",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT, ["B", "W", "V"]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("target", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logprob", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("greedy", TensorProto.BOOL, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()

