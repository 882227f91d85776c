"""The `onnxpipe` command: a thin click layer over the library. Parse, call, print; no logic of its own."""

from __future__ import annotations

import atexit
import gc
import math
import os
import sys
import time
from pathlib import Path

import click

from onnxpipe import __version__
from onnxpipe.cli_types import MAX_REPEATS, MAX_REPETITION_PENALTY, Threads, finite
from onnxpipe.errors import OnnxpipeError


# optional packages and the setup.cfg extra that installs each (the core runs model directories without them)
EXTRA_OF = {"torch": "export", "transformers": "export", "gguf": "gguf", "accelerate": "gguf", "ray": "ray",
            "pyarrow": "ray", "onnxruntime": "cpu"}


class OnnxpipeGroup(click.Group):
    """Turns the library's errors into one line and a non-zero exit; a traceback only with --debug."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except OnnxpipeError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except ModuleNotFoundError as e:  # the core install has no torch/transformers; say which extra brings it
            extra = EXTRA_OF.get((e.name or "").split(".")[0])
            if extra is None or _debug(ctx):
                raise
            raise click.ClickException(f"{ctx.invoked_subcommand} needs {e.name}, which is not installed: "
                                       f"pip install 'onnxpipe[{extra}]'") from None
        except Exception as e:
            if _debug(ctx):
                raise
            raise click.ClickException(
                f"unexpected {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                "(run with --debug for the traceback)"
            ) from None


def _debug(ctx: click.Context) -> bool:
    return bool(os.environ.get("ONNXPIPE_DEBUG")) or bool((ctx.obj or {}).get("debug"))


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(cls=OnnxpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxpipe")
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Hugging Face decoder-only LLM -> fast, verified ONNX model, and its runtime."""
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("hf_model_dir", metavar="HF_DIR_OR_GGUF", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True, help="ONNX opset of the default domain.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch.")
@click.option("--decode-steps", type=click.IntRange(3, 64), default=4, show_default=True, help="Decode steps in the parity check.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and onnxpipe wrote it (holds onnxpipe.json, or is empty).")
@click.option("--method", type=click.Choice(["auto", "traced", "stamped"]), default="auto", show_default=True,
              help="stamped: trace one layer, stamp it to depth and stream the weights from the safetensors "
                   "(llama, mistral, qwen2, qwen3, granite, olmo2, stablelm, starcoder2; checked on a truncated "
                   "model); traced: load and trace the whole model; auto: stamped where it applies.")
def export(hf_model_dir: Path, out_dir: Path, dtype: str, opset: int, no_verify: bool, decode_steps: int, force: bool,
           method: str) -> None:
    """Export a Hugging Face model directory to ONNX with KV-cache inputs/outputs, checked against PyTorch.

    HF_DIR_OR_GGUF may also be a GGUF file (or a directory holding exactly one): it is dequantized once into a
    cached Hugging Face directory, and the GGUF and its quantization type are recorded in the manifest.
    """
    from onnxpipe.export import export_model

    result = export_model(
        hf_model_dir, out_dir, method=method, dtype=dtype, opset=opset, verify=not no_verify, force=force,
        decode_steps=decode_steps, log=_log, progress=_progress_bars(),
    )
    click.echo(f"wrote {result.model_dir.path} in {result.seconds:.1f}s")
    # when the process ends, the collector's last pass over torch.export's objects took 3.4-6 s of a tiny export's
    # exit (0.3-0.6 s with them frozen; 2-core CPU); at exit only, so a caller in the same process keeps its collector
    atexit.register(gc.freeze)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
def inspect(model_dir: Path) -> None:
    """Print a model directory's manifest summary, op-type histogram, size and I/O signature."""
    from onnxpipe.inspect import format_inspection, inspect_model_dir

    click.echo(format_inspection(inspect_model_dir(model_dir)))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Results: .jsonl or .parquet (with --engine ray: a directory of that name holding part files).")
