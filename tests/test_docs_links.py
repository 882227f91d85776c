"""Every relative link in README.md and docs/*.md points at a file that exists (and, for `page.md#anchor`, at a
heading of that page); raw run results live in benchmarks/results/, not in docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans, where brackets are not links."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text(encoding="utf-8")))


def _broken(page: Path) -> list[str]:
    bad = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert _broken(page) == []


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n", encoding="utf-8")
    page.write_text(
        "# Top\n[ok](there.md) [ok too](there.md#a-heading) [self](#top) [web](https://example.org)\n"
        "[gone](missing.md) [bad anchor](there.md#nope)\n`[not a link](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert _broken(page) == ["missing.md: no such file", "there.md#nope: no heading with that anchor"]


def test_slugs_follow_github():
    assert _slug("GPU decode: onnxpipe against PyTorch, torch.compile and ORT GenAI") == (
        "gpu-decode-onnxpipe-against-pytorch-torchcompile-and-ort-genai")
    assert _slug("Why the CUDA EP's attention kernels are pinned") == "why-the-cuda-eps-attention-kernels-are-pinned"
    assert _slug("Why pack_projections is opt-in") == "why-pack_projections-is-opt-in"
    assert _slug("Why prefills are captured only up to 4,096 tokens") == "why-prefills-are-captured-only-up-to-4096-tokens"


# a path of this repository named in the prose or code of a page: it must exist, so a page follows a file's move
PATH = re.compile(r"(?<![\w/~.-])((?:onnxpipe|scripts|tests|benchmarks|docs)/[\w./*{},-]*)")
# the dotted name of a module and what it defines, e.g. onnxpipe.quant.quantize_model
DOTTED = re.compile(r"(?<![\w.])onnxpipe((?:\.[A-Za-z_]\w*)+)")
# cited for history only (the page says where git keeps it)
REMOVED = {"scripts/smollm2_static_diagnosis.py", "scripts/agreement_diag.py", "scripts/sweep_smoothquant_alpha.py",
           "scripts/gpu_runtime_check.py", "scripts/gpu_graph_check.py", "tests/fusion/cuda_optimize_check.py"}


def _stale_names(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    named = {m.rstrip(".,-") for m in PATH.findall(text)}
    bad = [f"{m}: no such path" for m in sorted(named)
           if m not in REMOVED and not (REPO / m).exists() and not any(c in m for c in "*{")]
    for rest in sorted(set(DOTTED.findall(text))):
        parts = rest.strip(".").split(".")
        if parts == ["json"]:  # onnxpipe.json, the manifest
            continue
        # the longest prefix that is a module or package; at most one name may follow it (a function, a class)
        depth = 0
        for i in range(1, len(parts) + 1):
            base = REPO / "onnxpipe" / Path(*parts[:i])
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                depth = i
        if len(parts) - depth > 1:
            bad.append(f"onnxpipe{rest}: no module onnxpipe.{'.'.join(parts[:depth + 1])}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_files_and_modules_exist(page):
    assert _stale_names(page) == []


def test_the_name_checker_sees_a_moved_module(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("`onnxpipe/cli.py` `scripts/gone.py` ~/.cache/onnxpipe/gguf/x `onnxpipe.quant.quantize_model`\n"
                    "`onnxpipe.json` `onnxpipe.nowhere.thing.score` `benchmarks/results/*.json`\n", encoding="utf-8")
    assert _stale_names(page) == ["scripts/gone.py: no such path",
                                  "onnxpipe.nowhere.thing.score: no module onnxpipe.nowhere"]


def test_no_raw_results_in_docs():
    raw = sorted(p.name for p in (REPO / "docs").iterdir() if p.suffix in {".json", ".txt", ".jsonl", ".csv"})
    assert raw == [], f"raw run results belong in benchmarks/results/: {raw}"
