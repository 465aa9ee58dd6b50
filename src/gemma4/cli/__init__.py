"""The `gemma4` command line: the only package that imports typer and draws with rich. Each command
module adds its commands through ``register(app)``.

Errors are handled in ONE place, :class:`_Gemma4Group.main`: whatever a command raises (the package's
:class:`~gemma4._util.Gemma4Error`, an OSError, a ValueError, a usage error from the option parser, or a
bug) is printed as one ``error: ...`` line on stderr with a non-zero exit status. ``--debug`` (anywhere on
the command line) or ``GEMMA4_DEBUG=1`` prints the traceback as well."""

from __future__ import annotations

import errno
import inspect
import os
import sys
import traceback

import typer
from typer.core import TyperGroup
from typer.models import OptionInfo

from gemma4 import __version__
from gemma4._util import Gemma4Error
from gemma4.cli import align, chat, classify, convert, evaluate, generate, info, quant, redteam, serve, tokens, train

# typer >= 0.20 vendors its own click (typer._click), older ones use click: take the classes from typer.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

# Expected failures: bad input, files that are not what they claim, the OS refusing. Anything else is a
# bug: still one line (with the exception type, so a report is useful), and the traceback under --debug.
_EXPECTED = (Gemma4Error, OSError, ValueError, UnicodeError, KeyError, MemoryError, ImportError)


def _debug_wanted(args: list[str]) -> tuple[list[str], bool]:
    """Strip ``--debug`` wherever it appears before a ``--`` separator (users add it at the end)."""
    env = os.environ.get("GEMMA4_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    if "--" in args:
        cut = args.index("--")
        head, tail = args[:cut], args[cut:]
    else:
        head, tail = args, []
    flag = "--debug" in head
    return [a for a in head if a != "--debug"] + tail, env or flag


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        # Python's own OSErrors ("[Errno 2] No such file or directory: 'x'") -> "x: no such file or directory"
        what = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{what}: {e.strerror[:1].lower()}{e.strerror[1:]}"
    if isinstance(e, KeyError) and e.args:
        return f"missing key {e.args[0]!r}"
    if isinstance(e, UnicodeDecodeError):
        return (f"not valid UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}"
                if isinstance(e.object, (bytes, bytearray)) and e.start < len(e.object) else str(e))
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())  # one line, however the message was built


def _quiet_help(cmd, ctx) -> None:
    """``--help`` is a flag like the others: no ``<bool>`` type column after it (see _hide_flag_types), in
    this command and every command below it."""
    opt = cmd.get_help_option(ctx)
    if opt is not None:
        opt.metavar = ""
    for sub in getattr(cmd, "commands", {}).values():
        _quiet_help(sub, ctx)


class _Gemma4Group(TyperGroup):
    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            _quiet_help(cmd, ctx)
        return cmd

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args, debug = _debug_wanted(list(sys.argv[1:] if args is None else args))
        try:
            rv = super().main(args=args, prog_name="gemma4", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except _ClickException as e:  # usage errors: bad option values, unknown commands
            if type(e).__name__ == "NoArgsIsHelpError":  # `gemma4` alone: typer has printed the help
                if standalone_mode:
                    sys.exit(2)
                return 2
            if debug:
                traceback.print_exc()
            hint = ""
            ctx = getattr(e, "ctx", None)
            if isinstance(e, _UsageError) and ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 130
        except (typer.Exit, SystemExit) as e:
            code = getattr(e, "exit_code", getattr(e, "code", 1))
            code = code if isinstance(code, int) else 1
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            code = 130
        except BrokenPipeError:  # `gemma4 generate ... | head`: the reader left; not an error worth a line
            sys.stderr = open(os.devnull, "w")
            code = 0
        except Exception as e:  # noqa: BLE001 - the one place every error becomes a line
            if isinstance(e, OSError) and e.errno == errno.EPIPE:
                code = 0
            else:
                if debug:
                    traceback.print_exc()
                msg = _message(e)
                if not isinstance(e, _EXPECTED):
                    msg = (f"unexpected {type(e).__name__}: {msg} (a bug: please report it with the "
                           "traceback from --debug)")
                typer.echo(f"error: {msg}", err=True)
                code = 1
        if standalone_mode:
            sys.exit(code)
        return code


def _version(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"gemma4 {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
        raise typer.Exit()


app = typer.Typer(
    cls=_Gemma4Group,
    help="Gemma 4 in plain PyTorch: inspect architectures, run, chat, measure and compress models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="On an error, print the Python traceback too "
                               "(also GEMMA4_DEBUG=1; may be given after the command)."),
) -> None:
    """Gemma 4 in plain PyTorch. Start with `gemma4 info e2b` or `gemma4 generate --model gemma3-270m "Hello"`."""


for _module in (info, generate, chat, evaluate, convert, tokens, quant, train, serve, align, classify, redteam):
    _module.register(app)


def _hide_flag_types(typer_app: typer.Typer) -> None:
    """Typer >= 0.16 prints the value type after every option, so a flag reads ``--stats <bool>`` as if it
    took a value. An empty metavar on boolean options removes that (flags take no value)."""
    infos = [c.callback for c in typer_app.registered_commands]
    infos += [typer_app.registered_callback.callback] if typer_app.registered_callback else []
    for fn in infos:
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if isinstance(p.default, OptionInfo) and p.annotation in (bool, "bool") and p.default.metavar is None:
                p.default.metavar = ""
    for group in typer_app.registered_groups:
        _hide_flag_types(group.typer_instance)


_hide_flag_types(app)


def main(argv: list[str] | None = None) -> int:
    """The `gemma4` console script and ``python -m gemma4``: run the CLI, return the exit status."""
    return app(args=argv, prog_name="gemma4", standalone_mode=False)


__all__ = ["app", "main"]
