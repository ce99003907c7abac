"""The loss modules as a user of lightly or pytorch-metric-learning would use them: values and
gradients against float64 transcriptions of those libraries' formulas and against
pytorch-metric-learning itself, torch.compile(fullgraph=True), every backend, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rerun_under_triton_interpreter, skip_unless_triton_interpreter

from suncet.kernels import backend_status, set_fp32_precision
from suncet.losses import (
    MultiPositiveContrastiveLoss,
    NTXentLoss,
    NTXentSuNCEtLoss,
    PAWSLoss,
    SuNCEtLoss,
    SwAVLoss,
    soft_nearest_neighbours,
)

CPU_BACKENDS = [b for b in ("reference", "cpu") if backend_status()[b][0]]
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0, 3, 1, 1, 4, 2])  # classes 3 and 4 are singletons


def data(rows=12, dim=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Float64 transcriptions of the peers' formulas, written here independently of suncet.


def lightly_ntxent(out0, out1, t):
    """lightly.loss.NTXentLoss without a memory bank: cross-entropy over [view1; view2] rows whose
    logits are every other row, the positive being the other view."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    b = out0.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    l00, l01, l10, l11 = (x @ y.T / t for x, y in ((out0, out0), (out0, out1), (out1, out0), (out1, out1)))
    l00, l11 = l00[~eye].view(b, -1), l11[~eye].view(b, -1)
    logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)])
    return F.cross_entropy(logits, torch.arange(b).repeat(2))


def nca(z, labels, scale):
    """NCA (Goldberger et al.): per row, -log of the softmax mass, over squared Euclidean
    distances of the normalised rows times -scale, on the same-class rows; rows with none left out."""
    z = F.normalize(z, dim=1)
    losses = []
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        d = torch.stack([-scale * (z[i] - z[j]).pow(2).sum() for j in others])
        p = torch.softmax(d, 0)
        same = torch.tensor([bool(labels[j] == labels[i]) for j in others])
        if same.any():
            losses.append(-torch.log(p[same].sum()))
    return torch.stack(losses).mean()


def supcon_in(z, labels, t, ref=None, ref_labels=None):
    """Supervised contrastive L_in: -log(sum over positives of exp / sum over all of exp)."""
    z = F.normalize(z, dim=1)
    columns = z if ref is None else F.normalize(ref, dim=1)
    column_labels = labels if ref is None else ref_labels
    losses = []
    for i in range(len(z)):
        seen = [j for j in range(len(columns)) if ref is not None or j != i]
        s = torch.stack([z[i] @ columns[j] / t for j in seen])
        positive = torch.tensor([bool(column_labels[j] == labels[i]) for j in seen])
        if positive.any():
            losses.append(torch.logsumexp(s, 0) - torch.logsumexp(s[positive], 0))
    return torch.stack(losses).mean()


def lightly_swav(high, low, t, iterations, eps):
    """lightly.loss.SwaVLoss: Sinkhorn codes of each high-resolution crop, predicted from every
    other crop by a softmax at temperature t; the mean over those pairs."""

    def sinkhorn(scores):
        q = torch.exp(scores / eps).T
        q = q / q.sum()
        k, b = q.shape
        for _ in range(iterations):
            q = q / q.sum(dim=1, keepdim=True) / k
            q = q / q.sum(dim=0, keepdim=True) / b
        return (q * b).T

    crops = high + low
    total = 0.0
    for i, scores in enumerate(high):
        q = sinkhorn(scores.detach())
        others = [-(q * F.log_softmax(crops[j] / t, dim=1)).sum(1).mean() for j in range(len(crops)) if j != i]
        total = total + sum(others) / len(others)
    return total / len(high)


def assert_value_and_grad(module_call, reference_call, inputs, rtol=1e-5, atol=1e-7):
    """The module (on fp32 copies) against the reference (float64): value and input gradients."""
    ref_inputs = [x.detach().double().requires_grad_(x.is_floating_point()) for x in inputs]
    expected = reference_call(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, [x for x in ref_inputs if x.requires_grad])
    got_inputs = [x.detach().float().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    got = module_call(*got_inputs)
    got_grads = torch.autograd.grad(got, [x for x in got_inputs if x.requires_grad])
    torch.testing.assert_close(got.double(), expected.detach(), rtol=rtol, atol=atol)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=rtol * 10, atol=atol * 10)


