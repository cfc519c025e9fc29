"""What every `winq` command shares: the typer `app`, the two consoles, the options several commands take, and
the one error path (`_run`: a WinqError or an OSError becomes one red line and exit code 1).

cli/main.py (train, eval, export, hessian) and cli/tools.py (bench, inspect) both register their commands on
this `app`; main.py imports tools.py, so `winq.cli.main:app` has every command.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="winq",
    help="WinQ quantization-aware training for Hugging Face causal LMs, exported bit-exactly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # one error, one line, also in logs
out = Console(soft_wrap=True)

# options shared by several commands
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", help="local Hugging Face model folder; default: the built-in SmolLM2-135M-Instruct (Q4_1 weights)"
    ),
]
DataOpt = Annotated[str, typer.Option("--data", help="ptb | sotu | a .txt/.jsonl file or folder")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's choice)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of a table")]


def _fail(e) -> None:
    """One red `error:` line with the message printed literally (rich would take `[onnx]` for markup)."""
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True)
    raise typer.Exit(1)


def note(text: str, style: str = "yellow", label: str = "note:") -> None:
    """A styled label and a literal message on stderr."""
    err.print(f"[{style}]{label}[/] {escape(text)}", highlight=False)


def _run(fn, *a, **kw):
    import logging

    from winq.errors import WinqError

    # optional packages pulled in by extras (torchao via gptqmodel) log import-time noise on every model load
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging  # its own progress bars and warnings would bury ours

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    try:
        return fn(*a, **kw)
    except WinqError as e:
        _fail(e)
    except OSError as e:  # a path that cannot be read or written (e.g. an output under /proc): one line, no traceback
        what = f"{e.filename}: " if e.filename else ""
        _fail(f"{what}{e.strerror or e}")


def backend_help() -> str:
    """`--backend` help from the backend registry: each name with the option that gives its artifact."""
    from winq.errors import pip_command
    from winq.runtime.backends import BACKENDS

    def one(b) -> str:
        opt = f"--{b.artifact}" + (f", default --{b.fallback}" if b.fallback else "")
        return f"{b.name} ({opt}" + (f"; needs {pip_command(b.extra)}" if b.extra else "") + ")"

    # help is rich markup: escaped, `pip install "winq[gptq]"` shows its [gptq]
    return escape("comma-separated: " + " | ".join(one(b) for b in BACKENDS.values()))
