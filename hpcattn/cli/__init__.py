"""The ``hpcattn`` command. Subcommands live in their own modules and load lazily, so
``hpcattn --help`` stays fast and a command's heavy imports (h5py, matplotlib, CuPy) cost only
that command."""
from __future__ import annotations

import importlib
import importlib.util

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


class LazyGroup(click.Group):
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

    def invoke(self, ctx):
        """Run the subcommand; a :class:`~hpcattn.errors.UsageError` from the layers below (which
        know nothing of click) is shown as click shows its own: the subcommand's usage, exit 2."""
        from ..errors import UsageError

        try:
            return super().invoke(ctx)
        except UsageError as exc:
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            where = click.Context(command, info_name=name, parent=ctx) if command else ctx
            raise click.UsageError(str(exc), where) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})
@click.version_option(__version__, prog_name="hpcattn")
def main():
    """hpcattn: exact blockwise/ring attention over MPI ranks and a zoo of token mixers.

    \b
    Examples:
      hpcattn run --np 4 --seq-len 8192 --causal --layout zigzag --check
      mpiexec -n 4 hpcattn run jobs/quickstart.toml
      hpcattn analyze results/quickstart.h5 --plot fig.png
    """