@click.option("--task", type=click.Choice(["perplexity", "loglik", "generate"]), default="perplexity", show_default=True,
              help="loglik adds `greedy` (every scored token was the argmax); generate: greedy text per prompt.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True, help="For --task generate.")
@click.option("--batch-tokens", type=click.IntRange(1), default=4096, show_default=True,
              help="Slots per batch (batch size x longest window, padding included).")
@click.option("--max-padding", type=finite(0.0, 1.0, high_open=True), default=0.2, show_default=True,
              help="Most padding a batch may hold, as a fraction of its slots.")
@click.option("--stride", type=click.IntRange(1), default=None, help="Sliding-window stride for long records [context/2].")
@click.option("--max-context", type=click.IntRange(2), default=None, help="Window length [the model's context].")
@click.option("--chunk-records", type=click.IntRange(1), default=512, show_default=True,
              help="Records per durable chunk (what a kill can lose).")
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--threads", type=Threads(), default=None, help="onnxruntime threads per session.")
@click.option("--on-bad-record", type=click.Choice(["skip", "fail"]), default="skip", show_default=True)
@click.option("--max-record-chars", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="A record with more characters of text (or token ids) is a bad record.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same OUTPUT.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--num-workers", type=click.IntRange(1), default=None,
              help="Ray workers [one per GPU with cuda, else the cluster's CPUs / threads].")
@click.option("--ray-address", default=None, help="Ray cluster to join [$RAY_ADDRESS, else a local instance].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def score(model_dir: Path, input_path: Path, output: Path, task: str, max_new_tokens: int, batch_tokens: int, max_padding: float,
          stride: int | None, max_context: int | None, chunk_records: int, provider: str, threads: int | None,
          on_bad_record: str, resume: bool, force: bool, engine: str, num_workers: int | None,
          ray_address: str | None, no_progress: bool, max_record_chars: int) -> None:
    """Score every record of INPUT (JSONL/Parquet: text, prompt+completion or input_ids) with MODEL_DIR."""
    from onnxpipe.score import ScoreConfig, score as run_score

    config = ScoreConfig(task=task, batch_tokens=batch_tokens, max_padding=max_padding, stride=stride,
                         max_context=max_context, chunk_records=chunk_records, on_bad_record=on_bad_record,
                         provider=provider, threads=threads, resume=resume, force=force, progress=not no_progress,
                         engine=engine, num_workers=num_workers, ray_address=ray_address,
                         max_new_tokens=max_new_tokens, max_record_chars=max_record_chars)
    try:
        summary = run_score(model_dir, input_path, output, config, log=_log)
    except KeyboardInterrupt:  # the chunks already checkpointed are kept: say so, unlike other commands
        _log(f"interrupted; the records scored so far are kept in {output}: rerun with --resume to continue")
        sys.exit(130)
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.argument("in_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@click.option("--level", type=click.IntRange(1, 3), default=3, show_default=True,
              help="1: cleanup; 2: + norms, GELU, rotary, experts (MoE); 3: + fused attention with the KV cache.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Execution provider the fused forms are chosen for.")
@click.option("--passes", default=None, help="Comma-separated pass names to run instead of a level's list.")
@click.option("--skip-verify", is_flag=True, help="Skip the per-pass and final parity checks.")
@click.option("--check-form", type=click.Choice(["auto", "whole", "layerwise"]), default="auto", show_default=True,
              help="Run each check's sides as whole-model sessions, or one layer at a time (peak memory ~ one "
                   "layer's weights); auto: layerwise from 1 GB of weights.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and onnxpipe wrote it (holds onnxpipe.json, or is empty).")
def optimize(in_dir: Path, out_dir: Path, level: int, target: str, passes: str | None, skip_verify: bool,
             check_form: str, force: bool) -> None:
    """Optimize a model directory's graph; each pass is counted, checked against its input, and rolled back if it
    breaks equivalence."""
    from onnxpipe.fusion import format_table, optimize_model

    names = [n.strip() for n in passes.split(",") if n.strip()] if passes is not None else None
    result = optimize_model(in_dir, out_dir, level=level, target=target, passes=names, verify=not skip_verify,
                            force=force, check_form=check_form, log=_log, progress=_progress_bars())
    click.echo(format_table(result))
    click.echo(f"wrote {result.model_dir.path} in {result.seconds:.1f}s")


@main.command(context_settings={"allow_extra_args": True})  # a stray word gets a hint, not click's bare refusal
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="File of prompts: one per line, or .jsonl with {\"prompt\": ...}.")
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=finite(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 is off.")
@click.option("--top-p", type=finite(0, 1, low_open=True), default=1.0, show_default=True)
@click.option("--repetition-penalty", type=finite(1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY), default=1.0,
              show_default=True, help="1 is off; above 1 discourages tokens already seen.")
@click.option("--repeat-ngram-limit", type=click.IntRange(2), default=None, help="Cut a loop once an n-gram repeats this often.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable; \\n and \\t are understood).")
@click.option("--num-beams", type=click.IntRange(1), default=1, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--threads", type=Threads(), default=None, help="CPU threads (default: onnxruntime's).")
@click.option("--trt-cache", type=click.Path(path_type=Path), default=None, help="TensorRT engine/timing cache directory.")
@click.option("--jsonl", is_flag=True, help="One JSON object per prompt instead of text.")
@click.option("--cuda-graph", is_flag=True,
              help="Replay decode steps as CUDA graphs (CUDA EP; graphs from optimize --target cuda).")
@click.option("--chat", is_flag=True,
              help="Each prompt is a user message through the model's chat template; stop at its end-of-turn token.")
@click.option("--system", default=None, help="With --chat: a system message before each prompt.")
def generate(model_dir: Path, prompt_texts: tuple[str, ...], prompts_file: Path | None, provider: str, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, repetition_penalty: float, repeat_ngram_limit: int | None,
             stop_strings: tuple[str, ...], num_beams: int, seed: int | None, batch_size: int, threads: int | None,
             trt_cache: Path | None, jsonl: bool, cuda_graph: bool, chat: bool, system: str | None) -> None:
    """Generate text from a model directory; a single prompt streams as it is generated."""
    import json

    from onnxpipe.runtime.generate import load, read_prompts, unescape
    from onnxpipe.runtime.providers import TensorRTOptions

    stray = click.get_current_context().args
    if stray:  # `generate DIR "text"` or `generate DIR --chat "text"`: the text was meant as the prompt
        raise click.UsageError(f"unexpected argument {stray[0]!r}: a prompt goes after --prompt "
                               f"(onnxpipe generate DIR{' --chat' if chat else ''} --prompt TEXT)")
    if bool(prompt_texts) == bool(prompts_file):
        raise click.UsageError("give --prompt TEXT or --prompts FILE (one of them)")
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    prompts = list(prompt_texts) if prompt_texts else read_prompts(prompts_file)
    lm = load(model_dir, provider, threads=threads, announce=_log, cuda_graph=cuda_graph,
              trt_options=TensorRTOptions(cache_dir=trt_cache) if trt_cache else None)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, repeat_ngram_limit=repeat_ngram_limit,
                   stop_strings=[unescape(s) for s in stop_strings], num_beams=num_beams, seed=seed)
    inputs: list = list(prompts)
    if chat:  # token ids through the model's template, stopping at its end-of-turn token
        from onnxpipe.serve.console import conversation

        inputs = [lm.chat_prompt(conversation(p, system)) for p in prompts]
        options["stop_token_ids"] = lm.chat_stop_ids()
    if len(prompts) == 1 and not jsonl and num_beams == 1:
        for piece in lm.stream(inputs[0], **options):
            click.echo(piece.text, nl=False)
        click.echo()
        return
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        results = lm.generate(inputs[start:start + batch_size], **options)
        for i, (prompt, res) in enumerate(zip(chunk, results), start):
            if jsonl:
                click.echo(json.dumps({"index": i, "prompt": prompt, "text": res.text, "token_ids": res.token_ids,
                                       "finish_reason": res.finish_reason}, ensure_ascii=False))
            else:
                click.echo(res.text if len(prompts) == 1 else f"[{i}] {res.text}")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--system", default=None, help="A system message at the head of the conversation.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True, help="Per reply.")
@click.option("--temperature", type=finite(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 is off.")
@click.option("--top-p", type=finite(0, 1, low_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--threads", type=Threads(), default=None, help="CPU threads (default: onnxruntime's).")
def chat(model_dir: Path, provider: str, system: str | None, max_new_tokens: int, temperature: float, top_k: int,
         top_p: float, seed: int | None, threads: int | None) -> None:
    """Chat with a model on the terminal: each line read is a user message, answered through the model's chat
    template with the conversation so far (/reset starts over; end of input ends it)."""
    import sys

    from onnxpipe.runtime.generate import load
    from onnxpipe.serve.console import run_console, terminal_lines

    lm = load(model_dir, provider, threads=threads, announce=_log)
    lm.chat_prompt([{"role": "user", "content": "x"}])  # no template: one line now, not after the first message

    def write(text: str) -> None:
        click.echo(text, nl=False)
        sys.stdout.flush()

    terminal = sys.stdin.isatty() and sys.stdout.isatty()  # a person at a terminal: a prompt, line editing, a hint
    if terminal:
        _log("type a message and Enter; /reset starts over, Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at the prompt) ends")
    try:
        run_console(lm, terminal_lines() if terminal else sys.stdin, write, _log, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed)
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the console; a chat writes no file: no "nothing was written"
        sys.exit(130)


def _prefill_chunk(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    from onnxpipe.serve.budget import AUTO, PrefillBudget

    try:
        return PrefillBudget.parse(value).chunk or AUTO
    except OnnxpipeError as e:
        raise click.BadParameter(str(e)) from None


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True, help="Requests decoded together.")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests waiting for a batch place; more are answered 429.")
@click.option("--prefill-chunk", default="auto", show_default=True, callback=_prefill_chunk,
              help="Prompt tokens prefilled between two decode steps of the running batch, or auto: sized from the "
                   "measured step and prefill times so that a step with a chunk takes at most 1.5x a decode step "
                   "(short prompts read whole).")
@click.option("--model-name", default=None, help="The model id clients name [the directory's name].")
@click.option("--threads", type=Threads(), default=None, help="CPU threads (default: onnxruntime's).")
@click.option("--cuda-graph", is_flag=True, help="Replay decode steps as CUDA graphs (CUDA EP, optimize --target cuda).")
@click.option("--max-length", type=click.IntRange(2), default=None,
              help="Tokens (prompt + reply) each fixed row holds, for a graph of optimize --target cuda [2048].")
@click.option("--prefill-group", type=click.IntRange(1), default=None,
              help="Whole prompts read together in one run into adjacent fixed rows (optimize --target cuda) [1: each "
                   "its own]. Exact on the CPU; on a GPU a batched run may round differently; with 8, 32 streams on an "
                   "H100 got 72-83% of the offline batch's tokens/s, against 65% with 1 (docs/serve.md).")
@click.option("--chunk-graphs/--no-chunk-graphs", default=None,
              help="Long prompts' chunks replayed as CUDA graphs at fixed widths (with --cuda-graph) [off; on an H100 "
                   "exact, and running streams' p99 beside 4k-token prompts 6.2-6.8 ms against 6.8-13.6].")
@click.option("--chunk-lane", is_flag=True,
              help="Long prompts' chunks read inside the running batch's decode steps, one run for both (with "
                   "--cuda-graph and --chunk-graphs; a second session of the graph sharing the weights' device memory; "
                   "on an H100 the streams' p99 beside 4k-token prompts 2.6-3.4x their quiet p50, against 4.1x) [off].")
def serve(model_dir: Path, host: str, port: int, provider: str, max_batch: int, max_queue: int, prefill_chunk: int | str,
          model_name: str | None, threads: int | None, cuda_graph: bool, max_length: int | None,
          prefill_group: int | None, chunk_graphs: bool | None, chunk_lane: bool) -> None:
    """Serve a model directory over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health), with requests joining and leaving the running batch at every decode step."""
    from onnxpipe.serve.address import check_address
    from onnxpipe.serve.app import serve_forever

    check_address(host, port)  # before the model load: uvicorn finds a bad host or a taken port only when it binds
    serve_forever(model_dir, host=host, port=port, provider=provider, max_batch=max_batch, max_queue=max_queue,
                  prefill_chunk=prefill_chunk, model_name=model_name, threads=threads, cuda_graph=cuda_graph,
                  max_length=max_length, announce=_log, prefill_group=prefill_group, chunk_graphs=chunk_graphs,
                  chunk_lane=chunk_lane or None)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes, comma-separated (e.g. 1,8,32).")
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1, MAX_REPEATS), default=3, show_default=True, help="Timed runs per batch size (after one untimed).")
@click.option("--threads", type=Threads(), default=None, help="CPU threads (default: onnxruntime's).")
@click.option("--cuda-graph", is_flag=True, help="Replay decode steps and prefills as CUDA graphs (CUDA EP).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
def bench(model_dir: Path, provider: str, batches: str, prompt_tokens: int, new_tokens: int, repeats: int,
          threads: int | None, cuda_graph: bool, json_path: Path | None) -> None:
    """Time greedy generation of a model directory: prefill ms, decode ms/step, tokens/s per batch size."""
    from onnxpipe.runtime.bench import bench as run_bench
    from onnxpipe.runtime.bench import check_json_output, render, write_json_output
    from onnxpipe.runtime.generate import load

    try:
        sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"{batches!r} is not a comma-separated list of integers", param_hint="--batch") from None
    if json_path is not None:
        check_json_output(json_path, model_dir)
    lm = load(model_dir, provider, threads=threads, announce=_log, cuda_graph=cuda_graph)
    rows = run_bench(lm, sizes, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
    click.echo(render(rows))
    if json_path is not None:
        import time

        import onnxruntime

        write_json_output(json_path, {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                      "onnxruntime": onnxruntime.__version__,
                                      "model_dir": str(model_dir), "provider": lm.provider,
                                      "cuda_graph": bool(lm.session.cuda_graph), "rows": [r.as_dict() for r in rows]})


@main.command()
@click.argument("in_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@click.option("--mode", type=click.Choice(["dynamic", "static", "int4", "fp16"]), required=True,
              help="dynamic: int8 weights, run-time activations; static: int8 QDQ, calibrated; int4: weight-only MatMulNBits (from an fp32 directory, or an fp16 one for the GPU); "
                   "fp16: mixed precision for GPUs.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration text or JSONL (static; int4 --algo gptq; dynamic --activations auto, "
                   "where data/calibration.txt is the default).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="static: activation range calibrator. [default: chosen: minmax per-channel; the same with "
                   "--smoothquant auto; percentile per-channel with --smoothquant auto; that with 16, then 32 layers "
                   "fp32; the first within --max-ppl-increase on held-out eval text; --method, --per-channel/"
                   "--per-tensor, --smoothquant and --static-float-layers pin what they name]")
@click.option("--per-channel/--per-tensor", "per_channel", default=None,
              help="static: one weight scale per output channel, or one per tensor (dynamic always is per channel). "
                   "[default: chosen, see --method]")
@click.option("--static-float-layers", type=click.IntRange(0, None), default=None, metavar="N",
              help="static: leave the N linear layers whose calibrated input range is widest in fp32 (opt-in; "
                   "for models with massive activations, e.g. SmolLM2's down_proj inputs). [default: chosen, see --method]")
@click.option("--activations", type=click.Choice(["auto", "token", "tensor"]), default="auto", show_default=True,
              help="dynamic: one run-time activation scale per token (no scale depends on the rest of the batch), "
                   "per tensor (one scale over the whole padded batch: batch-dependent), or auto: per token, with the "
                   "layers that hurt the model's output most (measured one at a time) left in fp32, the fewest of "
                   "1-64 that keep perplexity on held-out calibration prefills within 0.5% "
                   "(data/calibration.txt unless --calibration).")
@click.option("--smoothquant", "smoothquant", default=None, metavar="ALPHA|auto|off", callback=lambda c, p, v: _alpha(v),
              help="static, dynamic: migrate activation outliers into weights first (alpha in (0, 1], 0.5 is usual); "
                   "static also takes auto: one alpha per smoothing group, chosen by that group's int8 output error on "
                   "calibration windows its scales and ranges were not fitted on; off pins none (static chooses otherwise).")
@click.option("--block-size", type=int, default=None,
              help="int4: weights per scale along the input axis (a power of two >= 16, as MatMulNBits); 0 = one scale "
                   "per output channel, written as uint4 DequantizeLinear -> MatMul (opset 21; rtn and gptq). "
                   "[default: chosen, see --algo]")
@click.option("--algo", type=click.Choice(["rtn", "gptq", "hqq"]), default=None,
              help="int4 algorithm. [default: chosen: RTN block 128, RTN block 32, RTN block 32 float zero points, "
                   "then the same with GPTQ (when calibration text is at hand), the first within --max-ppl-increase "
                   "on held-out eval text; --algo, --block-size and --zero-points pin what they name]")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="int4: MatMulNBits compute type (4 = int8, fast on CPU; 0 = unset).")
@click.option("--symmetric", is_flag=True,
              help="int4 rtn: a grid centred on 0 with no zero points (ORT's CUDA kernel reads it faster; RTN error a little larger).")
@click.option("--zero-points", "zero_points", type=click.Choice(["int", "float"]), default=None,
              help="int4 rtn/gptq: float = each block's exact min-max grid (no integer rounding of its minimum; "
                   "nearly lossless for weights that came from GGUF Q4_1 blocks), kept on the fast integer kernel "
                   "by a small correction matmul; fp32 weights only. [default: chosen, see --algo]")
@click.option("--lm-head", type=click.Choice(["auto", "fp32", "int8", "int4"]), default="auto", show_default=True,
              help="LM head precision (auto: 8-bit per vocabulary row, one table with the embedding when tied; left fp16 under --mode fp16 and for an fp16 input).")
@click.option("--embeddings", type=click.Choice(["auto", "fp32", "int8"]), default="auto", show_default=True,
              help="Token embedding table (auto: 8-bit per row, except under fp16 and for an fp16 input).")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Held-out text for the quality report [default: data/eval.txt].")
@click.option("--eval-tokens", type=int, default=None,
              help="Tokens of the eval text the quality report scores, from its start (at least 256); a choice among "
                   "candidates is judged on the next min(N, 4096). [default: 8192]")
@click.option("--calib-samples", type=click.IntRange(1, 4096), default=32, show_default=True, help="Calibration samples (at most).")
@click.option("--calib-seq-len", type=click.IntRange(2, 8192), default=128, show_default=True, help="Prefill tokens per calibration sample.")
@click.option("--max-ppl-increase", type=finite(), default=None, metavar="PCT",
              help="Fail, writing nothing, if perplexity on the report's tokens rises more than PCT percent. "
                   "[default: dynamic 2, static 2, int4 5, fp16 1]")
@click.option("--min-greedy-agreement", type=click.FloatRange(0, 100), default=None, metavar="PCT",
              help="Fail, writing nothing, if the decode path's greedy agreement with the input (near ties counted) "
                   "is below PCT percent. [default: 80]")
@click.option("--check-form", type=click.Choice(["auto", "whole", "layerwise"]), default="auto", show_default=True,
              help="The decode-path check and quality report: whole-model sessions, or one layer's segment at a time "
                   "(memory ~ a layer's weights); auto: layerwise on the CPU from 1 GB of input weights.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and onnxpipe wrote it (holds onnxpipe.json, or is empty).")
def quantize(in_dir: Path, out_dir: Path, mode: str, calibration: Path | None, method: str | None,
             per_channel: bool | None, static_float_layers: int | None,
             activations: str, smoothquant: float | str | None, block_size: int | None, algo: str | None, accuracy_level: int, symmetric: bool,
             zero_points: str | None, lm_head: str, embeddings: str,
             eval_file: Path | None, eval_tokens: int | None, calib_samples: int, calib_seq_len: int,
             max_ppl_increase: float | None, min_greedy_agreement: float | None, check_form: str,
             force: bool) -> None:
    """Quantize a model directory (exported or optimized) and report its quality against the input.

    The result must pass a quality gate on held-out text (perplexity within --max-ppl-increase, greedy agreement
    on the decode path), or nothing is written and the error says how to accept it."""
    from onnxpipe.quant import describe_result, quantize_model
    from onnxpipe.quant.calibration import CalibrationConfig

    result = quantize_model(
        in_dir, out_dir, mode, force=force, log=_log, progress=_progress_bars(), check_form=check_form,
        calibration=calibration,
        method=method, per_channel=per_channel, static_float_layers=static_float_layers, activations=activations, smoothquant=smoothquant, block_size=block_size, algo=algo,
        accuracy_level=accuracy_level, symmetric=symmetric, float_zero_points=None if zero_points is None else zero_points == "float", lm_head=lm_head, embeddings=embeddings, eval_file=eval_file, max_eval_tokens=eval_tokens,
        max_ppl_increase=max_ppl_increase, calib=CalibrationConfig(max_samples=calib_samples, prefill_len=calib_seq_len),
        min_greedy_agreement=None if min_greedy_agreement is None else min_greedy_agreement / 100,
    )
    click.echo(describe_result(result))


def _alpha(value: str | None) -> float | str | None:
    """--smoothquant: a number (checked against (0, 1] with the other options), "auto" or "off"."""
    if value is None or value in ("auto", "off"):
        return value
    try:
        alpha = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'auto' or 'off'", param_hint="--smoothquant") from None
    if not math.isfinite(alpha):
        raise click.BadParameter(f"{value!r} is not a finite number", param_hint="--smoothquant")
    return alpha


PROGRESS_LINE_S = 30.0  # without a terminal (a batch job's log): one progress line per label at most this often


def _progress_bars(every_s: float = PROGRESS_LINE_S):  # noqa: ANN202
    """A progress callback (label, done, total): one tqdm bar per label on a terminal; where stderr is not one (a
    log file), a plain line when a label starts, at most every ``every_s`` seconds while it runs, and when it ends,
    so a long phase in a batch job still says where it is."""
    bars: dict = {}
    said: dict[str, float] = {}

    def line(label: str, done: int, total: int) -> None:
        now = time.monotonic()
        first = label not in said
        if first:
            said[label] = now
        if first or done >= total or now - said[label] >= every_s:
            said[label] = now
            click.echo(f"{label}: {done}/{total}", err=True)
        if done >= total:
            del said[label]

    def update(label: str, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            line(label, done, total)
            return
        from tqdm import tqdm

        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del bars[label]

    return update


if __name__ == "__main__":
    main()
