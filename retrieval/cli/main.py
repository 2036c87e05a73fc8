"""Entry point of the ``retrieval`` command: assembles the sub-commands.

Each command lives in its own module and imports the heavy stages (torch, FAISS,
ONNX Runtime) inside its body, so ``retrieval --help`` answers instantly.
"""

from __future__ import annotations

import logging

import typer

from retrieval import __version__
from retrieval.cli import (
    data_cmd,
    distill_cmd,
    evaluate_cmd,
    evaluate_dyml_cmd,
    evaluate_revisited_cmd,
    export_cmd,
    index_cmd,
    index_inspect_cmd,
    quickstart_cmd,
    search_cmd,
    serve_cmd,
    train_cmd,
)
from retrieval.cli.common import computes

__all__ = ["app", "main"]

app = typer.Typer(
    name="retrieval",
    help="Image-retrieval engine: train encoders, index galleries, search from the shell or over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: generate the synthetic hierarchical gallery.", no_args_is_help=True)
index_app = typer.Typer(
    help="Build, merge, extend, inspect, verify and calibrate index directories.", no_args_is_help=True
)
evaluate_app = typer.Typer(help="Offline evaluation protocols.", no_args_is_help=True)

app.command("quickstart")(computes(quickstart_cmd.quickstart))
app.command("train")(computes(train_cmd.train))
app.command("distill")(computes(distill_cmd.distill))
app.command("search")(computes(search_cmd.search))
app.command("export")(computes(export_cmd.export))
app.command("serve")(computes(serve_cmd.serve))
data_app.command("synth")(computes(data_cmd.synth))
index_app.command("build")(computes(index_cmd.build))
index_app.command("merge")(computes(index_cmd.merge))
index_app.command("add")(computes(index_cmd.add))
index_app.command("info")(index_inspect_cmd.info)
index_app.command("verify")(index_inspect_cmd.verify)
index_app.command("calibrate")(computes(index_inspect_cmd.calibrate))
evaluate_app.command("recall")(computes(evaluate_cmd.recall))
evaluate_app.command("dyml")(computes(evaluate_dyml_cmd.dyml))
evaluate_app.command("revisited")(computes(evaluate_revisited_cmd.revisited))
app.add_typer(data_app, name="data")
app.add_typer(index_app, name="index")
app.add_typer(evaluate_app, name="evaluate")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"retrieval {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
