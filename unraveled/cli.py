"""The command line: routing only. ``unraveled list | run | params | models | export | report``.

``main(argv)`` returns the exit status instead of exiting, so tests can call it directly:
0 ok, 2 bad input (config, name or option), 3 a model can't be had (a model the user named, or
the default with the fallback off), 130 interrupted (Ctrl-C). Every command validates its input
before importing torch or TransformerLens, so help, listing and input errors answer in well under
a second.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from unraveled.config import (
    OVERRIDES_BUILTIN,
    ConfigSources,
    LoadedConfig,
    config_names,
    did_you_mean,
    load_config,
)
from unraveled.engines.ray_cluster import check_engines
from unraveled.errors import ConfigError, UnraveledError
from unraveled.models.plan import availability, plan_runs
from unraveled.models.sources import BUNDLED_SMOLLM2
from unraveled.render.export import parse_formats

SET_HELP = (
    "Override a config value: KEY=VALUE, e.g. params.head=3 or seed=1. A value for a text field "
    "(a prompt, a description, a model name) is taken exactly as written; any other value is read "
    "as YAML (3, 0.5, true, \\[a, b])."  # \[: a literal bracket in rich markup
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Take GPT-2 apart: figures and views of its insides.",
)
console = Console(stderr=True)

CONFIG_DIR_HELP = (
    "A folder of your own configs (NAME.yaml). They add to the built-in configs, and one named "
    "like a built-in config overrides it. Without --config-dir only the built-in configs are used "
    "(a ./configs folder is read only when named: --config-dir configs)."
)

ConfigDirOption = Annotated[
    Path | None, typer.Option("--config-dir", help=CONFIG_DIR_HELP, show_default=False)
]
logger = logging.getLogger(__name__)


def _log_handler() -> logging.Handler:
    if console.is_terminal:
        from rich.logging import RichHandler

        return RichHandler(console=console, show_path=False, markup=False)
    # Not a terminal (CI, `make all > log`): one plain line per message, never wrapped, so paths
    # stay whole and the log greps; and no progress bars redrawn into the file.
    os.environ.setdefault("TQDM_DISABLE", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    )
    return handler


def version() -> str:
    """The installed distribution's version; the package's own where it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("unraveled")
    except PackageNotFoundError:  # run from a source tree that was never installed
        import unraveled

        return unraveled.__version__


def _print_version(value: bool) -> bool:
    if value:
        typer.echo(f"unraveled {version()}")
        raise typer.Exit()
    return value  # typer passes on what the callback returns


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    # Third-party libraries log plenty at INFO (TransformerLens to the root logger): show only
    # their warnings, and our own progress.
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[_log_handler()], force=True
    )
    logging.getLogger("unraveled").setLevel(logging.DEBUG if verbose else logging.INFO)


def _print_table(table: Table) -> None:
    # Off a terminal rich would wrap cells at 80 columns; give long cells room instead.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


@app.command("list")
def list_configs(config_dir: ConfigDirOption = None) -> None:
    """List the configs, where each comes from, its experiment and description."""
    sources = ConfigSources.locate(config_dir)
    columns = (
        Column("config", no_wrap=True),
        Column("source", no_wrap=True),
        "experiment",
        "model",
        "description",
    )
    table = Table(*columns, caption=sources.describe(), caption_justify="left")
    for name in sources.files():
        config = load_config(name, config_dir)
        table.add_row(
            name,
            config.source,
            config.run.experiment,
            config.model,
            config.description,
        )
    _print_table(table)


def _output_folder(out: str) -> Path:
    """``--out`` as a folder that exists or can be created and written, else exit 2."""
    if not out.strip():
        raise ConfigError(
            "--out", None, "empty; give the folder outputs are written to, e.g. --out outputs"
        )
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError("--out", None, f"{out!r} is a file; expected a folder (existing or new)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            "--out", None, f"{out!r} can't be written: {existing} is not a writable folder"
        )
    from unraveled.outputs import (
        check_output_folder,
    )  # numpy and pydantic only: answers before torch is imported

    check_output_folder(path)  # the runner checks each run's folder once it knows the models'
    return path


