"""The soft nearest-neighbour product of PAWS, ``softmax(Q S^T / tau) @ Y``, computed each way
``suncet.losses.paws.soft_nearest_neighbours`` offers: ``matmul`` (two GEMMs and a softmax) and
``attention`` (``scaled_dot_product_attention``, whose fused CPU and GPU kernels take the labels
as values, in chunks of at most 256 classes). Each is timed forward + backward (median) and
checked against a float64 evaluation of the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from suncet.bench.kernels import DTYPES, _median_ms, machine_info
from suncet.losses.paws import SNN_METHODS, soft_nearest_neighbours

TAU = 0.1


@dataclass
class SnnResult:
    anchors: int
    supports: int
    dim: int
    classes: int
    dtype: str
    method: str
    step_ms: float | None = None
    max_rel_error: float | None = None  # of the forward, against float64
    error: str | None = None


def default_shapes(device: torch.device) -> list[tuple[int, int, int, int]]:
    """(anchors, supports, width, classes): digits-sized, CIFAR-10-sized (10 x 64 supports), and on
    a GPU one GPU's share of the ImageNet recipe (8 views x 64 images against 6,720 supports)."""
    shapes = [(1024, 40, 128, 10), (2048, 640, 128, 10), (2048, 1000, 128, 1000)]
    if device.type == "cuda":
        shapes.append((512, 6720, 2048, 1000))
    return shapes


def measure(anchors, supports, dim, classes, dtype, method, device, repeats, warmup) -> SnnResult:
    result = SnnResult(anchors, supports, dim, classes, dtype, method)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(anchors, dim, generator=g).to(device, DTYPES[dtype])
    s = torch.randn(supports, dim, generator=g).to(device, DTYPES[dtype])
    labels = F.one_hot(torch.arange(supports) % classes, classes).to(device, DTYPES[dtype])
    try:
        with torch.no_grad():
            got = soft_nearest_neighbours(q, s, labels, TAU, method).double()
            want = soft_nearest_neighbours(q.double(), s.double(), labels.double(), TAU, "matmul")
        result.max_rel_error = ((got - want).abs().max() / want.abs().max()).item()
        qg, sg = q.clone().requires_grad_(True), s.clone().requires_grad_(True)

        def step():
            out = soft_nearest_neighbours(qg, sg, labels, TAU, method)
            out.sum().backward()

        result.step_ms = _median_ms(step, repeats, warmup, device)
    except RuntimeError as exc:  # a fused path that does not take these inputs says so in its row
        result.error = str(exc).splitlines()[0][:160]
    return result


def run(shapes, dtypes, device, repeats, warmup, progress=None) -> list[SnnResult]:
    results = []
    for anchors, supports, dim, classes in shapes:
        for dtype in dtypes:
            for method in SNN_METHODS:
                result = measure(anchors, supports, dim, classes, dtype, method, device, repeats, warmup)
                results.append(result)
                if progress is not None:
                    progress(result)
    return results


def as_json(results: list[SnnResult], device: torch.device, command: str) -> dict:
    return {"machine": machine_info(device), "command": command, "tau": TAU, "results": [asdict(r) for r in results]}
