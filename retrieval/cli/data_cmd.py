"""``retrieval data synth``: write the synthetic hierarchical dataset as image files + labels.csv."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.common import console, print_json, user_errors


def synth(
    out: Path = typer.Option(..., "--out", help="Directory to write <split>/labels.csv and the images into."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same images."),
    image_size: int = typer.Option(64, help="Side of the square images in pixels."),
    set_: list[str] = typer.Option([], "--set", help="Override a SyntheticConfig field: --set KEY=VALUE (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the written CSV paths as JSON."),
) -> None:
    """Generate the synthetic hierarchical dataset (coarse shape family > shape > shape x colour x texture).

    Test fine classes are disjoint from training ones (open set, as in DyML); coarse
    and middle classes are shared. Each split gets a folder with images and a
    labels.csv (path,fine,middle,coarse) usable by `retrieval train`, `index build`
    and `evaluate recall`.
    """
    with user_errors():
        from retrieval.config import load_config
        from retrieval.data.synthetic import SyntheticConfig, write_synthetic

        config = load_config(SyntheticConfig, None, [f"seed={seed}", f"image_size={image_size}", *set_])
        written = write_synthetic(config, out)
    if as_json:
        print_json({split: str(path) for split, path in written.items()})
        return
    for split, path in written.items():
        console.print(f"{split:>5}: {path}")