@contextlib.contextmanager
def _long_lived_imports() -> Iterator[None]:
    """Keep the garbage collector off the objects the heavy imports make, for the whole run.

    Importing torch, transformers and TransformerLens makes hundreds of thousands of objects that
    live as long as the process. Collecting while they are made frees nothing, and every full
    collection afterwards (the runner's after each model and config, and Python's own) walks them
    all again, a cost paid over and over in a run of several configs. So the collector is off
    while they are imported, and then they are frozen (``gc.freeze``) until the run ends;
    everything made later (models, activations, figures) is collected as before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import unraveled.runner  # noqa: F401
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@app.command()
def run(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Config names (built-in, or NAME.yaml in --config-dir) or YAML paths."),
    ] = None,
    run_all: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Run every config: the built-in ones and, with --config-dir, your folder's.",
        ),
    ] = False,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Model for every config: a name, a checkpoint folder or smollm2-135m. Repeat it "
            "to run every config on each model. A model named here never falls back to another."
        ),
    ] = None,
    figure_format: Annotated[
        list[str] | None,
        typer.Option(
            "--format", help="Figure formats, comma-separated: png, svg, pdf (default png)."
        ),
    ] = None,
    out: Annotated[str, typer.Option(help="Output folder.")] = "outputs",
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N or mps.")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    no_fallback: Annotated[
        bool,
        typer.Option(
            "--no-fallback",
            envvar="UNRAVELED_NO_FALLBACK",
            help="Fail (exit 3) instead of falling back to the bundled model when the default "
            "model can't be had (a model you name never falls back).",
        ),
    ] = False,
    config_dir: ConfigDirOption = None,
) -> None:
    """Run configs and write figures, views, metrics and the index under --out."""
    if run_all == bool(names):
        raise typer.BadParameter("give config names or --all, not both and not neither")
    out_dir = _output_folder(out)
    selected = config_names(config_dir) if run_all else list(dict.fromkeys(names or []))
    # Validate everything, every model name included, before loading a model or writing a file.
    configs: list[LoadedConfig] = [load_config(name, config_dir, overrides) for name in selected]
    for config in configs:
        if config.source.endswith(OVERRIDES_BUILTIN):
            logger.info("%s: %s, which overrides the built-in config", config.name, config.path)
    try:
        formats = parse_formats(figure_format or [])
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--format") from None
    # Every model resolved, and whether the default falls back decided, before anything loads.
    plan = plan_runs(configs, list(dict.fromkeys(model or [])), allow_fallback=not no_fallback)
    check_engines(configs)  # before the slow imports: an unreachable Ray cluster fails in seconds
    with _long_lived_imports():
        from unraveled.runner import (
            check_device,
            check_text_params_before_loading,
            run_configs,
        )  # heavy imports only once the input is valid

        check_device(device)
        check_text_params_before_loading(plan)
        written = run_configs(plan, out_dir, device=device, formats=formats)
    console.print(
        f"wrote {len(written)} run(s); open {out_dir / 'index.html'}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


@app.command()
def params(
    name: Annotated[
        str, typer.Argument(help="An experiment's name (unraveled list shows each config's).")
    ],
) -> None:
    """Show an experiment's params: type, default, bounds and description of each."""
    from unraveled.experiment import available_experiments, load_experiment
    from unraveled.param_docs import describe_params

    names = available_experiments()
    if name not in names:
        raise ConfigError(
            name,
            None,
            f"not an experiment{did_you_mean(name, names)} (experiments: {', '.join(names)})",
        )
    experiment = load_experiment(name)
    table = Table(
        Column("param", no_wrap=True),
        "type",
        "default",
        "bounds",
        "description",
        title=f"{name}: {experiment.title}",
        caption="Set in a config's params block, with --set params.KEY=VALUE, or as keyword "
        "arguments from Python (those marked Python only: there alone); nested params as "
        "KEY.SUBKEY.",
        caption_justify="left",
    )
    for doc in describe_params(experiment.params, experiment.max_prompt_tokens):
        # Text, not markup: "list[str]" would otherwise lose its "[str]" as a markup tag.
        table.add_row(*(Text(cell) for cell in astuple(doc)))
    _print_table(table)


@app.command()
def models(
    names: Annotated[list[str] | None, typer.Argument(help="Model names to check.")] = None,
) -> None:
    """Show what each model name resolves to and whether it can be loaded now."""
    table = Table("model", "resolves to", "loadable now")
    for name in names or ["gpt2", "gpt2-medium", "distilgpt2", BUNDLED_SMOLLM2]:
        resolves_to, loadable = availability(name)
        table.add_row(name, resolves_to, loadable)
    _print_table(table)


@app.command()
def export(
    page: Annotated[
        Path,
        typer.Argument(
            help="A view (OUT/<model>/<config>/views/*.html) or a report page of the outputs.",
            show_default=False,
        ),
    ],
    to: Annotated[
        Path,
        typer.Option(
            "--to", "-o", help="The single file to write; must not exist yet.", show_default=False
        ),
    ],
) -> None:
    """Write PAGE as one self-contained HTML file to share.

    Its script and images are inlined: no other file is needed.
    """
    from unraveled.outputs import write_text_atomic
    from unraveled.render.export import self_contained_page

    if not page.is_file() or page.suffix.lower() not in {".html", ".htm"}:
        raise ConfigError(
            str(page), None, "expected an HTML page of the outputs (a view or a report page)"
        )
    if to.exists() or to.is_symlink():
        raise ConfigError(
            "--to", None, f"{to} exists; give a new file name (export never overwrites a file)"
        )
    if not to.parent.is_dir():
        raise ConfigError("--to", None, f"{to.parent} is not a folder")
    try:
        text = self_contained_page(page)
    except (FileNotFoundError, UnicodeDecodeError) as error:
        raise ConfigError(str(page), None, str(error)) from None
    write_text_atomic(to, text)
    console.print(
        f"wrote {to} ({len(text.encode()) / 1e6:.1f} MB), a single file: "
        "it opens anywhere, offline",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


@app.command()
def report(
    out: Annotated[
        Path,
        typer.Argument(
            help="An output folder of runs (--out of unraveled run).", show_default=False
        ),
    ],
) -> None:
    """Rebuild the report's pages (index, run and compare pages) over the runs in OUT.

    For runs saved from Python (``RunResult.save``) or pages deleted or out of date.
    """
    from unraveled.api import report as rebuild_report

    index = rebuild_report(out)
    console.print(f"rebuilt the pages; open {index}", soft_wrap=True, markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    try:
        status = app(args=argv, prog_name="unraveled", standalone_mode=False)
    except typer.Exit as done:
        status = done.exit_code
    except typer.Abort:
        status = 130
    except KeyboardInterrupt:
        status = 130
    except typer.TyperException as error:  # usage errors: unknown option, bad value, ...
        error.show()
        return error.exit_code
    except UnraveledError as error:
        console.print(
            f"error: {error}", style="bold red", markup=False, highlight=False, soft_wrap=True
        )
        return error.exit_code
    if status == 130:  # typer turns Ctrl-C into exit status 130
        console.print(
            "interrupted (Ctrl-C): finished runs are kept, the unfinished one left nothing behind",
            soft_wrap=True,
            highlight=False,
        )
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
