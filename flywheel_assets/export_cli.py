"""`flywheel export CYCLE`: a cycle's training set as chat JSONL (registered on cli.app)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import typer

from flywheel_assets.cli import EXIT_NOT_FOUND, Session, _sql_text, app, fail


@app.command()
def export(ctx: typer.Context,
           cycle: str = typer.Argument(..., help="Training cycle, e.g. cycle-0001."),
           output: Optional[Path] = typer.Option(None, "-o", "--output", help="File to write [default: stdout].")):
    """Write a cycle's training set as chat JSONL (messages, tools, weight, tier), in selection order.

    The bytes are those of the cycle's own export (datasets/<cycle>/train.jsonl): the sha256 is
    checked against the dataset manifest and reported on stderr.
    """
    from flywheel_assets.lib.curation.select import chat_jsonl_lines, export_chat_jsonl
    from flywheel_assets.lib.tables import DATASET_MANIFESTS, TRAINING_DATASET

    session: Session = ctx.obj
    session.require_home()
    with session.writing():  # a forget rewrites the exports: not while this one reads them
        lake = session.lake()
        manifests = {row["cycle"]: row for row in lake.read(DATASET_MANIFESTS).to_pylist()}
        if cycle not in manifests:
            fail(f"unknown cycle {cycle!r}: no dataset manifest (known: {', '.join(sorted(manifests)) or 'none'})",
                 EXIT_NOT_FOUND)
        manifest = manifests[cycle]
        rows = lake.read(TRAINING_DATASET, filter_sql="cycle = " + _sql_text(cycle))
        order = {trajectory_id: rank for rank, trajectory_id in enumerate(manifest["trajectory_ids"])}
        ids = rows.column("trajectory_id").to_pylist()
        rows = rows.take(sorted(range(rows.num_rows), key=lambda i: order.get(ids[i], len(order))))
        if output is None:
            stream = typer.get_binary_stream("stdout")
            digest = hashlib.sha256()
            for line in chat_jsonl_lines(rows):
                data = line.encode("utf-8")
                digest.update(data)
                stream.write(data)
            stream.flush()
            sha = digest.hexdigest()
        else:
            sha = export_chat_jsonl(rows, output)
    matches = "matches the manifest" if sha == manifest["content_sha256"] else \
        f"differs from the manifest's {manifest['content_sha256']}"
    typer.echo(f"{cycle}: {rows.num_rows} rows{' to ' + str(output) if output else ''}; sha256 {sha} {matches}",
               err=True)
