"""The `onnxpipe` command: a thin click layer over the library. Parse, call, print; no logic of its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from onnxpipe import __version__
from onnxpipe.errors import OnnxpipeError


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
@click.argument("hf_model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True, help="ONNX opset of the default domain.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch.")
@click.option("--decode-steps", type=click.IntRange(3, 64), default=4, show_default=True, help="Decode steps in the parity check.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def export(hf_model_dir: Path, out_dir: Path, dtype: str, opset: int, no_verify: bool, decode_steps: int, force: bool) -> None:
    """Export a Hugging Face model directory to ONNX with KV-cache inputs/outputs, checked against PyTorch."""
    from onnxpipe.export import export_decoder

    result = export_decoder(
        hf_model_dir, out_dir, dtype=dtype, opset=opset, verify=not no_verify, force=force,
        decode_steps=decode_steps, log=_log,
    )
    click.echo(f"wrote {result.model_dir.path} in {result.seconds:.1f}s")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
def inspect(model_dir: Path) -> None:
    """Print a model directory's manifest summary, op-type histogram, size and I/O signature."""
    from onnxpipe.inspect import format_inspection, inspect_model_dir

    click.echo(format_inspection(inspect_model_dir(model_dir)))


if __name__ == "__main__":
    main()
