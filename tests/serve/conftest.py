"""Serving fixtures: the in-repo reference model (models/llama-stdlib) exported once per session, with a chat
template whose end-of-turn token is its <|endoftext|> (id 0), so chats stop where the template says."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = (  # the model writes Python: a user message is code to continue, a reply ends with <|endoftext|>
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '# ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ m['content'] }}{% if add_generation_prompt and loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def stdlib_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/llama-stdlib exported (fp32, concat KV cache), plus chat_template.jinja."""
    from onnxpipe.export import export_decoder

    out = tmp_path_factory.mktemp("serve") / "llama-stdlib"
    export_decoder(REPO / "models" / "llama-stdlib", out, verify=False)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def stdlib_lm(stdlib_model: Path):
    from onnxpipe.runtime.generate import load

    return load(stdlib_model, "cpu", threads=1)


@pytest.fixture(scope="session")
def stdlib_cuda_model(stdlib_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model through `optimize --target cuda` (a shared KV buffer read by row sums), which runs on the CPU
    too: the form the slot layout serves."""
    import shutil

    from onnxpipe.fusion import optimize_model

    out = tmp_path_factory.mktemp("serve-cuda") / "llama-stdlib"
    optimize_model(stdlib_model, out, level=3, target="cuda", verify=False)
    shutil.copy(stdlib_model / "chat_template.jinja", out / "chat_template.jinja")
    return out


def iterate(sched) -> None:
    """One iteration of the scheduler's loop (``BatchLoop._loop``'s steps) on this thread."""
    with sched._cond:
        allowance = sched.budget.iteration(decoding=bool(sched._running))
        if sched._waiting:
            sched._admit(sched.budget.chunk or 16)
    sched._drop_cancelled()
    sched._prefill(allowance)
    if sched._running:
        sched._decode_step()


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The concat scheduler's decode steps slowed by 20 ms, so streams run on while a test does something else."""
    import time

    from onnxpipe.serve.scheduler import ConcatScheduler

    step = ConcatScheduler._decode_step

    def slow_step(self):
        time.sleep(0.02)
        step(self)

    monkeypatch.setattr(ConcatScheduler, "_decode_step", slow_step)