# ---------------------------------------------------------------------------------------------
# Values and gradients.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_ntxent_equals_lightlys_formula(backend, t):
    out0, out1 = data(6, seed=1), data(6, seed=2)
    assert_value_and_grad(
        NTXentLoss(temperature=t, backend=backend), lambda a, b: lightly_ntxent(a, b, t), [out0, out1]
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_suncet_is_nca_with_softmax_scale_one_over_two_tau(backend, t):
    loss = SuNCEtLoss(t, backend=backend)
    assert_value_and_grad(lambda z: loss(z, LABELS), lambda z: nca(z, LABELS, 1 / (2 * t)), [data()])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multi_positive_sums_positives_inside_the_log(backend):
    t = 0.2
    loss = MultiPositiveContrastiveLoss(t, backend=backend)
    assert_value_and_grad(lambda z: loss(z, LABELS), lambda z: supcon_in(z, LABELS, t), [data()])
    ref_labels = torch.tensor([1, 0, 2, 2, 5, 0, 1])
    assert_value_and_grad(
        lambda z, r: loss(z, LABELS, r, ref_labels),
        lambda z, r: supcon_in(z, LABELS, t, r, ref_labels),
        [data(), data(7, seed=3)],
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_pair_equals_the_two_losses_apart(backend):
    t = 0.3
    out0, out1, labeled = (data(6, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    ntxent, suncet = NTXentSuNCEtLoss(t, backend=backend)(out0, out1, labeled, LABELS[:6])
    torch.testing.assert_close(ntxent, NTXentLoss(t, backend=backend)(out0, out1))
    torch.testing.assert_close(suncet, SuNCEtLoss(t, backend=backend)(labeled, LABELS[:6]))


def test_swav_equals_lightlys_formula():
    g = torch.Generator().manual_seed(4)
    prototypes = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    crops = [F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1) for _ in range(4)]
    loss = SwAVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    assert_value_and_grad(
        lambda *z: loss([c @ prototypes.float().T for c in z[:2]], [c @ prototypes.float().T for c in z[2:]]),
        lambda *z: lightly_swav([c @ prototypes.T for c in z[:2]], [c @ prototypes.T for c in z[2:]], 0.1, 3, 0.05),
        crops,
        rtol=1e-4,
    )


def test_swav_codes_take_the_queue_into_the_assignment():
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    queued = torch.randn(20, 6, generator=torch.Generator().manual_seed(6))
    loss = SwAVLoss()
    alone, with_queue = loss.codes(scores), loss.codes(scores, queued)
    torch.testing.assert_close(with_queue, loss.codes(torch.cat([queued, scores]))[-4:])
    assert with_queue.shape == alone.shape and not torch.allclose(with_queue, alone)


def test_peer_library_gives_the_same_values():
    """pytorch-metric-learning's own losses, at the settings the docstrings state."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    z, t = data(), 0.2
    out0, out1 = data(6, seed=1), data(6, seed=2)
    torch.testing.assert_close(
        NTXentLoss(t, backend="reference")(out0, out1),
        pml.NTXentLoss(temperature=t)(torch.cat([out0, out1]), torch.arange(6).repeat(2)),
    )
    torch.testing.assert_close(
        SuNCEtLoss(t, backend="reference")(z, LABELS), pml.NCALoss(softmax_scale=1 / (2 * t))(z, LABELS)
    )
    # SupConLoss is the L_out form: another loss as soon as a row has several positives...
    ours = MultiPositiveContrastiveLoss(t, backend="reference")
    assert not math.isclose(ours(z, LABELS).item(), pml.SupConLoss(temperature=t)(z, LABELS).item(), rel_tol=1e-3)
    # ...and the same one with a single positive per row.
    pairs = torch.arange(6).repeat(2)
    torch.testing.assert_close(
        ours(torch.cat([out0, out1]), pairs), pml.SupConLoss(temperature=t)(torch.cat([out0, out1]), pairs)
    )


# ---------------------------------------------------------------------------------------------
# torch.compile, backends, settings.


def _module_calls(backend):
    out0, out1, labeled = (data(6, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    prototypes = F.normalize(data(5, 7, seed=4, dtype=torch.float32), dim=1)
    return {
        "ntxent": (NTXentLoss(0.2, backend=backend), (out0, out1)),
        "suncet": (SuNCEtLoss(0.2, backend=backend), (labeled, LABELS[:6])),
        "ntxent_suncet": (NTXentSuNCEtLoss(0.2, backend=backend), (out0, out1, labeled, LABELS[:6])),
        "multi_positive": (MultiPositiveContrastiveLoss(0.2, backend=backend), (out0, LABELS[:6], out1, LABELS[6:])),
        "swav": (lambda a, b: SwAVLoss()([a @ prototypes.T, b @ prototypes.T]), (out0, out1)),
    }


def _total(value):
    return sum(value) if isinstance(value, tuple) else value


def value_and_grads(module, inputs):
    """The module's (summed) value on fresh leaves of ``inputs``, and its gradients in them."""
    leaves = [x.clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    value = _total(module(*leaves))
    return value, torch.autograd.grad(value, [x for x in leaves if x.requires_grad])


def assert_same_value_and_grads(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, e in zip(got[1], want[1]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["ntxent", "suncet", "ntxent_suncet", "multi_positive", "swav"])
def test_each_module_compiles_as_one_graph_with_its_backward(backend, name):
    module, inputs = _module_calls(backend)[name]
    eager = value_and_grads(module, inputs)
    compiled = value_and_grads(torch.compile(module, fullgraph=True, backend="aot_eager"), inputs)
    assert_same_value_and_grads(compiled, eager)


def test_triton_interpreter_modules_match_the_cpu_backend():
    skip_unless_triton_interpreter()
    backend_status.cache_clear()
    set_fp32_precision("ieee")
    try:
        expected, got = _module_calls("reference"), _module_calls("triton")
        for name in ("ntxent", "suncet", "ntxent_suncet", "multi_positive"):
            assert_same_value_and_grads(value_and_grads(*got[name]), value_and_grads(*expected[name]))
    finally:
        set_fp32_precision("tf32")


def test_triton_interpreter_modules_in_subprocess():
    rerun_under_triton_interpreter(__file__, "test_triton_interpreter_modules_match", passed=1)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1e-39, float("nan"), float("inf"), True, "0.1"])
def test_bad_temperatures_are_refused_in_one_line(bad):
    for make in (NTXentLoss, SuNCEtLoss, NTXentSuNCEtLoss, MultiPositiveContrastiveLoss, SwAVLoss):
        with pytest.raises(
            ValueError, match="^temperature must be a (finite number >= 0.001|real number), got "
        ) as info:
            make(temperature=bad)
        assert "\n" not in str(info.value)


def test_bad_backends_gathers_and_sinkhorn_settings_are_refused():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'cpu', .*, got 'gpu'"):
        NTXentLoss(backend="gpu")
    with pytest.raises(ValueError, match="gather must be one of 'grad', 'detached', None, got 'all'"):
        SuNCEtLoss(gather="all")
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        SwAVLoss(sinkhorn_iterations=0)
    with pytest.raises(ValueError, match="sinkhorn_epsilon"):
        SwAVLoss(sinkhorn_epsilon=float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


def test_a_nan_stays_visible():
    z = data(12, dtype=torch.float32)
    z[3, 1] = float("nan")
    for backend in CPU_BACKENDS:
        assert torch.isnan(SuNCEtLoss(backend=backend)(z, LABELS))
        assert torch.isnan(NTXentLoss(backend=backend)(z[:6], z[6:]))
        assert torch.isnan(MultiPositiveContrastiveLoss(backend=backend)(z, LABELS))
    scores = torch.randn(8, 5)
    scores[0, 0] = float("nan")
    assert torch.isnan(SwAVLoss()([scores, torch.randn(8, 5)]))


# ---------------------------------------------------------------------------------------------
# PAWS: a float64 transcription of method.md section 9.


def paws_reference(
    anchor_views, anchor_supports, support_rows, target_views, target_supports, tau, sharpen_t, multicrop
):
    """Loops over rows: soft nearest neighbours, sharpened swapped targets, multi-crop targets,
    entries below 1e-4 zeroed, cross-entropy and me-max."""

    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    def snn(x, s):
        x, s = unit(x), unit(s)
        rows = []
        for i in range(len(x)):
            w = torch.softmax(torch.stack([x[i] @ s[j] / tau for j in range(len(s))]), 0)
            rows.append(sum(w[j] * support_rows[j] for j in range(len(s))))
        return torch.stack(rows)

    def sharp(p):
        p = p ** (1 / sharpen_t)
        return p / p.sum(1, keepdim=True)

    batch = len(anchor_views) // (2 + multicrop)
    probs = snn(anchor_views, anchor_supports)
    with torch.no_grad():
        targets = sharp(snn(target_views, target_supports))
        targets = torch.cat([targets] + [0.5 * (targets[:batch] + targets[batch:])] * multicrop)
        targets = torch.where(targets < 1e-4, 0.0, targets)
    cross_entropy = torch.stack([-(targets[i] * torch.log(probs[i])).sum() for i in range(len(probs))]).mean()
    pbar = sharp(probs).mean(0)
    return cross_entropy + (pbar * torch.log(pbar)).sum()


@pytest.mark.parametrize("multicrop", [0, 2])
@pytest.mark.parametrize("snn", ["matmul", "attention"])
def test_paws_loss_equals_method_md_in_float64(multicrop, snn):
    batch, classes = 4, 3
    g = torch.Generator().manual_seed(7 + multicrop)
    anchors = torch.randn((2 + multicrop) * batch, 6, generator=g, dtype=torch.float64)
    supports = torch.randn(9, 6, generator=g, dtype=torch.float64)
    targets = torch.randn(2 * batch, 6, generator=g, dtype=torch.float64)
    labels = torch.arange(9) % classes
    rows = torch.nn.functional.one_hot(labels, classes).double() * 0.9 + 0.1 / classes
    loss = PAWSLoss(0.1, 0.25, multicrop, label_smoothing=0.1, num_classes=classes, snn=snn)
    assert_value_and_grad(
        lambda a, s: sum(loss(a, s, labels, targets.float(), s.detach(), labels)),
        lambda a, s: paws_reference(a, s, rows, targets, s.detach(), 0.1, 0.25, multicrop),
        [anchors, supports],
        rtol=1e-4,
    )


def test_soft_nearest_neighbours_by_attention_equals_the_matmul_path_past_the_fused_width():
    from suncet.losses.paws import ATTENTION_MAX_CLASSES

    g = torch.Generator().manual_seed(3)
    queries, supports = torch.randn(50, 32, generator=g), torch.randn(700, 32, generator=g)
    labels = torch.nn.functional.one_hot(torch.arange(700) % 600, 600).float()  # more classes than one call takes
    assert labels.shape[1] > ATTENTION_MAX_CLASSES
    torch.testing.assert_close(
        soft_nearest_neighbours(queries, supports, labels, 0.1, "attention"),
        soft_nearest_neighbours(queries, supports, labels, 0.1, "matmul"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_paws_loss_refuses_bad_settings_and_keeps_a_nan():
    for bad in (
        dict(temperature=0.0),
        dict(sharpen_temperature=float("nan")),
        dict(multicrop=-1),
        dict(label_smoothing=1.0),
        dict(gather="all"),
        dict(snn="flash"),
    ):
        with pytest.raises(ValueError):
            PAWSLoss(**bad)
    loss = PAWSLoss(multicrop=0, num_classes=3)
    views = torch.randn(8, 5)
    views[2, 1] = float("nan")
    supports, labels = torch.randn(6, 5), torch.arange(6) % 3
    assert not torch.isfinite(sum(loss(views, supports, labels, views.detach(), supports, labels)))
    with pytest.raises(ValueError, match="num_classes"):
        PAWSLoss(multicrop=0)(views, supports, labels, views, supports, labels)
