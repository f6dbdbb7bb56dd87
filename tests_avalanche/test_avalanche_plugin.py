"""MASAvalanchePlugin inside real Avalanche strategies (avalanche-lib 0.6, torch 2.14.1).

- the plugin's Ω equals the brute-force loop (one sample at a time, torch.autograd.grad), single- and multi-task;
- ``like_mas_plugin`` equals Avalanche's own ``MASPlugin._get_importance`` (≤ 1e-6 relative in float32, batches
  of 4, 4, 3, BatchNorm in train mode, Dropout with fixed masks, 2-D / sequence / image outputs), and a whole
  two-experience run with it equals the same run with ``MASPlugin``;
- a two-experience run with the plugin equals a hand-written loop with ``mas_local.MAS``;
- Avalanche's checkpoints carry the MAS state; the plugin's own state dict loads with ``weights_only=True``.

Relative difference of a tensor: ``max |ours − theirs| / max |theirs|`` (Ω's own scale; an elementwise ratio
is meaningless on entries that are 0 in both).
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.models import IncrementalClassifier, MultiTaskModule
from avalanche.training import Naive
from avalanche.training.plugins import MASPlugin
from torch import nn

import mas_local as ml
from mas_local.integrations import MASAvalanchePlugin

warnings.filterwarnings("ignore", message="No loggers specified")
CPU = torch.device("cpu")
F32_REL = 1e-6  # the bound for the preset against MASPlugin (float32)


# ---------------------------------------------------------------------------- models
class FixedDropout(nn.Module):
    """Dropout (p = 0.5) whose mask is a fixed function of the sample's input, in train mode only: the same in
    every forward, so two implementations that run the model a different number of times see the same masks."""

    def __init__(self, in_features: int, features: int) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(in_features, features, generator=torch.Generator().manual_seed(7)))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        mask = ((x.flatten(1) @ self.proj) > 0).to(h.dtype) * 2.0
        return h * mask.view(h.shape[0], *([1] * (h.dim() - 2)), -1)


class MLP(nn.Module):
    """Linear → BatchNorm → ReLU → fixed dropout → Linear: output [B, C]. No bias before a BatchNorm in train
    mode (its gradient is 0, and Ω of rounding noise compares nothing)."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = (
            nn.Linear(features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, classes),
        )
        self.drop = FixedDropout(features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x))), x))


class CNN(nn.Module):
    """Conv → BatchNorm2d → ReLU → Linear on 2×6×6 images: output [B, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Sequence(nn.Module):
    """A per-position MLP on [B, T, F]: output [B, T, C] (Avalanche's Ω is ours divided by C)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 5)
        self.drop = FixedDropout(7 * 6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x)), x))


class FCN(nn.Module):
    """Convolutions only: output [B, C, H, W] (Avalanche's Ω is ours divided by H·W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


class TwoHeads(MultiTaskModule):
    """A shared body and one head per task; Avalanche calls it as ``model(x, task_labels)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(12, 3), nn.Linear(12, 3)])
        self.max_class_label = 3

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads[task_label](self.body(x))


INPUTS = {"mlp": (6,), "cnn": (2, 6, 6), "sequence": (7, 6), "fcn": (2, 6, 6), "multitask": (6,)}
MODELS = {"mlp": MLP, "cnn": CNN, "sequence": Sequence, "fcn": FCN, "multitask": TwoHeads}


def dataset(kind: str, n: int = 11, seed: int = 0, tasks: list[int] | int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *INPUTS[kind], generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=tasks)


def fake_strategy(model: nn.Module, data, mb: int = 4) -> SimpleNamespace:
    """What MASPlugin._get_importance and the plugin's after_training_exp read of a strategy."""
    return SimpleNamespace(
        model=model,
        experience=SimpleNamespace(dataset=data),
        train_mb_size=mb,
        device=CPU,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return float((ours - theirs).abs().max() / theirs.abs().max())


# ---------------------------------------------------------------------------- brute force
def brute_force(model: nn.Module, data, task_aware: bool = False) -> dict[str, torch.Tensor]:
    """Ω = 1/N Σ_k |∂‖f(x_k)‖²/∂θ|, one sample at a time in eval mode, in float64."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    for k in range(len(data)):
        x, _, t = data[k]
        y = model(x[None], torch.tensor([t])) if task_aware else model(x[None])
        grads = torch.autograd.grad(y.double().pow(2).sum(), [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                acc[n] += g.double().abs()
    model.train()
    return {n: v / len(data) for n, v in acc.items()}


@pytest.mark.parametrize("kind", ["mlp", "multitask"])
def test_plugin_omega_equals_brute_force(kind):
    """The default plugin (global ``sample``, eval mode) after one experience: Ω of the experience's data."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    tasks = [k % 2 for k in range(11)] if kind == "multitask" else 0  # both heads in every batch
    data = dataset(kind, tasks=tasks)
    plugin = MASAvalanchePlugin(lam=1.0, progress=False)
    plugin.after_training_exp(fake_strategy(model, data))
    want = brute_force(model, data, task_aware=kind == "multitask")
    got = plugin.mas.importance
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6 * float(want[name].max()))


