"""The method-plugin contract: a method implements its objective on the unlabeled views, the base
class adds the labeled term exactly as the settings name it, for every registered method and the
example package, and plugins of the earlier contract never get the labeled term twice."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from suncet.config import TrainConfig
from suncet.data import TrainBatch
from suncet.engine.assemble import may_skip_parameters
from suncet.errors import ConfigError
from suncet.methods import LabeledTerm, LabeledTermConfig, Method, MethodConfig, projection_head
from suncet.plugins.backbones.resnet import small_resnet
from suncet.registry import LABEL_LOSSES, METHODS

EXAMPLE = REPO / "plugins" / "examples" / "suncet-barlow-twins"
NUM_CLASSES = 4


def _load(name: str, path) -> type:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def example_method() -> type[Method]:
    return _load("suncet_barlow_twins", EXAMPLE / "suncet_barlow_twins" / "__init__.py").BarlowTwins


def earlier_contract_method() -> type[Method]:
    return _load(
        "earlier_contract_barlow_twins", REPO / "tests" / "fixtures" / "earlier_contract_barlow_twins.py"
    ).BarlowTwins


METHOD_CLASSES = {name: METHODS.get(name).obj for name in METHODS.names()} | {
    "barlow_twins (example)": example_method()
}
# Options that make every parameter train from the first step (SwAV freezes its prototypes at
# first, DINO its head's last layer), and a MoCo queue that a short run fills and wraps around.
OPTIONS = {
    "swav": {"local_crops": 1, "freeze_prototypes_epochs": 0.0},
    "paws": {"local_crops": 1},
    "moco": {"queue_size": 100},
    "dino": {"local_crops": 1, "freeze_last_layer_epochs": 0.0, "out_dim": 32},
}
# Methods whose own objective takes the unlabeled views only: the base class adds the labeled term.
ADDS_LABELED_TERM = [n for n, cls in METHOD_CLASSES.items() if not cls.objective_uses_labels]
OWN_OBJECTIVE = [n for n in ADDS_LABELED_TERM if METHOD_CLASSES[n].global_views or METHOD_CLASSES[n].local_views]


def build(name: str, **settings) -> Method:
    torch.manual_seed(0)
    settings = {"backend": "reference", **settings}
    train = TrainConfig(
        proj_hidden=32, proj_dim=16, tau=0.5, epochs=10, method_options=OPTIONS.get(name, {}), **settings
    )
    return METHOD_CLASSES[name](small_resnet(in_channels=1, image_size=8, width=4), MethodConfig(train, NUM_CLASSES))


def batch_for(method: Method, epoch: int = 0) -> TrainBatch:
    """A step as the engine builds it: a labeled batch only where the method wants one."""
    g = torch.Generator().manual_seed(epoch)
    views = [torch.randn(8, 1, 8, 8, generator=g) for _ in range(method.global_views)]
    local = [torch.randn(8, 1, 8, 8, generator=g) for _ in range(method.local_views)]
    labeled = method.wants_labeled(epoch)
    return TrainBatch(
        views,
        local,
        torch.randn(8, 1, 8, 8, generator=g) if labeled else None,
        torch.arange(8) % NUM_CLASSES if labeled else None,
        epoch=epoch,
        step=epoch,
    )


def step_terms(method: Method, epoch: int = 0) -> dict[str, torch.Tensor]:
    terms = method(batch_for(method, epoch))
    method.zero_grad(set_to_none=True)
    terms["loss"].backward()
    return terms


def assert_every_parameter_trains(method: Method) -> None:
    unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters without gradient (DDP would need find_unused_parameters): {unused}"


@pytest.mark.parametrize("name", ADDS_LABELED_TERM)
@pytest.mark.parametrize("label_loss", ["suncet", "ce"])
def test_the_labeled_term_is_the_one_label_loss_names(name, label_loss):
    method = build(name, label_loss=label_loss, suncet_weight=0.7)
    terms = step_terms(method)
    other = {"suncet": "ce", "ce": "suncet"}[label_loss]
    assert label_loss in terms and other not in terms
    own = {k: v for k, v in terms.items() if k not in ("loss", label_loss)}
    if method.needs_labels:
        assert not own
        torch.testing.assert_close(terms["loss"], 0.7 * terms[label_loss])
    else:
        assert own  # the method logs its own terms beside the labeled one
    assert method.labeled_term.name == label_loss
    assert bool(list(method.labeled_term.parameters())) == (label_loss == "ce")  # the classifier is the term's own
    assert_every_parameter_trains(method)


@pytest.mark.parametrize("name", OWN_OBJECTIVE)
def test_weight_zero_loads_no_labeled_batch_and_adds_nothing(name):
    for label_loss in ("suncet", "ce"):
        method = build(name, label_loss=label_loss, suncet_weight=0.0)
        assert not method.wants_labeled(0) and method.labeled_term is None
        terms = step_terms(method)
        assert "suncet" not in terms and "ce" not in terms
        assert_every_parameter_trains(method)


@pytest.mark.parametrize("name", OWN_OBJECTIVE)
@pytest.mark.parametrize("label_loss", ["suncet", "ce"])
def test_the_labeled_term_stops_at_its_switch_off_epoch(name, label_loss):
    method = build(name, label_loss=label_loss, suncet_epochs=3)
    assert method.wants_labeled(2) and not method.wants_labeled(3)
    assert label_loss in step_terms(method, epoch=2)
    after = step_terms(method, epoch=3)
    assert "suncet" not in after and "ce" not in after
    # The classifier of ce is then idle: DDP is told to look for unused parameters.
    assert may_skip_parameters(method) == (label_loss == "ce" or type(method).may_skip_parameters)


@pytest.mark.parametrize("name", OWN_OBJECTIVE)
def test_the_total_is_the_objective_plus_the_weighted_labeled_term(name):
    method = build(name, suncet_weight=0.3)
    method.eval()  # BatchNorm by running statistics: the same images give the same features in any batch
    batch = batch_for(method)
    terms = method(batch)
    own = method(TrainBatch(batch.global_views, batch.local_views, epoch=batch.epoch, step=batch.step))
    suncet = method.losses.suncet(method.project(method.encode(batch.labeled)), batch.labels)
    torch.testing.assert_close(terms["suncet"], suncet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], own["loss"] + 0.3 * suncet, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_fused_objective_equals_its_terms_computed_apart(backend):
    fused = [
        name for name, cls in METHOD_CLASSES.items() if cls.objective_with_suncet is not Method.objective_with_suncet
    ]
    assert "simclr" in fused
    for name in fused:
        method = build(name, backend=backend)
        method.eval()
        batch = batch_for(method)
        together = method(batch)
        # The base class's own path: objective(views), then the SuNCEt term.
        method.objective_with_suncet = types.MethodType(Method.objective_with_suncet, method)
        apart = method(batch)
        assert set(together) == set(apart)
        for key in together:
            torch.testing.assert_close(together[key], apart[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in METHOD_CLASSES if n not in OWN_OBJECTIVE])
def test_methods_that_need_labels_refuse_to_lose_them(name):
    with pytest.raises(ConfigError, match="--suncet-weight 0"):
        build(name, suncet_weight=0.0)
    with pytest.raises(ConfigError, match="--suncet-epochs"):
        build(name, suncet_epochs=5)
    assert build(name, suncet_epochs=10).wants_labeled(9)  # epochs is 10: never switched off


@pytest.mark.parametrize("name", [n for n, cls in METHOD_CLASSES.items() if cls.objective_uses_labels])
def test_methods_that_use_the_labels_themselves_get_no_labeled_term_and_refuse_ce(name):
    method = build(name)
    terms = step_terms(method)
    assert "suncet" not in terms and "ce" not in terms and method.labeled_term is None
    assert_every_parameter_trains(method)
    with pytest.raises(ConfigError, match="uses the labels in its own objective; --label-loss does not apply"):
        build(name, label_loss="ce")


def test_a_plugin_without_an_objective_projection_or_total_is_refused_in_one_line():
    class NoObjective(Method):
        pass

    class NoProjection(Method):
        def objective(self, views):
            return {"loss": views.global_features.sum()}

    class NoTotal(Method):
        def project(self, features):
            return features

        def objective(self, views):
            return {"mine": views.global_features.sum()}  # would train SuNCEt alone if let through

    config = MethodConfig(TrainConfig(proj_hidden=32, proj_dim=16), NUM_CLASSES)
    backbone = small_resnet(in_channels=1, image_size=8, width=4)
    for cls, message in (
        (NoObjective, "method NoObjective loads unlabeled views but defines no objective"),
        (NoProjection, "method NoProjection defines no project\\(features\\) for the labeled term 'suncet'"),
        (NoTotal, "method NoTotal's objective returns no 'loss' \\(its total; got mine\\)"),
    ):
        method = cls(backbone, config)
        with pytest.raises(ConfigError, match=message):
            method(batch_for(method))
    ce = MethodConfig(TrainConfig(proj_hidden=32, proj_dim=16, label_loss="ce"), NUM_CLASSES)
    assert "ce" in NoProjection(backbone, ce)(batch_for(method))  # cross-entropy needs no projection


def test_a_plugin_of_the_earlier_contract_keeps_its_one_labeled_term():
    earlier = earlier_contract_method()
    train = TrainConfig(proj_hidden=32, proj_dim=16, backend="reference", suncet_weight=0.7)
    with pytest.warns(FutureWarning, match="earlier method contract"):
        method = earlier(small_resnet(in_channels=1, image_size=8, width=4), MethodConfig(train, NUM_CLASSES))
    method.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # it reads MethodConfig.gather, deprecated
        terms = method(batch_for(method))
    assert set(terms) == {"loss", "barlow", "suncet"}
    torch.testing.assert_close(terms["loss"], terms["barlow"] + 0.7 * terms["suncet"])  # added once, by itself
    ce = TrainConfig(proj_hidden=32, proj_dim=16, label_loss="ce")
    with pytest.raises(ConfigError, match="may ignore --label-loss ce; implement objective"):
        earlier(small_resnet(in_channels=1, image_size=8, width=4), MethodConfig(ce, NUM_CLASSES))


# ---------------------------------------------------------------------------------------------
# Extension points of the contract, exercised by plugins defined here, trained by the engine.


class SoftNearestNeighbour(LabeledTerm):
    """PAWS's soft nearest neighbour as the term added to a method: each labeled embedding is
    classified by the step's other labeled images (softmax over cosine similarities at a
    temperature the term learns), against its own label."""

    name = "snn"
    needs_projection = True

    def __init__(self, config: LabeledTermConfig):
        super().__init__(config)
        self.num_classes = config.num_classes
        self.log_temperature = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, method, features, labels):  # as docs/plugins.md shows it
        z = F.normalize(method.project(features).float(), dim=1)
        logits = (z @ z.T / self.log_temperature.exp()).fill_diagonal_(float("-inf"))
        votes = torch.softmax(logits, dim=1) @ F.one_hot(labels, self.num_classes).float()
        return -torch.log(votes.gather(1, labels[:, None])).mean()


def soft_nearest_neighbour_reference(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    z = z.double() / z.double().norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(z)):
        weights = {j: math.exp(float(z[i] @ z[j]) / temperature) for j in range(len(z)) if j != i}
        total -= math.log(sum(w for j, w in weights.items() if labels[j] == labels[i]) / sum(weights.values()))
    return total / len(z)


class EMATeacher(Method):
    """SimCLR's objective with a teacher: an exponential moving average of the backbone, outside
    the optimizer (requires_grad=False), updated after each step; evaluation and export use it."""

    def __init__(self, backbone, config: MethodConfig):
        super().__init__(backbone, config)
        self.head = projection_head(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim)
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)
        self.updates: list[int] = []

    def project(self, features):
        return self.head(features)

    def objective(self, views):
        out0, out1 = self.head(views.global_features).chunk(2)
        ntxent = self.losses.ntxent(out0, out1)
        return {"loss": ntxent, "ntxent": ntxent}

    @torch.no_grad()
    def after_optimizer_step(self, step):
        self.updates.append(step)
        for mine, theirs in zip(self.teacher.parameters(), self.backbone.parameters()):
            mine.mul_(0.9).add_(theirs, alpha=0.1)

    def evaluated_backbone(self):
        return self.teacher


@pytest.fixture
def registered():
    """Register plugins for this test only (the registries are the process's)."""
    added = []

    def register(registry, name, obj):
        registry.add(name, obj, source="tests")
        added.append((registry, name))

    yield register
    for registry, name in added:
        registry._plugins.pop(name)


def small_run(tmp_path, **settings):
    from suncet.engine.assemble import assemble
    from suncet.presets import build_config

    config = build_config(
        overrides={
            "epochs": 1,
            "batch_size": 64,
            "proj_hidden": 32,
            "backbone_options": {"width": 8},
            "monitor_every": 0,
            "final_eval": "none",
            "backend": "reference",
            **settings,
        }
    )
    return assemble(config, tmp_path / "run")


def test_a_labeled_term_defined_outside_suncet_trains_through_the_contract(tmp_path, registered):
    from suncet.engine.loop import train
    from suncet.engine.state import load_checkpoint

    registered(LABEL_LOSSES, "soft-nn", SoftNearestNeighbour)
    run = small_run(tmp_path, label_loss="soft-nn", suncet_weight=0.5)
    term = run.method.labeled_term
    assert isinstance(term, SoftNearestNeighbour) and term.weight == 0.5
    assert any(p is term.log_temperature for group in run.optimizer.param_groups for p in group["params"])
    # Its value is the float64 reference on the method's projections.
    features, labels = torch.randn(12, run.method.backbone.feature_dim), torch.arange(12) % 4
    with torch.no_grad():
        expected = soft_nearest_neighbour_reference(run.method.project(features), labels, math.exp(-1.0))
        assert abs(term(run.method, features, labels).item() - expected) < 1e-5

    row = train(run)
    assert math.isfinite(row["snn"]) and math.isfinite(row["loss"]) and "ntxent" in row and "suncet" not in row
    assert term.log_temperature.item() != -1.0  # trained by the run's optimizer
    saved = load_checkpoint(run.run_dir / "checkpoints" / "last.pt")["model"]
    assert saved["labeled_term.log_temperature"].item() == term.log_temperature.item()


def test_a_teacher_is_what_evaluation_and_export_use_and_stays_out_of_the_optimizer(tmp_path, registered, monkeypatch):
    import suncet
    from suncet.engine import evaluate
    from suncet.engine.loop import train

    registered(METHODS, "ema-teacher", EMATeacher)
    run = small_run(tmp_path, method="ema-teacher")
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in run.method.teacher.parameters()}
    assert {id(p) for p in run.method.backbone.parameters()} <= optimised
    train(run)
    steps = run.unlabeled_sampler.steps_per_epoch
    assert run.method.updates == list(range(steps))  # after_optimizer_step: the 0-based global step

    used = []
    extract = evaluate.extract_features
    monkeypatch.setattr(
        evaluate, "extract_features", lambda network, *args, **kw: used.append(network) or extract(network, *args, **kw)
    )
    assert 0 <= evaluate.evaluate_run(run, "knn")["top1"] <= 1
    assert used and all(network is run.method.teacher for network in used)

    images = torch.rand(4, 1, 8, 8)
    exported = suncet.load_backbone(run.run_dir)
    run.method.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(images), run.method.teacher(images), rtol=0, atol=0)
        assert not torch.equal(exported(images), run.method.backbone(images))


