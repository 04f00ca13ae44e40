"""`xmodal` command line: thin wrappers over the flows (which stay callable from Python)."""

from __future__ import annotations

from typing import Optional

import typer

from flows import _env  # noqa: F401

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Cross-modal embedding alignment.")


@app.command()
def extract(
    manifest: str = typer.Argument(..., help="CSV/Parquet manifest with an id column."),
    column: str = typer.Option(..., "--column", "-c", help="Modality column to embed."),
    encoder: str = typer.Option(..., "--encoder", "-e", help="Encoder spec, e.g. open_clip:image:ViT-B-32@/ckpt.safetensors"),
    out_dir: str = typer.Option("runs/stores", help="Where stores go."),
    on_error: str = typer.Option("skip", help="skip | fail"),
    store_dtype: str = typer.Option("float32", help="float32 | float16"),
    batch_size: Optional[int] = typer.Option(None, help="Override the spec's batch size."),
    refresh: bool = typer.Option(False, help="Rebuild even if a complete store exists."),
):
    """Embed one manifest column with a frozen encoder into an HDF5 store (a Prefect flow, an MLflow run)."""
    from flows.extract import ExtractParams, extract_embeddings

    extract_embeddings(ExtractParams(manifest=manifest, column=column, encoder=encoder, out_dir=out_dir,
                                     on_error=on_error, store_dtype=store_dtype, batch_size=batch_size,
                                     refresh=refresh))


@app.command("build-data")
def build_data(out: str = typer.Option("data/generated", help="Output folder.")):
    """Build the offline sample data (digits, sketches, captions; RGB/depth scenes)."""
    from pathlib import Path

    from data.build import build_all

    for name, path in build_all(Path(out)).items():
        typer.echo(f"{name}: {path}")


@app.command()
def demo():
    """Run the whole pipeline on the bundled sample data with embedded defaults."""
    from flows.demo import run_demo

    run_demo()


if __name__ == "__main__":
    app()
