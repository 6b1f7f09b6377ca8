"""The ``hpcattn`` command. Subcommands live in their own modules and load lazily, so
``hpcattn --help`` stays fast and a command's heavy imports (h5py, matplotlib, CuPy) cost only
that command.

The conventions of every subcommand live here, in :class:`Group` and :class:`Command`, so a
subcommand gets them by being one (or by being listed in :data:`COMMANDS`):

* errors are one line, ``hpcattn: error: <what>``, never a traceback for something a user can
  cause; exit status 2 for a usage or input error (a bad option, value, job file or results
  file: click's usage errors and :class:`~hpcattn.errors.HpcattnError`), 1 for a runtime failure
  (a missing piece of the installation, Slurm refusing, a failed check, the system refusing a
  file operation: OSError), 130 for Ctrl-C, 128+N when a job stopped on signal N (``hpcattn
  run``); an exception may name its own status in ``exit_status``;
* an option that takes one value may be given once: a repeat is refused instead of the last one
  silently winning (options documented as repeatable are ``multiple``);
* a short option means one thing everywhere (:data:`SHORT_OPTIONS`).
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import os

import click

from .._version import __version__

# name -> "module:attribute"; a module that does not exist (yet) is simply not listed
COMMANDS = {
    "run": "hpcattn.cli.run:run",
    "info": "hpcattn.cli.info:info",
    "bench": "hpcattn.cli.bench:bench",
    "analyze": "hpcattn.cli.analyze:analyze",
    "mixers": "hpcattn.cli.mixers:mixers",
    "submit": "hpcattn.cli.submit:submit",
    "status": "hpcattn.cli.status:status",
    "merge": "hpcattn.cli.merge:merge",
}

#: every short option of the command line and the one long option it stands for, in every
#: subcommand that has it; anything else is long-only (tests/test_cli_conventions.py checks)
SHORT_OPTIONS = {
    "-h": "--help", "-N": "--seq-len", "-B": "--batch", "-H": "--heads", "-d": "--head-dim",
    "-o": "--output", "-p": "--param", "-m": "--metric", "-g": "--group-by", "-s": "--sort-by",
    "-w": "--where", "-c": "--cpus-per-task", "-t": "--time", "-A": "--account", "-q": "--qos",
    "-C": "--constraint", "-J": "--job-name",
}

ERROR_PREFIX = "hpcattn: error: "
#: click's way of showing the help of a group called without a subcommand (click >= 8.2)
PASSED_ON = tuple(filter(None, [getattr(click.exceptions, "NoArgsIsHelpError", None)]))
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C


class OneLineError(click.ClickException):
    """An error as the command line shows it: ``hpcattn: error: <message>`` and an exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the message held
        self.exit_code = exit_code

    def show(self, file=None):
        click.echo(ERROR_PREFIX + self.format_message(), err=True)


def _with_help(message: str, ctx) -> str:
    """``message`` and where to read more: the help of the command it is about."""
    return f"{message.rstrip('.')} (see '{ctx.command_path} --help')" if ctx is not None else message


def one_line(exc: BaseException, ctx=None) -> OneLineError | None:
    """``exc`` as the command line reports it, or None for an exception that is a bug (left to
    show its traceback)."""
    from ..errors import HpcattnError, UsageError

    if isinstance(exc, OneLineError):
        return exc
    if isinstance(exc, click.UsageError):
        return OneLineError(_with_help(exc.format_message(), exc.ctx or ctx), 2)
    if isinstance(exc, click.ClickException):
        return OneLineError(exc.format_message(), exc.exit_code)
    if isinstance(exc, UsageError):
        return OneLineError(_with_help(str(exc), ctx), 2)
    if isinstance(exc, HpcattnError) or hasattr(exc, "exit_status"):
        return OneLineError(str(exc), getattr(exc, "exit_status", 2))
    if isinstance(exc, OSError):  # the system refused: no space, no permission, no such folder
        return OneLineError(str(exc), 1)
    return None


def _conventions(run, where=lambda: None):
    """Call ``run()`` with the command line's error conventions (see the module docstring);
    ``where()`` is the context whose help an error should point to."""
    try:
        return run()
    except KeyboardInterrupt:
        click.echo(err=True)  # ends the terminal's ^C line
        raise click.exceptions.Exit(INTERRUPTED) from None
    except (click.exceptions.Exit, click.Abort, *PASSED_ON):
        raise
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs by one_line
        err = one_line(exc, where())
        if err is None:
            raise
        raise err from None