# Methods with state outside the optimizer: moving-average targets (after_optimizer_step) and
# queues (rank_state).
KEEPS_OWN_STATE = [
    name
    for name in METHODS.names()
    if METHODS.get(name).obj.after_optimizer_step is not Method.after_optimizer_step
    or METHODS.get(name).obj.rank_state is not Method.rank_state
]


@pytest.mark.parametrize("name", KEEPS_OWN_STATE)
def test_two_epochs_equal_one_epoch_and_a_resumed_one_exactly(tmp_path, name):
    from suncet.engine.assemble import assemble
    from suncet.engine.loop import train
    from suncet.engine.state import load_checkpoint, numbered_checkpoints

    settings = {"method": name, "method_options": OPTIONS.get(name, {}), "epochs": 2}
    straight = small_run(tmp_path / "straight", **settings)
    train(straight)
    first_epoch = next(
        state
        for state in map(load_checkpoint, numbered_checkpoints(straight.run_dir / "checkpoints"))
        if state["progress"]["epoch"] == 1
    )
    config = small_run(tmp_path / "unused", **settings).config
    resumed = assemble(
        config,
        tmp_path / "resumed",
        labeled=first_epoch["labeled"],
        checkpoint=first_epoch,
        checkpoint_path=tmp_path / "resumed" / "checkpoints",
        resuming=True,
    )
    train(resumed, first_epoch)
    expected, got = straight.method.state_dict(), resumed.method.state_dict()
    assert set(got) == set(expected)
    differing = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not differing, f"not the same after resume: {differing}"
    expected, got = straight.method.rank_state(), resumed.method.rank_state()
    assert set(got) == set(expected) and all(torch.equal(got[key], expected[key]) for key in expected)
