"""`suncet train`: pre-train with a method on a dataset and a label subset."""

from __future__ import annotations

from pathlib import Path

import click

from suncet.cli.evaluate import print_scores
from suncet.cli.main_console import console
from suncet.config import build_config, load_yaml, parse_key_values
from suncet.errors import ConfigError

# flag name -> config key, for flags that map one-to-one onto a config key
_FLAG_KEYS = (
    "method", "dataset", "data", "labels", "label_seed", "backbone", "epochs", "batch_size",
    "classes_per_step", "images_per_class", "suncet_weight", "suncet_epochs", "tau", "proj_hidden",
    "proj_dim", "optimizer", "lr", "start_lr", "final_lr", "warmup_epochs", "weight_decay", "momentum",
    "kernel", "device", "seed", "monitor_every", "probe_every", "final_eval", "preset",
    "checkpoint_every", "keep_checkpoints", "skip_nonfinite", "data_pipeline", "num_workers",
)


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML file of settings (flags override it).")
@click.option("--preset", help="Recipe preset: digits, cifar10, paper-imagenet-10pct.")
@click.option("--method", help="Method plugin (simclr, swav, supervised, ...).")
@click.option("--dataset", help="Dataset plugin (digits, ...).")
@click.option("--data", help="Dataset root directory, for datasets read from disk.")
@click.option("--dataset-opt", multiple=True, metavar="KEY=VALUE", help="Dataset option, e.g. size=256 (repeatable).")
@click.option("--data-pipeline", help="device (batched augmentation on the training device) or workers (torchvision per image in loader processes).")
@click.option("--num-workers", type=int, help="Loader processes for --data-pipeline workers.")
@click.option("--download/--no-download", default=None, help="Download the dataset if it is missing (where a network exists).")
@click.option("--labels", help="Labeled subset: 10%, 1%, 0.5%, 0%, 100%, 4/class, or a file of training indices.")
@click.option("--label-seed", type=int, help="Seed of the labeled-subset draw.")
@click.option("--backbone", help="Backbone plugin (small_resnet, resnet18, resnet50, ...).")
@click.option("--backbone-opt", multiple=True, metavar="KEY=VALUE", help="Backbone option (repeatable).")
@click.option("--method-opt", multiple=True, metavar="KEY=VALUE", help="Method option (repeatable).")
@click.option("--augment", "augment_opt", multiple=True, metavar="KEY=VALUE", help="Augmentation override, e.g. global_crop_scale=[0.3,1] (repeatable).")
@click.option("--optimizer", help="Optimizer plugin (lars, sgd, adamw).")
@click.option("--optimizer-opt", multiple=True, metavar="KEY=VALUE", help="Optimizer option (repeatable).")
@click.option("--epochs", type=int, help="Epochs (passes over the unlabeled images).")
@click.option("--batch-size", type=int, help="Unlabeled images per step (each gives two views).")
@click.option("--classes-per-step", type=int, help="Classes in each step's labeled batch.")
@click.option("--images-per-class", type=int, help="Labeled images per class in each step.")
@click.option("--suncet-weight", type=float, help="Weight of the SuNCEt term (0: off).")
@click.option("--suncet-epochs", type=int, help="Epoch after which SuNCEt is switched off (default: never).")
@click.option("--tau", type=float, help="Temperature of the contrastive terms.")
@click.option("--proj-hidden", type=int, help="Hidden width of the projection head.")
@click.option("--proj-dim", type=int, help="Output width of the projection head.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--start-lr", type=float, help="Learning rate at the start of the warm-up.")
@click.option("--final-lr", type=float, help="Learning rate at the end of the cosine decay.")
@click.option("--warmup-epochs", type=float, help="Linear warm-up length in epochs.")
@click.option("--weight-decay", type=float, help="Weight decay (not applied to biases and norms).")
@click.option("--momentum", type=float, help="Momentum.")
@click.option("--kernel", help="Contrastive kernel backend: auto, cpu, triton, cuda, reference.")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, help="Seed of initialisation, sampling and augmentation.")
@click.option("--deterministic/--no-deterministic", default=None, help="Ask torch for deterministic algorithms.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), help="Launch this many processes (torchrun) on this machine.")
@click.option("--sync-bn/--no-sync-bn", default=None, help="Synchronise BatchNorm statistics across GPUs.")
@click.option("--detach-remote-keys/--no-detach-remote-keys", default=None,
              help="Other ranks' embeddings carry no gradient (the reference code's objective, for parity).")
@click.option("--monitor-every", type=int, help="Epochs between kNN monitors (0: off).")
@click.option("--probe-every", type=int, help="Epochs between linear-probe monitors (0: off).")
@click.option("--final-eval", help="Evaluation after training: linear, knn, finetune or none.")
@click.option("--checkpoint-every", help="Checkpoint interval: 1epoch, 500steps, 10min (default 1epoch).")
@click.option("--keep-checkpoints", type=int, help="Numbered checkpoints kept besides last.pt (default 2).")
@click.option("--skip-nonfinite", type=int, help="Skip up to N steps with a NaN/inf loss instead of stopping.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run directory (default: runs/<name>-<time>).")
@click.option("--resume", "resume", help="RUN_DIR: continue that run. 'auto' (with --out): continue the run there "
              "from its newest loadable checkpoint if it has one, else start it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
def train(config_file, backbone_opt, method_opt, optimizer_opt, augment_opt, dataset_opt, out_dir, resume, overwrite, download,
          deterministic, nproc_per_node, sync_bn, detach_remote_keys, **flags):
    """Pre-train a backbone; ends with a semi-supervised evaluation.

    Example: suncet train --method simclr --labels 10%
    """
    from suncet.trainer import (
        TrainingStopped,
        evaluate_run,
        find_checkpoint,
        load_run_config,
        load_trained,
        prepare_run_dir,
        write_json,
    )
    from suncet.trainer import train as run_training

    from suncet import distributed

    if nproc_per_node is not None and not distributed.launched_by_torchrun():
        launch_torchrun(nproc_per_node)

    overrides = {key: flags[key] for key in _FLAG_KEYS if flags.get(key) is not None}
    for key, value in (("download", download), ("deterministic", deterministic), ("sync_bn", sync_bn),
                       ("detach_remote_keys", detach_remote_keys)):
        if value is not None:
            overrides[key] = value
    for option, key, pairs in (
        ("--backbone-opt", "backbone_options", backbone_opt),
        ("--method-opt", "method_options", method_opt),
        ("--optimizer-opt", "optimizer_options", optimizer_opt),
        ("--augment", "augment", augment_opt),
        ("--dataset-opt", "dataset_options", dataset_opt),
    ):
        if pairs:
            overrides[key] = parse_key_values(pairs, option)

    state = None
    if resume is None:
        config = build_config(load_yaml(config_file) if config_file else None, overrides)
        run_dir = prepare_run_dir(config, out_dir, overwrite)
    elif resume == "auto":
        if out_dir is None:
            raise ConfigError("--resume auto needs --out RUN_DIR: the run directory to continue or start")
        config = build_config(load_yaml(config_file) if config_file else None, overrides)
        run_dir = out_dir
        if not overwrite:
            state = find_checkpoint(run_dir, fallback=True, report=console.print)
    else:
        if overrides or config_file or out_dir:
            raise ConfigError("--resume RUN_DIR continues a run with its saved config; give no other settings with it")
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {resume}: no such run directory")
        config = load_run_config(run_dir)
        state = find_checkpoint(run_dir, fallback=False, report=console.print)
        if state is None:
            console.print(f"no checkpoint in {run_dir}: the run starts from the beginning")

    try:
        run_training(config, run_dir, state=state, console=console)
    except TrainingStopped:
        distributed.shutdown()  # every rank agreed to stop: no collective is pending
        raise
    if distributed.is_main_process():
        console.print(f"run written to {run_dir}")
        if config.final_eval != "none":
            run = load_trained(run_dir)
            result = evaluate_run(run, config.final_eval, baseline=True)
            write_json(run_dir / f"eval_{config.final_eval}.json", result)
            print_scores(result, title=f"{config.final_eval} evaluation of {run_dir}")
    distributed.shutdown()


def launch_torchrun(nproc: int) -> None:
    """Replace this process with torchrun running the same command in ``nproc`` processes."""
    import os
    import sys

    script = sys.argv[0]
    if not (os.path.isfile(script) and os.path.basename(script) == "suncet"):
        raise ConfigError("--nproc-per-node needs the installed `suncet` command (or run torchrun yourself)")
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *args]
    sys.stdout.flush()
    os.execv(sys.executable, command)
