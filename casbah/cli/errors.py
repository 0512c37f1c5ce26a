"""The CLI's one error path: every failure a user can cause becomes one line on stderr.

`casbah serve` and every other command run inside `CasbahGroup.main`, which turns
an exception into `Error: <what is at fault>` and an exit status by the table in
`describe`.  A traceback is printed only with the global `--debug` flag (or
`CASBAH_DEBUG=1`), so a bug is still one flag away from being diagnosable.

Exit status:

====  =========================================================================
0     success
1     the operation failed: bad input (a config, tokens or manifest file, a
      digest, a ref), the server refused or could not be reached, an OS error
      on a path, a bind failure, corrupt data found, an unexpected bug
2     the command line itself is wrong (an unknown option, a missing
      argument, an option value such as `--listen 127.0.0.1` without a port)
130   interrupted (Ctrl-C)
141   stdout was closed early (`casbah cas tree … | head`): exits quietly, as a
      process killed by SIGPIPE would
====  =========================================================================
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from casbah.errors import CasbahError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_SIGPIPE = 141


def one_line(message: str) -> str:
    """A multi-line message (a config with several errors) as one line: the heading,
    then the items separated by '; '."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    head, rest = lines[0], lines[1:]
    return f"{head}{'' if head.endswith(':') else ':'} {'; '.join(rest)}"


def os_error_message(exc: OSError) -> str:
    """`PATH: reason` (both paths of a rename), or the error's own text."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None and exc.filename2 is not None:
        return f"{os.fsdecode(exc.filename)} -> {os.fsdecode(exc.filename2)}: {reason}"
    if exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {reason}"
    return str(exc)


def _is_broken_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def describe(exc: BaseException) -> tuple[str | None, int]:
    """(message or None for silence, exit status) of an exception escaping a command."""
    if isinstance(exc, click.UsageError):
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return one_line(exc.format_message()) + hint, EXIT_USAGE
    if isinstance(exc, click.ClickException):
        return one_line(exc.format_message()), exc.exit_code
    if isinstance(exc, (click.Abort, KeyboardInterrupt)):
        return "interrupted", EXIT_INTERRUPTED
    if _is_broken_pipe(exc):
        return None, EXIT_SIGPIPE
    if isinstance(exc, CasbahError):
        return one_line(str(exc)), EXIT_FAILURE
    if isinstance(exc, OSError):
        return os_error_message(exc), EXIT_FAILURE
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"the server answered {exc.code().name}: {exc.details()}", EXIT_FAILURE
    return (f"internal error: {type(exc).__name__}: {exc} (run `casbah --debug …` for the traceback)",
            EXIT_FAILURE)


def silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush cannot
    fail again and print 'Exception ignored … BrokenPipeError'."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class CasbahGroup(click.Group):
    """The root group: runs a command and reports whatever escapes it through `describe`."""

    #: Set by the root group's callback (`--debug`) or `CASBAH_DEBUG=1`.
    debug: bool = False

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: name -> "module:attribute", imported when the command is looked up.  Why: the client
        #: commands pull in rich, the local cache and the REAPI client, which `casbah serve` never
        #: uses; importing them all up front cost serve a fifth of its startup.
        self.lazy_commands: dict[str, str] = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OSError as exc:  # before click's own EPIPE handling, which exits 1
            if not _is_broken_pipe(exc):
                raise
            silence_stdout()
            sys.exit(EXIT_SIGPIPE)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BaseException as exc:  # the one place every failure is reported
            no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", None)
            if no_args_help is not None and isinstance(exc, no_args_help):
                exc.show()
                sys.exit(EXIT_USAGE)
            message, status = describe(exc)
            if message is None:
                silence_stdout()
                sys.exit(status)
            if CasbahGroup.debug and not isinstance(exc, (click.ClickException, click.Abort)):
                import traceback

                traceback.print_exception(exc)
            try:
                click.echo(f"Error: {message}", err=True)
            except OSError:
                pass
            sys.exit(status)
        sys.exit(result if isinstance(result, int) else 0)
