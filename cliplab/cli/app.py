"""The root command group and the error handling every command shares."""

from __future__ import annotations

import json
import sys

import click


class CliplabGroup(click.Group):
    """Turns the library's expected failures (bad checkpoint, missing file, bad config) into one-line errors with
    exit code 2 instead of tracebacks; unexpected errors keep their traceback."""

    def invoke(self, ctx):
        from ..models import CheckpointError, ConfigError
        from ..models.lm.deps import MissingDependency

        try:
            return super().invoke(ctx)
        except (CheckpointError, ConfigError, FileNotFoundError, KeyError, ValueError, MissingDependency) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)


@click.group(cls=CliplabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cliplab")
def main():
    """cliplab: CLIP-family vision-language embeddings."""


def emit(data, as_json: bool, render) -> None:
    """Print ``data`` as JSON (for scripts) or through ``render`` (for people)."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data)