# ---------------------------------------------------------------------------- the preset against MASPlugin
@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence", "fcn", "multitask"])
def test_preset_equals_avalanche_mas_plugin(kind):
    """``like_mas_plugin`` against the real ``MASPlugin._get_importance``: batches 4, 4, 3 in train mode."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    tasks = [k % 2 for k in range(11)] if kind == "multitask" else 0
    data = dataset(kind, tasks=tasks)
    theirs_model, ours_model = copy.deepcopy(model), copy.deepcopy(model)
    theirs = MASPlugin()._get_importance(fake_strategy(theirs_model, data))
    plugin = MASAvalanchePlugin.like_mas_plugin(progress=False)
    plugin.after_training_exp(fake_strategy(ours_model, data))
    ours = plugin.mas.importance
    assert set(ours) == set(theirs)
    worst = max(rel(ours[n], theirs[n].data) for n in theirs)
    print(f"\n{kind}: max relative difference to MASPlugin {worst:.2e}")
    assert all(theirs[n].data.abs().max() > 1e-3 for n in theirs)
    assert worst <= F32_REL, worst
    # the same side effect as MASPlugin's train-mode pass: BatchNorm's running statistics moved the same way
    for (n, a), (_, b) in zip(ours_model.named_buffers(), theirs_model.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    if kind in ("mlp", "cnn", "fcn"):
        bn = ours_model.bn
        assert int(bn.num_batches_tracked) == 3 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def two_experience_benchmark(kind: str = "mlp", n: int = 11):
    train = [dataset(kind, n=n, seed=1), dataset(kind, n=n, seed=2)]
    return benchmark_from_datasets(train=train, test=train)


def naive(model: nn.Module, plugins: list, epochs: int = 2) -> Naive:
    """The strategy every test trains with: SGD lr 0.05, mini-batches of 4, no evaluator."""
    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_mb_size=4,
        train_epochs=epochs,
        device=CPU,
        evaluator=None,
        plugins=plugins,
    )


def train(model: nn.Module, plugins: list, kind: str = "mlp", epochs: int = 2, bm=None) -> Naive:
    bm = bm or two_experience_benchmark(kind)
    strategy = naive(model, plugins, epochs)
    for experience in bm.train_stream:
        strategy.train(experience, shuffle=False, eval_streams=[])
    return strategy


def test_preset_training_run_equals_mas_plugin_run():
    """Two experiences with Naive: the preset and MASPlugin give the same weights, Ω (EMA) and θ*."""
    torch.manual_seed(0)
    model = MLP()
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    theirs = MASPlugin(lambda_reg=5.0, alpha=0.3)
    ours = MASAvalanchePlugin.like_mas_plugin(lambda_reg=5.0, alpha=0.3, progress=False)
    train(theirs_model, [theirs])
    train(ours_model, [ours])
    assert ours.mas.num_tasks == 2 and ours.last_penalty is not None and ours.last_penalty > 0
    for (n, a), (_, b) in zip(ours_model.state_dict().items(), theirs_model.state_dict().items()):
        assert rel(a.float(), b.float()) <= F32_REL if b.abs().max() > 0 else torch.equal(a, b), n
    for n in theirs.importance:
        assert rel(ours.mas.importance[n], theirs.importance[n].data) <= F32_REL, n
        assert rel(ours.mas.anchors[n], theirs.params[n].data) <= F32_REL, n
    # and the penalty mattered: without it, the weights end elsewhere
    plain = copy.deepcopy(model)
    train(plain, [])
    assert rel(plain.fc1.weight, theirs_model.fc1.weight) > 1e-3


# ---------------------------------------------------------------------------- a hand-written loop
def test_two_experiences_equal_a_hand_written_loop():
    torch.manual_seed(0)
    model = MLP()
    with_plugin, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    plugin = MASAvalanchePlugin(lam=20.0, progress=False)
    bm = two_experience_benchmark()
    train(with_plugin, [plugin], bm=bm)

    mas = ml.MAS(by_hand, lam=20.0, progress=False)
    opt = torch.optim.SGD(by_hand.parameters(), lr=0.05)
    for experience in bm.train_stream:
        loader = torch.utils.data.DataLoader(experience.dataset, batch_size=4, shuffle=False)
        by_hand.train()
        for _ in range(2):
            for x, y, _t in loader:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(by_hand(x), y)
                if mas.num_tasks:
                    loss = loss + mas.penalty()
                loss.backward()
                opt.step()
        mas.consolidate([(x,) for x, _, _ in loader])

    assert plugin.mas.num_tasks == mas.num_tasks == 2
    for (n, a), (_, b) in zip(with_plugin.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(a, b), n
    for n in mas.importance:
        assert mas.importance[n].abs().max() > 0
        assert torch.equal(plugin.mas.importance[n], mas.importance[n]), n


# ---------------------------------------------------------------------------- checkpoints
def test_avalanche_checkpoint_resumes_with_the_mas_state(tmp_path):
    """save_checkpoint after experience 1, a fresh process-like restart, experience 2: as the uninterrupted run."""
    torch.manual_seed(0)
    model = MLP()
    bm = two_experience_benchmark()
    whole = copy.deepcopy(model)
    whole_plugin = MASAvalanchePlugin(lam=20.0, progress=False)
    train(whole, [whole_plugin], bm=bm)

    first = copy.deepcopy(model)
    plugin = MASAvalanchePlugin(lam=20.0, progress=False)
    strategy = naive(first, [plugin])
    strategy.train(bm.train_stream[0], shuffle=False, eval_streams=[])
    path = tmp_path / "strategy.pkl"
    # exclude: dill 0.4.1 cannot pickle torch 2.14's optimizers (a typing_extensions sentinel in them), with or
    # without this plugin; a momentum-free SGD has no state, and Avalanche rebinds it to the model at each experience
    save_checkpoint(strategy, str(path), exclude=["optimizer"])

    fresh = MLP()  # other weights: everything must come from the checkpoint
    fresh_plugin = MASAvalanchePlugin(lam=20.0, progress=False)
    restarted = naive(fresh, [fresh_plugin])
    restarted, start = maybe_load_checkpoint(restarted, str(path))
    assert start == 1
    restored = next(p for p in restarted.plugins if isinstance(p, MASAvalanchePlugin))
    assert restored.mas.num_tasks == 1
    # the restored MAS regularises the restored model's own parameters
    assert all(restored.mas.params[n] is p for n, p in restarted.model.named_parameters())
    restarted.train(bm.train_stream[1], shuffle=False, eval_streams=[])
    for (n, a), (_, b) in zip(restarted.model.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), n
    for n in whole_plugin.mas.importance:
        assert torch.equal(restored.mas.importance[n], whole_plugin.mas.importance[n]), n


def test_plugin_state_dict_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    plugin = MASAvalanchePlugin(lam=3.0, progress=False)
    plugin.after_training_exp(fake_strategy(model, dataset("mlp")))
    torch.save(plugin.state_dict(), tmp_path / "mas.pt")
    state = torch.load(tmp_path / "mas.pt", weights_only=True)

    other = MASAvalanchePlugin(lam=3.0, progress=False)
    other.load_state_dict(state)  # before the MAS exists: kept until training starts
    other.before_training(SimpleNamespace(model=model))
    assert other.mas.num_tasks == 1
    for n, omega in plugin.mas.importance.items():
        assert torch.equal(other.mas.importance[n], omega)

    wrong = MASAvalanchePlugin(progress=False)
    wrong.before_training(SimpleNamespace(model=CNN()))
    before = {n: v.clone() for n, v in wrong.mas.importance.items()}
    with pytest.raises(ValueError):
        wrong.load_state_dict(state)
    assert wrong.mas.num_tasks == 0 and wrong.mas.importance.keys() == before.keys()


# ---------------------------------------------------------------------------- refusals
def test_bad_settings_are_refused_at_creation():
    with pytest.raises(TypeError, match="unknown MAS settings"):
        MASAvalanchePlugin(lambda_reg=1.0)
    with pytest.raises(TypeError, match="cannot be given with a MAS object"):
        MASAvalanchePlugin(ml.MAS(MLP()), lam=2.0)
    with pytest.raises(ValueError, match="batch_size"):
        MASAvalanchePlugin(batch_size=0)
    with pytest.raises(ValueError, match="unknown accumulate"):
        MASAvalanchePlugin(accumulate="mean")
    with pytest.raises(ValueError, match="lam"):
        MASAvalanchePlugin({"lam": -1.0})


def test_a_mas_object_without_task_labels_is_refused_for_a_multi_task_model():
    model = TwoHeads()
    plugin = MASAvalanchePlugin(ml.MAS(model))
    with pytest.raises(ValueError, match="without task labels"):
        plugin.before_training(SimpleNamespace(model=model))


def class_incremental(n: int = 24):
    """Two experiences of two classes each, as class_incremental_benchmark makes them (classes known per experience)."""
    from avalanche.benchmarks.scenarios import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 6, generator=g), torch.arange(n) % 4
    data = torch.utils.data.TensorDataset(x, y)
    data.targets = y.tolist()
    data = as_classification_dataset(data)
    return class_incremental_benchmark({"train": data, "test": data}, class_order=[0, 1, 2, 3], num_experiences=2)


def test_a_growing_head_is_followed_as_mas_plugin_follows_it():
    """An IncrementalClassifier grows its output layer at each experience: Ω and θ* stay on the old units, the new
    ones start at Ω = 0, and the run equals MASPlugin's, which pads its tensors the same way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), IncrementalClassifier(8, initial_out_features=1))
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    ours = MASAvalanchePlugin.like_mas_plugin(lambda_reg=30.0, progress=False)
    theirs = MASPlugin(lambda_reg=30.0)
    bm = class_incremental()
    torch.manual_seed(1)  # the classifier's new units are drawn from the global generator: the same draws in both
    train(ours_model, [ours], bm=bm)
    torch.manual_seed(1)
    train(theirs_model, [theirs], bm=bm)
    head = "2.classifier.weight"
    assert ours_model[2].classifier.weight.shape == (4, 8) and ours.mas.importance[head].shape == (4, 8)
    for (n, a), (_, b) in zip(ours_model.state_dict().items(), theirs_model.state_dict().items()):
        assert rel(a.float(), b.float()) <= F32_REL if b.abs().max() > 0 else torch.equal(a, b), n
    for n in theirs.importance:
        assert rel(ours.mas.importance[n], theirs.importance[n].data) <= F32_REL, n


