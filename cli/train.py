"""`suncet train`: flags -> config -> engine -> printed result.

Every TrainConfig field is a flag, generated from the dataclass with its help text.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

import click
import yaml

from suncet.cli.evaluate import print_scores
from suncet.cli.main_console import console
from suncet.config import TrainConfig, load_yaml, to_yaml
from suncet.errors import ConfigError, shown
from suncet.presets import build_config, given_keys

# Settings with a flag of their own elsewhere: run_dir is --out.
_NOT_FLAGS = {"run_dir"}
_TYPES = typing.get_type_hints(TrainConfig)


def _base_type(annotation) -> type:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def config_options(command):
    """Add one click option per TrainConfig field (each with the field's name as parameter)."""
    for f in reversed([f for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_FLAGS]):
        kind, name, help_text = _base_type(_TYPES[f.name]), _flag_name(f), f.metadata.get("help", "")
        if kind is bool:
            flag = name.removeprefix("--")
            option = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_text)
        elif kind is dict:
            option = click.option(name, f.name, multiple=True, metavar="KEY=VALUE", help=help_text)
        elif kind is list:
            option = click.option(name, f.name, multiple=True, metavar="NAME", help=help_text)
        else:
            option = click.option(name, f.name, type={int: int, float: float}.get(kind, str), help=help_text)
        command = option(command)
    return command


def parse_key_values(pairs: tuple[str, ...] | list[str], option: str) -> dict:
    """``key=value`` strings to a dict, values read as YAML scalars (3000 -> int, true -> bool),
    as a settings file would give them: each becomes its declared type where it is used."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{option} expects KEY=VALUE, got {shown(pair)}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def overrides_from(flags: dict) -> dict:
    """The config keys the user set on the command line."""
    overrides = {}
    for f in dataclasses.fields(TrainConfig):
        value = flags.get(f.name)
        if f.name in _NOT_FLAGS or value is None or value == ():
            continue
        kind = _base_type(_TYPES[f.name])
        overrides[f.name] = (
            parse_key_values(value, _flag_name(f)) if kind is dict else list(value) if kind is list else value
        )
    return overrides


@click.command()
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML file of settings (flags override it)."
)
@config_options
@click.option(
    "--nproc-per-node", type=click.IntRange(min=1), help="Launch this many processes (torchrun) on this machine."
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    help="With --print-config: the machines the run will use "
    "(the global batch is nnodes x nproc-per-node x batch-size). Start multi-node runs with torchrun.",
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the resolved settings (presets applied, learning rates "
    "scaled to the global batch) as YAML, and exit without training.",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run directory (default: runs/<name>-<time>).")
@click.option(
    "--resume",
    "resume",
    help="RUN_DIR: continue that run. 'auto' (with --out): continue the run there "
    "from its newest loadable checkpoint if it has one, else start it.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh in --out, which holds a run; its files are moved "
    "into --out/replaced-<time>/, nothing is deleted.",
)
def train(config_file, out_dir, resume, overwrite, nproc_per_node, nnodes, print_config, **flags):
    """Pre-train a backbone; ends with a semi-supervised evaluation.

    Example: suncet train --method simclr --labels 10%
    """
    from suncet import distributed
    from suncet.engine.api import run_start
    from suncet.engine.assemble import check_data, check_settings
    from suncet.engine.rundir import start_or_resume

    launching = nproc_per_node is not None and not distributed.launched_by_torchrun()
    if nnodes is not None and not print_config:
        raise ConfigError(
            "--nnodes only sizes --print-config; start a multi-node run with torchrun (docs/distributed.md)"
        )
    overrides = overrides_from(flags)
    config, given = None, frozenset()
    if resume not in (None, "auto") and (overrides or config_file or out_dir or print_config):
        raise ConfigError("--resume RUN_DIR continues a run with its saved config; give no other settings with it")
    if resume in (None, "auto"):
        file_values = load_yaml(config_file) if config_file else None
        config = build_config(file_values, overrides, file_name=config_file)
        given = given_keys(file_values, overrides)
    if config is not None and (print_config or launching):
        check_settings(config)  # everything that can be checked once, before anything starts
    if print_config:
        processes = (nproc_per_node or 1) * (nnodes or 1)
        preset = f"preset {config.preset}" if config.preset else "no preset"
        click.echo(f"# {preset}; learning rates for {processes} process(es)")
        click.echo(_fitted_yaml(config, processes, given), nl=False)
        return
    if launching:
        if resume is None:
            start_or_resume(config, out_dir, None, overwrite, lock=False)
        if config is not None:
            check_data(config, nproc_per_node, given)
        launch_torchrun(nproc_per_node)
    start = start_or_resume(config, out_dir, resume, overwrite, report=console.print)
    result = run_start(start, console, given)
    if result.main_process:
        console.print(f"run written to {start.run_dir}")
        if result.evaluation is not None:
            print_scores(result.evaluation, title=f"{start.config.final_eval} evaluation of {start.run_dir}")


def _fitted_yaml(config: TrainConfig, world_size: int, given: frozenset[str]) -> str:
    """The settings as the run will use them: fitted to the data where it can be read here (a
    batch larger than the dataset shrinks, and the learning rates follow; a value the user gave
    that the data cannot serve is refused as the run would refuse it), the changes as comments;
    where the data cannot be read, the settings as given and a comment saying why."""
    from suncet.engine.assemble import check_data, load_dataset
    from suncet.optim import scale_learning_rates

    try:
        dataset = load_dataset(config)
    except ConfigError as exc:
        reason = " ".join(str(exc).split())
        return f"# not fitted to the data, which cannot be read here: {reason}\n" + to_yaml(
            scale_learning_rates(config, world_size, given)
        )
    fitted, notes = check_data(config, world_size, given, dataset)
    return "".join(f"# fitted to the data: {note}\n" for note in notes) + to_yaml(fitted)


def launch_torchrun(nproc: int) -> None:
    """Replace this process with torchrun running the same command in ``nproc`` processes."""
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
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        script,
        *args,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, command)
