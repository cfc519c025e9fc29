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


def config_options(*classes, after: str):
    """Decorator: give a command one option per command-line field of the config dataclasses `classes` (fields made
    with winq.config.option), placed after its parameter `after`, each with the field's default, help and flag. The
    command takes them as **config; `build_configs(config, *classes)` turns them back into the dataclasses. So the
    options, their defaults and their help have one source: the dataclasses."""
    import dataclasses
    import inspect
    import typing

    def param(f, hints) -> inspect.Parameter:
        meta = f.metadata
        kind = meta["cli_type"] or hints[f.name]
        default = f.default if meta["parse"] is None else str(f.default)
        opt = typer.Option(meta["flag"] or "--" + f.name.replace("_", "-"), help=meta["help"])
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[kind, opt])

    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = [p.name for p in own]
        generated = [param(f, typing.get_type_hints(c)) for c in classes for f in dataclasses.fields(c)
                     if f.metadata.get("cli")]
        clash = {p.name for p in generated} & set(names)
        if clash or after not in names:
            raise TypeError(f"config_options on {fn.__name__}: clashing {sorted(clash)} or no parameter {after!r}")
        at = names.index(after) + 1
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        params = own[:at] + generated + own[at:]
        return with_parameters(fn, params)

    return wrap


def build_configs(values: dict, *classes):
    """The config dataclasses from a command's **config (see config_options), each field's text parsed where the
    field names a parser (winq.config.PARSERS)."""
    import dataclasses

    from winq.config import PARSERS

    out_ = []
    for c in classes:
        kw = {}
        for f in dataclasses.fields(c):
            if f.name in values:
                v = values[f.name]
                kw[f.name] = PARSERS[f.metadata["parse"]](v) if f.metadata.get("parse") else v
        out_.append(c(**kw))
    return out_


def with_parameters(fn, params: list):
    """Give `fn` the signature (and annotations) `params` for typer to read: how generated options reach a command."""
    import inspect

    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn
