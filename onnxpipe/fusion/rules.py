"""The rule registry and what a pass knows about the model it rewrites.

Every rewrite rule the fusion passes use is registered here under a name, so a test can prove that each one has
a unit test of its own (tests/fusion/test_registry.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import onnx_ir as ir

TARGETS = ("cpu", "cuda")

# rule name -> the onnxscript rewrite rules it stands for (one name may cover a few pattern variants)
RULES: dict[str, list[Any]] = {}
COMMUTE: set[str] = set()  # rules matched with every operand order of their commutative ops


def register(name: str, *rules: Any, commute: bool = False) -> list[Any]:
    if name in RULES:
        raise ValueError(f"rule {name!r} registered twice")
    RULES[name] = list(rules)
    if commute:
        COMMUTE.add(name)
    return RULES[name]


@dataclass
class PassContext:
    """What a pass may read: the manifest's model section, the target EP, and notes it leaves for the manifest."""

    model_info: dict[str, Any]
    target: str = "cpu"
    dtype: str = "fp32"
    graph_notes: dict[str, Any] = field(default_factory=dict)  # merged into the manifest's graph section

    @property
    def num_layers(self) -> int:
        return int(self.model_info["num_layers"])


def apply_rules(model: ir.Model, names: list[str]) -> dict[str, int]:
    """Apply the named rules in order; returns how often each one fired."""
    from onnxscript.rewriter import pattern

    counts = {}
    for name in names:
        ruleset = pattern.RewriteRuleSet(RULES[name], commute=name in COMMUTE)
        counts[name] = int(ruleset.apply_to_model(model))
    return counts


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new constant ``name`` registered as an initializer of ``graph``; the value a rewrite feeds its nodes."""
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def count_ops(model: ir.Model, *op_types: str) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type in op_types)


_CURRENT: list[PassContext] = []


@contextlib.contextmanager
def using_context(ctx: PassContext) -> Iterator[PassContext]:
    """Rules read the model's dimensions from the manifest through current_context() while a pass runs."""
    _CURRENT.append(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.pop()


def current_context() -> PassContext:
    if not _CURRENT:
        raise RuntimeError("fusion rules need a PassContext: apply them inside rules.using_context(ctx)")
    return _CURRENT[-1]
