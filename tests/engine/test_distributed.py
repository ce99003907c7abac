"""Distributed training on CPU with gloo, in real processes: the objective does not depend on
the world size, and `suncet train --nproc-per-node 2` runs, writes one set of files, resumes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import SUNCET
from torch import nn

from suncet.distributed import shutdown
from suncet.kernels import backend_status
from suncet.losses import (
    BarlowTwinsLoss,
    MultiPositiveContrastiveLoss,
    NTXentLoss,
    NTXentSuNCEtLoss,
    PAWSLoss,
    SuNCEtLoss,
    SwAVLoss,
    VICRegLoss,
    nt_xent,
    nt_xent_and_suncet,
    sinkhorn,
    suncet_loss,
    swapped_prediction_loss,
)

WORLD = 2
CPU_BACKENDS = [name for name in ("reference", "cpu") if backend_status().get(name, (False,))[0]]


def whole_batch(seed=0):
    """Inputs of one global batch; rank r takes the r-th contiguous share of every block."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x1": torch.randn(8, 6, generator=g, dtype=torch.float64),  # unlabeled images, view 1
        "x2": torch.randn(8, 6, generator=g, dtype=torch.float64),  # the same images, view 2
        "xl": torch.randn(10, 6, generator=g, dtype=torch.float64),  # labeled images
        "y": torch.tensor([0, 1, 1, 2, 3, 0, 2, 4, 4, 1]),  # class 3 is a singleton
        "k1": torch.tensor([0, 1, 1, 2, 0, 3, 2, 1]),  # keys of x1's rows and x2's rows, for the
        "k2": torch.tensor([1, 1, 0, 2, 5, 0, 4, 2]),  # multi-positive loss against reference rows
        "prototypes": torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1),
    }


def share(t, r):
    n = t.shape[0] // WORLD
    return t[r * n : (r + 1) * n]


def objectives(model, x1, x2, xl, y, k1, k2, prototypes, backend, gather):
    """Every distributed loss of the engine on one (local or global) batch."""
    z1, z2, zl = model(x1), model(x2), model(xl)
    ntxent = nt_xent(torch.cat([z1, z2]), 0.2, backend=backend, gather=gather)
    suncet = suncet_loss(zl, y, 0.2, backend=backend, gather=gather)
    both = sum(nt_xent_and_suncet(torch.cat([z1, z2]), zl, y, 0.2, backend=backend, gather=gather))
    p1, p2 = (nn.functional.normalize(z[:, :4], dim=1) @ prototypes.T for z in (z1, z2))
    swav = swapped_prediction_loss([p1, p2], [sinkhorn(p1, 0.05, 3), sinkhorn(p2, 0.05, 3)], 0.1)
    # The modules as a user's own loop calls them: under torchrun their denominators span every rank.
    modules = {
        "NTXentLoss": NTXentLoss(0.2, backend=backend)(z1, z2),
        "SuNCEtLoss": SuNCEtLoss(0.2, backend=backend)(zl, y),
        "NTXentSuNCEtLoss": sum(NTXentSuNCEtLoss(0.2, backend=backend)(z1, z2, zl, y)),
        "MultiPositiveContrastiveLoss": MultiPositiveContrastiveLoss(0.2, backend=backend)(z1, k1, z2, k2),
        "SwAVLoss": SwAVLoss()([p1, p2]),
        # batch statistics over every rank's rows (VICReg's invariance stays per rank: its mean is the whole's)
        "VICRegLoss": VICRegLoss()(z1, z2),
        "BarlowTwinsLoss": BarlowTwinsLoss(0.3)(z1, z2),
        # supports gathered with gradient, me-max over every rank's anchors
        "PAWSLoss": sum(
            PAWSLoss(0.2, multicrop=0, num_classes=5)(
                torch.cat([z1, z2]), zl, y, torch.cat([z2, z1]).detach(), zl.detach(), y
            )
        ),
    }
    return {"ntxent": ntxent, "suncet": suncet, "both": both, "swav": swav, **modules}


