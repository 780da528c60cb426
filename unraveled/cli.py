"""The command line: routing only. ``unraveled list | run | models``.

``main(argv)`` returns the exit status instead of exiting, so tests can call it directly:
0 ok, 2 bad input (config, name or option), 3 model unavailable with the fallback off.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from unraveled.config import DEFAULT_CONFIG_DIR, config_names, load_config
from unraveled.errors import UnraveledError
from unraveled.models import BUNDLED_SMOLLM2, availability
from unraveled.render.export import parse_formats

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Take GPT-2 apart: figures and views of its insides.")
console = Console(stderr=True)

ConfigDirOption = Annotated[Path, typer.Option("--config-dir", help="Where config names are looked up.")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    # Third-party libraries log plenty at INFO (TransformerLens to the root logger): show only
    # their warnings, and our own progress.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, markup=False)],
        force=True,
    )
    logging.getLogger("unraveled").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command("list")
def list_configs(config_dir: ConfigDirOption = DEFAULT_CONFIG_DIR) -> None:
    """List the configs with their experiment and description."""
    table = Table("config", "experiment", "model", "description")
    for name in config_names(config_dir):
        config = load_config(name, config_dir)
        table.add_row(name, config.run.experiment, config.run.model or "gpt2", config.run.description)
    Console().print(table)


@app.command()
def run(
    names: Annotated[list[str] | None, typer.Argument(help="Config names (configs/NAME.yaml) or YAML paths.")] = None,
    run_all: Annotated[bool, typer.Option("--all", help="Run every config in the config folder.")] = False,
    model: Annotated[
        list[str] | None,
        typer.Option(help="Model for every config: a name, a checkpoint folder or smollm2-135m. Repeat it to run every config on each model."),
    ] = None,
    figure_format: Annotated[
        list[str] | None, typer.Option("--format", help="Figure formats, comma-separated: png, svg, pdf (default png).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs"),
    device: Annotated[str, typer.Option(help="Torch device.")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a config value: params.KEY=VALUE.")] = None,
    no_fallback: Annotated[
        bool,
        typer.Option("--no-fallback", envvar="UNRAVELED_NO_FALLBACK", help="Fail (exit 3) instead of falling back to the bundled model."),
    ] = False,
    config_dir: ConfigDirOption = DEFAULT_CONFIG_DIR,
) -> None:
    """Run configs and write figures, views, metrics and the index under --out."""
    from unraveled.runner import run_configs  # heavy imports only when running

    if run_all == bool(names):
        raise typer.BadParameter("give config names or --all, not both and not neither")
    selected = config_names(config_dir) if run_all else list(names or [])
    # Validate everything before loading a model or writing a file.
    configs = [load_config(name, config_dir, overrides) for name in selected]
    try:
        formats = parse_formats(figure_format or [])
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--format") from None
    models = list(dict.fromkeys(model or []))  # each model once, in the order given
    if models:
        from unraveled.models import resolve_model

        for name in models:
            resolve_model(name)
    written = run_configs(configs, out, models=models, device=device, allow_fallback=not no_fallback, formats=formats)
    console.print(f"wrote {len(written)} run(s); open {out / 'index.html'}")


@app.command()
def models(names: Annotated[list[str] | None, typer.Argument(help="Model names to check.")] = None) -> None:
    """Show what each model name resolves to and whether it can be loaded now."""
    table = Table("model", "resolves to", "loadable now")
    for name in names or ["gpt2", "gpt2-medium", "distilgpt2", BUNDLED_SMOLLM2]:
        resolves_to, loadable = availability(name)
        table.add_row(name, resolves_to, loadable)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    try:
        app(args=argv, prog_name="unraveled", standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        return 130
    except typer.TyperException as error:  # usage errors: unknown option, bad value, ...
        error.show()
        return error.exit_code
    except UnraveledError as error:
        console.print(f"error: {error}", style="bold red", markup=False, highlight=False, soft_wrap=True)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
