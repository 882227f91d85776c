"""Level 1: graph cleanup that changes no op's meaning.

Constant folding, shape-subgraph simplification, identity/dead-node removal, common-subexpression elimination and
initializer deduplication, all from onnx_ir's common passes and onnxscript's optimizer and rewrite rules.
torch's dynamo exporter already runs onnxscript's optimizer, so on a fresh export these passes mostly find
nothing; they matter after hand edits, other exporters, or the later fusions (which leave dead shape subgraphs).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxpipe.fusion.rules import PassContext


def fold_constants(model: ir.Model, ctx: PassContext) -> dict[str, int]:
    import onnxscript.optimizer as optimizer

    optimizer.fold_constants(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return {}


def simplify_shapes(model: ir.Model, ctx: PassContext) -> dict[str, int]:
    """Shape arithmetic the exporter leaves behind (Shape -> Slice -> Concat -> Reshape chains), then the
    default onnxscript rewrite rules (no-op Reshape/Expand/Cast, collapsed Slices)."""
    from onnxscript import rewriter
    from onnxscript.rewriter.ort_fusions import shape_optimization

    common_passes.ShapeInferencePass()(model)
    count = shape_optimization.rules.apply_to_model(model)
    rewriter.rewrite(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return {"shape rewrites": int(count)}


def remove_dead_nodes(model: ir.Model, ctx: PassContext) -> dict[str, int]:
    common_passes.IdentityEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    return {}


def eliminate_common_subexpressions(model: ir.Model, ctx: PassContext) -> dict[str, int]:
    common_passes.CommonSubexpressionEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return {}


def deduplicate_initializers(model: ir.Model, ctx: PassContext) -> dict[str, int]:
    before = len(model.graph.initializers)
    common_passes.DeduplicateInitializersPass()(model)
    return {"initializers removed": before - len(model.graph.initializers)}


def tidy(model: ir.Model, ctx: PassContext) -> dict[str, int]:
    """After the fusions: per-layer copies of the same small subgraphs (seqlens_k, the attention bias) become one."""
    import onnxscript.optimizer as optimizer

    optimizer.fold_constants(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    return {}


def infer_shapes(model: ir.Model, ctx: PassContext) -> None:
    """The fusions' checks read value shapes; refresh them before each fusion pass."""
    common_passes.ShapeInferencePass()(model)