OBJECTIVES = (
    "ntxent",
    "suncet",
    "both",
    "swav",
    "NTXentLoss",
    "SuNCEtLoss",
    "NTXentSuNCEtLoss",
    "MultiPositiveContrastiveLoss",
    "SwAVLoss",
    "PAWSLoss",
    "VICRegLoss",
    "BarlowTwinsLoss",
)


def model_for_test():
    torch.manual_seed(0)
    return nn.Linear(6, 5).double()


def rank_worker(r, init_file, backend, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    data = whole_batch()
    out = {}
    for name in OBJECTIVES:
        model = nn.parallel.DistributedDataParallel(model_for_test())
        local = {k: share(v, r) if k != "prototypes" else v for k, v in data.items()}
        loss = objectives(model, **local, backend=backend, gather="grad")[name]
        loss.backward()
        values = torch.stack([loss.detach()])
        dist.all_reduce(values)
        # Plain lists: tensors in a queue would need this process alive until they are read.
        out[name] = (values.item() / WORLD, [p.grad.tolist() for p in model.parameters()])
    results.put((r, out))
    del model
    shutdown()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_ranks_on_halves_equal_one_rank_on_the_whole(tmp_path, backend):
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=rank_worker, args=(r, tmp_path / "init", backend, results)) for r in range(WORLD)
    ]
    for p in processes:
        p.start()
    gathered = dict(results.get(timeout=300) for _ in processes)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    data = whole_batch()
    for name in OBJECTIVES:
        model = model_for_test()
        loss = objectives(model, **data, backend=backend, gather=None)[name]
        loss.backward()
        tolerance = dict(rtol=1e-10, atol=1e-12) if backend == "reference" else dict(rtol=1e-4, atol=1e-6)
        for r in range(WORLD):
            value, grads = gathered[r][name]
            torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), loss.detach(), **tolerance)
            for got, expected in zip(grads, (p.grad for p in model.parameters())):
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, **tolerance)


def rows(run):
    with open(run / "metrics.csv", newline="") as handle:
        return [
            {k: v for k, v in r.items() if k not in ("images_per_second", "train_seconds")}
            for r in csv.DictReader(handle)
        ]


SMALL = (
    "--batch-size",
    "32",
    "--proj-hidden",
    "64",
    "--backbone-opt",
    "width=8",
    "--warmup-epochs",
    "1",
    "--final-eval",
    "none",
    "--seed",
    "2",
)


# SwAV with a queue: each rank queues its own embeddings, which a resumed run must get back.
SWAV_QUEUE = (
    "--method",
    "swav",
    "--method-opt",
    "local_crops=0",
    "--method-opt",
    "queue_length=64",
    "--method-opt",
    "queue_start_epoch=0",
)


def test_two_process_training_writes_one_run_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    done = subprocess.run(
        [SUNCET, "train", "--nproc-per-node", "2", "--epochs", "2", *SMALL, *SWAV_QUEUE, "--out", str(whole)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in whole.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "labels.txt",
        "metrics.csv",
        "status.json",
    ]
    assert '"state": "finished"' in (whole / "status.json").read_text()
    assert done.stdout.count("epoch 2/2") == 1  # rank 0 alone reports
    assert "FutureWarning" not in done.stderr  # suncet asks DDP for per-rank buffers with its current argument

    part = tmp_path / "part"
    process = subprocess.Popen(
        [
            SUNCET,
            "train",
            "--nproc-per-node",
            "2",
            "--epochs",
            "2",
            *SMALL,
            *SWAV_QUEUE,
            "--checkpoint-every",
            "3steps",
            "--out",
            str(part),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(part.glob("checkpoints/step-*.pt")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "checkpoint written" in err
    resumed = subprocess.run(
        [SUNCET, "train", "--nproc-per-node", "2", "--resume", str(part)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert rows(part) == rows(whole)