def test_a_shrinking_parameter_is_refused_and_the_model_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    plugin = MASAvalanchePlugin(lam=1.0, progress=False)
    strategy = fake_strategy(model, dataset("mlp"))
    plugin.after_training_exp(strategy)
    head = model[2].weight
    model[2] = nn.Linear(8, 2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"'2.weight' changed shape from \(3, 8\) to \(2, 8\)"):
        plugin.before_training_exp(strategy)
    assert plugin.mas.params["2.weight"] is head
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


class NewHeads(MultiTaskModule):
    """A shared body and a head per task label, added when the task first shows up (as Avalanche's
    MultiHeadClassifier does; that one needs experiences that know their classes, which these do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.heads = nn.ModuleDict()
        self.max_class_label = 3

    def adaptation(self, experience) -> None:
        for t in experience.task_labels:
            if str(t) not in self.heads:
                self.heads[str(t)] = nn.Linear(12, 3)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads[str(task_label)](self.body(x))


def test_new_heads_are_followed_as_mas_plugin_follows_them():
    """Task-incremental: experience 2 brings a new head. It is regularised from then on (Ω = 0 until the next
    consolidation, which starts it at Ω_new, not (1 − α)·Ω_new), and the run equals MASPlugin's."""
    torch.manual_seed(0)
    model = NewHeads()
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    ours = MASAvalanchePlugin.like_mas_plugin(lambda_reg=5.0, alpha=0.3, progress=False)
    theirs = MASPlugin(lambda_reg=5.0, alpha=0.3)
    train_sets = [dataset("mlp", n=11, seed=1, tasks=0), dataset("mlp", n=11, seed=2, tasks=1)]
    bm = with_task_labels(benchmark_from_datasets(train=train_sets, test=train_sets))  # task-aware strategy forward
    torch.manual_seed(1)  # the new head is drawn from the global generator: the same draws in both
    train(ours_model, [ours], bm=bm)
    torch.manual_seed(1)
    train(theirs_model, [theirs], bm=bm)
    assert set(ours.mas.importance) == set(theirs.importance) and "heads.1.weight" in theirs.importance
    for (n, a), (_, b) in zip(ours_model.state_dict().items(), theirs_model.state_dict().items()):
        assert rel(a.float(), b.float()) <= F32_REL if b.abs().max() > 0 else torch.equal(a, b), n
    for n in theirs.importance:
        assert theirs.importance[n].data.abs().max() > 0, n
        assert rel(ours.mas.importance[n], theirs.importance[n].data) <= F32_REL, n
