"""`suncet eval`: semi-supervised accuracy of a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from suncet.cli.main_console import console


def print_scores(result: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("representation")
    table.add_column("protocol")
    table.add_column("labeled images", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")

    def fmt(value):
        return "-" if value is None else f"{value:.4f}"

    classes = result.get("labeled_classes")
    labeled = f"{result['labeled_images']}" + (f" ({classes} class{'es' if classes != 1 else ''})" if classes else "")
    table.add_row("pre-trained backbone", result["protocol"], labeled, fmt(result["top1"]), fmt(result.get("top5")))
    if "raw_pixels" in result:
        raw = result["raw_pixels"]
        table.add_row("raw pixels", "linear", labeled, fmt(raw["top1"]), fmt(raw.get("top5")))
    console.print(table)
    if classes is not None and classes <= 5:
        console.print(
            f"the labeled images cover {classes} class{'es' if classes != 1 else ''}: no top-5 (it would "
            "rank classes that were never labeled)"
        )


@click.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--protocol",
    type=click.Choice(["linear", "knn", "snn", "finetune"]),
    default="linear",
    show_default=True,
    help="snn: PAWS's soft nearest neighbour over the labeled images (no training).",
)
@click.option("--labels", help="Evaluate with another labeled subset (spec or index file); default: the run's own.")
@click.option("--k", "knn_k", type=click.IntRange(min=1), help="Neighbours for --protocol knn (default: the run's).")
@click.option(
    "--finetune-epochs",
    type=click.IntRange(min=1),
    help="Epochs for --protocol finetune (default 60 when the labeled images are at most 2% of the training set, else 30).",
)
@click.option(
    "--finetune-head",
    type=click.Choice(["probe", "zero"]),
    default="probe",
    show_default=True,
    help="Where --protocol finetune starts its classifier: fitted to the frozen features, or zero as in the paper.",
)
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the run's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_command(run_dir, protocol, labels, knn_k, finetune_epochs, finetune_head, device, as_json):
    """Evaluate a run's backbone on the test split with the labeled subset.

    Prints the same-label raw-pixel baseline beside it for small datasets.
    """
    import dataclasses

    from suncet.engine.assemble import choose_labeled
    from suncet.engine.evaluate import evaluate_run, load_trained
    from suncet.engine.stopping import stop_at_once

    with stop_at_once("the evaluation"):
        run = load_trained(run_dir, device=device)
        if knn_k is not None:
            run.config = dataclasses.replace(run.config, knn_k=knn_k)
        labeled = None
        if labels is not None:
            labeled = choose_labeled(dataclasses.replace(run.config, labels=labels), run.dataset)
        result = evaluate_run(
            run,
            protocol,
            labeled=labeled,
            finetune_epochs=finetune_epochs,
            finetune_head=finetune_head,
            baseline=True,
        )
    result["run"] = str(run_dir)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        print_scores(result, title=f"{protocol} evaluation of {run_dir}")
