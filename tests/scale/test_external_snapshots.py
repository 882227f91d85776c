"""optimize on an input whose weights are external data (every 7-8B export): the weights stay memory-mapped from
the input's data file, snapshots share them, no pass is rolled back for it, nothing is written beside the input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from onnxpipe.fusion import optimize_model


def _externalize(src: Path, dst: Path) -> None:
    """``src`` with every initializer (small ones too) in one external data file, as large exports are."""
    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    onnx.save_model(model, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    manifest = json.loads((dst / "onnxpipe.json").read_text())
    manifest["graph"]["external_data"] = "model.onnx.data"
    (dst / "onnxpipe.json").write_text(json.dumps(manifest))


def test_an_external_data_input_is_optimized_and_checked(tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    import onnxpipe.artifact as artifact

    src = tmp_path / "in"
    _externalize(tiny_onnx("llama"), src)
    before = {f.name: f.stat().st_mtime_ns for f in src.iterdir()}
    monkeypatch.setattr(artifact, "EXTERNAL_DATA_THRESHOLD", 0)  # the output too, as past 1.8 GB
    seen: list[tuple[str, int, int]] = []
    result = optimize_model(src, tmp_path / "out", level=3, progress=lambda *a: seen.append(a))
    n = len(result.passes)
    assert seen == [("optimize passes", i, n) for i in range(1, n + 1)]  # the progress bar counts the passes
    rolled_back = [(r.name, r.reason) for r in result.passes if r.status == "rolled_back"]
    assert rolled_back == []
    kept = {r.name for r in result.passes if r.status == "kept"}
    assert {"norms", "rotary", "attention"} <= kept and result.check.passed
    assert (tmp_path / "out" / "model.onnx.data").is_file()
    assert result.model_dir.manifest.graph["external_data"] == "model.onnx.data"
    assert {f.name: f.stat().st_mtime_ns for f in src.iterdir()} == before  # the input is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no snapshot files, no temporary dirs
