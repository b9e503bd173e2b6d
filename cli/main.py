"""The `decouple` group. Commands load lazily so `decouple --help` is instant."""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional

import click

from decouple import __version__
from decouple.errors import DecoupleError

# command name -> "module:attribute"; one small module per command.
COMMANDS: Dict[str, str] = {
    "info": "cli.info:info",
    "list": "cli.list_cmd:list_cmd",
    "head": "cli.head:head",
    "extract": "cli.extract:extract",
    "sweep": "cli.sweep:sweep",
    "export": "cli.export:export",
    "recommend": "cli.recommend:recommend",
    "demo": "cli.demo:demo",
    "save-model": "cli.save_model:save_model",
    "predict": "cli.predict:predict",
}


class BadInput(click.ClickException):
    """Bad input: one line on stderr, exit code 2."""

    exit_code = 2


class DecoupleGroup(click.Group):
    """Loads each command on first use and turns library input errors into exit 2."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DecoupleError as exc:
            raise BadInput(str(exc)) from exc


@click.group(cls=DecoupleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="decouple")
def cli() -> None:
    """Long-tailed image recognition by decoupled training.

    \b
    Stage one:  decouple extract   fine-tune a timm backbone, cache embeddings to HDF5
    Stage two:  decouple head      retrain a classifier head on cached embeddings
                decouple sweep     run a grid of heads x losses x samplers x seeds
                decouple export    tables and plots from a sweep's results
                decouple recommend the val-best method, the methods val cannot
                                   tell from it, and its test scores with intervals
    Deploy:     decouple save-model  the val-best method of a sweep as one model file
                decouple predict   classify images with a model file
    Also:       decouple demo      the whole pipeline on built-in data
                decouple info      describe a feature file
                decouple list      list the registered losses, samplers and heads
    """


if __name__ == "__main__":
    cli()