def repeated_option(command: click.Command, ctx, args) -> str | None:
    """The one-line complaint about the first option in ``args`` given more than once although
    it takes one value (None when there is none). Uses the command's own parser, so values that
    look like options and ``--opt=value`` spellings count as click counts them."""
    try:
        _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    except click.UsageError:
        return None  # the real parse reports it
    times = collections.Counter(id(p) for p in order)
    for param in command.get_params(ctx):
        if (isinstance(param, click.Option) and not (param.multiple or param.count or param.is_eager)
                and times[id(param)] > 1):
            names = "/".join(param.opts + param.secondary_opts)
            return f"{names} was given {times[id(param)]} times; expected it once (it is not repeatable)"
    return None


class Command(click.Command):
    """A subcommand with the command line's conventions, also when invoked on its own (tests)."""

    def parse_args(self, ctx, args):
        complaint = None if ctx.resilient_parsing else repeated_option(self, ctx, args)
        if complaint:
            raise click.UsageError(complaint, ctx)
        return super().parse_args(ctx, args)

    def make_context(self, info_name, args, parent=None, **extra):
        return _conventions(lambda: super(Command, self).make_context(info_name, args, parent, **extra))

    def invoke(self, ctx):
        return _conventions(lambda: super(Command, self).invoke(ctx), lambda: ctx)


class Group(click.Group):
    """A group whose subcommands (its own and, through :meth:`resolve_command`, plain click
    commands such as ``submit``) follow the conventions."""

    command_class = Command

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, (Command, click.Group)):
            sub = click.Context(command, info_name=name, parent=ctx)
            complaint = repeated_option(command, sub, rest)
            if complaint:
                raise click.UsageError(complaint, sub)
        return name, command, rest

    def make_context(self, info_name, args, parent=None, **extra):
        return _conventions(lambda: super(Group, self).make_context(info_name, args, parent, **extra))

    def invoke(self, ctx):
        """Run the subcommand; a :class:`~hpcattn.errors.UsageError` from the layers below (which
        know nothing of click) is shown as click shows its own, naming the subcommand's help."""
        def where():
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            return click.Context(command, info_name=name, parent=ctx) if command else ctx

        return _conventions(lambda: super(Group, self).invoke(ctx), where)


Group.group_class = Group


class LazyGroup(Group):
    def _available(self):
        return {name: target for name, target in COMMANDS.items()
                if importlib.util.find_spec(target.split(":")[0]) is not None}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._available()))

    def get_command(self, ctx, name):
        target = self._available().get(name)
        if target is None:
            return super().get_command(ctx, name)
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


#: what matplotlib's Agg backend writes, by file name suffix
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif",
                   ".tiff", ".webp", ".pgf", ".raw", ".rgba")


def figure_path(path: str, param: str) -> str:
    """The file a figure option really writes: matplotlib adds ``.png`` to a name without a
    suffix, and refuses suffixes it cannot write (checked here, before any work)."""
    suffix = os.path.splitext(path)[1].lower()
    if not suffix:
        return path + ".png"
    if suffix not in FIGURE_SUFFIXES:
        raise click.BadParameter(f"{path!r} ends in {suffix!r}, which is not a figure format; "
                                 f"expected one of {', '.join(FIGURE_SUFFIXES)}", param_hint=param)
    return path


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})
@click.version_option(__version__, prog_name="hpcattn")
def main():
    """hpcattn: exact blockwise/ring attention over MPI ranks and a zoo of token mixers.

    Errors are one line starting 'hpcattn: error:'. Exit status: 0 success, 2 a usage or input
    error (option, value, job or results file), 1 a runtime failure (missing MPI, Slurm, a failed
    check), 130 Ctrl-C, 128+N a job stopped by signal N.

    \b
    Examples:
      hpcattn run --np 4 --seq-len 8192 --causal --layout zigzag --check
      mpiexec -n 4 hpcattn run jobs/quickstart.toml
      hpcattn analyze results/quickstart.h5 --plot fig.png
    """
