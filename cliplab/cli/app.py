"""The root command group and the error handling every command shares.

* The library's expected failures (bad checkpoint, missing file, bad config, missing optional package) become one
  ``error: ...`` line with exit code 2.
* Anything else is one ``error: <Type>: message`` line with exit code 1; ``cliplab --debug ...`` (or
  ``CLIPLAB_DEBUG=1``) shows the traceback instead.
* Ctrl-C exits with 130 (the shell convention) and says what was kept and how to resume, when the command said so
  with :func:`cliplab.cli.common.on_interrupt`.
"""

from __future__ import annotations

import sys

import click

from .common import interrupt_message


class CliplabGroup(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's own handling, except that a usage error of ``cliplab`` itself (``cliplab --bogus``) is one line
        too (those of subcommands are caught in :meth:`invoke`)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "cliplab"
            click.echo(f"error: {_one_line(e.format_message())} (see {where} --help)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)

    def invoke(self, ctx):
        from ..models import CheckpointError, ConfigError
        from ..models.lm.deps import MissingDependency

        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            click.echo(f"\ninterrupted: {interrupt_message(e)}", err=True)
            sys.exit(130)
        except click.UsageError as e:  # one line, like every other error, with where to read more
            if debug:
                raise
            where = e.ctx.command_path if e.ctx is not None else "cliplab"
            click.echo(f"error: {_one_line(e.format_message())} (see {where} --help)", err=True)
            sys.exit(2)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except (CheckpointError, ConfigError, FileNotFoundError, KeyError, ValueError, MissingDependency) as e:
            if debug:
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            click.echo(f"error: {_one_line(msg)}", err=True)
            sys.exit(2)
        except Exception as e:  # unexpected: still one line, the traceback on request
            if debug:
                raise
            click.echo(f"error: {type(e).__name__}: {_one_line(str(e))} (cliplab --debug ... shows the traceback)",
                       err=True)
            sys.exit(1)


def _one_line(msg: str) -> str:
    """Multi-line library messages (e.g. key lists) stay readable: lines joined with '; '."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


@click.group(cls=CliplabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cliplab")
@click.option("--debug", is_flag=True, envvar="CLIPLAB_DEBUG", help="Show full tracebacks instead of one-line errors.")
def main(debug):
    """cliplab: CLIP-family vision-language embeddings.

    \b
    Examples:
      cliplab demo
      cliplab embed photos/ -o emb/ && cliplab index emb/ && cliplab search emb/ "a dog on a beach"
      cliplab classify photos/ --labels cat,dog,bird
    """


from .common import emit  # noqa: E402,F401  (commands import it from here)
