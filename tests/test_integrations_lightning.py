"""MASLightningCallback in a real Lightning Trainer: a small MLP, two linearly separable tasks, CPU."""

from __future__ import annotations

import copy
import logging
import types
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import mas_local as ml  # noqa: E402
from mas_local.integrations import MASLightningCallback  # noqa: E402
from tests.fresh_python import run_python  # noqa: E402

LAM = 1.0
pytestmark = [  # Lightning's own notices about this tiny set-up (deprecations inside it, a non-resumable loader)
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*ckpt_path"),
    pytest.mark.filterwarnings("ignore:.*dataloader is not resumable"),
]
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


class Classifier(pl.LightningModule):
    def __init__(self, seed: int = 0, lr: float = 0.2):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, index):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def task(seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x @ torch.randn(8, 4, generator=g)).argmax(1))


TASK_A, TASK_B = task(0), task(1)


def loader(dataset, batch_size: int = 16):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def trainer(steps: int, callbacks, **kw) -> pl.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kw,
    )


def fit(*args, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LightningModule).*")
        args[0].fit(*args[1:], **kw)


def task_loss(module, dataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return nn.functional.cross_entropy(module(x), y).item()


def spy(mas):
    calls, original = [], mas.add_penalty_grad_

    def recorded():
        value = original()
        calls.append(float(value))
        return value

    mas.add_penalty_grad_ = recorded
    return calls


def copy_with_mas(module, mas):
    clone = copy.deepcopy(module)
    mas_clone = ml.MAS(clone.net, lam=mas.lam, progress=False)
    mas_clone.load_state_dict(mas.state_dict())
    return clone, mas_clone


@pytest.fixture(scope="module")
def after_task_a():
    module = Classifier()
    mas = ml.MAS(module.net, lam=LAM, progress=False)
    calls = spy(mas)
    fit(trainer(40, [MASLightningCallback(mas)]), module, loader(TASK_A))
    return types.SimpleNamespace(module=module, mas=mas, calls=calls)


def test_task_a_consolidates_on_the_training_dataloader(after_task_a):
    mas = after_task_a.mas
    assert mas.num_tasks == 1 and after_task_a.calls == [0.0] * 40
    expected = ml.compute_importance(after_task_a.module.net, loader(TASK_A), progress=False)  # (x, y): labels ignored
    for name, omega in expected.items():
        torch.testing.assert_close(mas.importance[name], omega, rtol=1e-5, atol=1e-7)
    assert all(v.sum() > 0 for v in mas.importance.values())


def test_mas_reduces_drift_and_forgetting_of_task_a(after_task_a):
    base, mas = after_task_a.module, after_task_a.mas
    omega, star = mas.importance, mas.anchors
    loss_a = task_loss(base, TASK_A)
    results = {}
    for use_mas in (False, True):
        module, mas_b = copy_with_mas(base, mas)
        run = trainer(40, [MASLightningCallback(mas_b, consolidate_on=None)] if use_mas else [])
        fit(run, module, loader(TASK_B))
        drift = sum((omega[n] * (p.detach() - star[n]) ** 2).sum() for n, p in module.net.named_parameters()).item()
        results[use_mas] = (drift, task_loss(module, TASK_A) - loss_a, run.callback_metrics.get("mas_penalty"))
    (drift_plain, forget_plain, logged_plain), (drift_mas, forget_mas, logged_mas) = results[False], results[True]
    assert drift_plain > 1.0 and forget_plain > 0.5
    assert drift_mas < 0.1 * drift_plain
    assert forget_mas < 0.2 * forget_plain
    assert logged_plain is None and float(logged_mas) > 0.01  # logged with pl_module.log at every step


def test_accumulation_adds_the_penalty_once_per_step_before_clipping(after_task_a):
    module, mas = copy_with_mas(after_task_a.module, after_task_a.mas)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    calls = spy(mas)
    seen = {"before": [], "after": [], "expected": []}

    class Probe(pl.Callback):
        def __init__(self, when):
            self.when = when

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen[self.when].append({n: p.grad.clone() for n, p in module.net.named_parameters()})
            if self.when == "before":
                seen["expected"].append(
                    {
                        n: 2 * LAM * mas.importance[n] * (p.detach() - mas.anchors[n])
                        for n, p in module.net.named_parameters()
                    }
                )

    callbacks = [Probe("before"), MASLightningCallback(mas, consolidate_on=None), Probe("after")]
    fit(trainer(2, callbacks, accumulate_grad_batches=3), module, loader(TASK_B, 4))
    assert len(calls) == 2  # 2 optimizer steps of 3 micro-batches: 2 calls, not 6
    for before, after, expected in zip(seen["before"], seen["after"], seen["expected"]):
        assert sum(e.abs().sum() for e in expected.values()) > 0.1
        for n in after:
            torch.testing.assert_close(after[n] - before[n], expected[n], rtol=1e-4, atol=1e-6)

    # Lightning clips after on_before_optimizer_step: the step is task + penalty clipped to the limit
    module, mas = copy_with_mas(module, mas)
    start = [p.detach().clone() for p in module.parameters()]
    module.lr = 1.0
    fit(trainer(1, [MASLightningCallback(mas, consolidate_on=None)], gradient_clip_val=1e-3), module, loader(TASK_B))
    step = torch.cat([(p.detach() - s).flatten() for p, s in zip(module.parameters(), start)])
    penalty_grad = torch.cat(
        [
            (2 * LAM * mas.importance[n] * (s - mas.anchors[n])).flatten()
            for (n, _), s in zip(module.net.named_parameters(), start)
        ]
    )
    assert penalty_grad.norm() > 0.1  # the penalty gradient alone is far above the limit
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_checkpoint_resume_restores_omega_and_the_next_penalty(after_task_a, tmp_path):
    module, mas = copy_with_mas(after_task_a.module, after_task_a.mas)
    calls = spy(mas)
    every2 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    callback = MASLightningCallback(mas, consolidate_on=None)
    fit(trainer(4, [callback, every2], enable_checkpointing=True), module, loader(TASK_B))
    assert len(calls) == 4 and calls[2] > 0
    (checkpoint,) = tmp_path.glob("*step=2.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][callback.state_key]["mas"]
    assert saved["num_tasks"] == 1

    fresh = Classifier(seed=1)  # other weights and no Ω: both must come from the checkpoint
    mas_fresh = ml.MAS(fresh.net, lam=LAM, progress=False)
    calls_fresh = spy(mas_fresh)
    fit(trainer(4, [MASLightningCallback(mas_fresh, consolidate_on=None)]), fresh, loader(TASK_B), ckpt_path=checkpoint)
    assert mas_fresh.num_tasks == 1
    for name, omega in after_task_a.mas.importance.items():
        assert torch.equal(mas_fresh.importance[name], omega)
        assert torch.equal(mas_fresh.anchors[name], after_task_a.mas.anchors[name])
    assert len(calls_fresh) == 2
    assert calls_fresh[0] == pytest.approx(calls[2], rel=1e-6)


def test_settings_dict_creates_mas_on_the_module_and_bad_uses_are_refused():
    module = Classifier()
    callback = MASLightningCallback({"lam": LAM, "mode": "local", "progress": False}, consolidate_on=loader(TASK_A))
    fit(trainer(3, [callback]), module, loader(TASK_A))
    assert callback.mas.model is module and callback.mas.mode == "local" and callback.mas.num_tasks == 1
    assert set(callback.state_dict()["mas"]["importance"]) == {n for n, _ in module.named_parameters()}

    foreign = MASLightningCallback(ml.MAS(nn.Linear(8, 4), progress=False))
    with pytest.raises(ValueError, match="not part of"):
        fit(trainer(1, [foreign]), Classifier(), loader(TASK_A))
    with pytest.raises(ValueError, match="consolidate_on"):
        MASLightningCallback({"lam": 1.0}, consolidate_on="test")
    with pytest.raises(TypeError, match="'model'"):
        MASLightningCallback({"model": module})
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="max_batches must be a positive int"):
            MASLightningCallback({"lam": 1.0}, max_batches=bad)


def test_a_missing_lightning_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['lightning.pytorch'] = None\n"
        "import mas_local.integrations\n"
        "try:\n"
        "    mas_local.integrations.MASLightningCallback\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    printed = run_python(code)
    assert "pip install 'mas-local[lightning]'" in printed


def test_a_checkpoint_written_before_consolidation_resumes_into_the_consolidation(tmp_path):
    """Task 2's last checkpoint is written before its consolidation (ModelCheckpoint at the epoch's end). A fit
    resumed from it finds the loop done, so Lightning runs neither on_train_start nor on_train_end: the task
    must still be consolidated once, to the Ω and θ* the uninterrupted run had."""
    ckpt = pytest.importorskip("lightning.pytorch.callbacks").ModelCheckpoint
    module = Classifier(seed=3)
    callback = MASLightningCallback({"lam": LAM, "progress": False})
    fit(trainer(8, [callback]), module, loader(TASK_A))
    saving = ckpt(dirpath=tmp_path, save_last=True)
    fit(trainer(8, [callback, saving], enable_checkpointing=True, max_epochs=1), module, loader(TASK_B))
    assert callback.mas.num_tasks == 2
    omega = {n: t.clone() for n, t in callback.mas.importance.items()}
    star = {n: t.clone() for n, t in callback.mas.anchors.items()}
    last = tmp_path / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, map_location="cpu", weights_only=True)
    (saved,) = [v for k, v in state["callbacks"].items() if "MASLightningCallback" in k]
    assert saved["mas"]["num_tasks"] == 1  # written before task 2's consolidation
    # the same process, the same callback: resume task 2 from its last checkpoint
    again = ckpt(dirpath=tmp_path / "again", save_last=True)
    fit(trainer(8, [callback, again], enable_checkpointing=True, max_epochs=1), module, loader(TASK_B), ckpt_path=last)
    assert callback.mas.num_tasks == 2
    for n in omega:
        torch.testing.assert_close(callback.mas.importance[n], omega[n])
        torch.testing.assert_close(callback.mas.anchors[n], star[n])
    # a fresh process: a new module and callback resumed from the same file also end with both tasks
    assert saved["task_open"]  # what tells the resumed fit that the task still needs its consolidation
    fresh_module = Classifier(seed=9)
    fresh = MASLightningCallback({"lam": LAM, "progress": False})
    fit(trainer(8, [fresh], max_epochs=1), fresh_module, loader(TASK_B), ckpt_path=last)
    assert fresh.mas.num_tasks == 2
    for n in omega:
        torch.testing.assert_close(fresh.mas.importance[n], omega[n])


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return {"scores": self.lin(x)}


class DictClassifier(Classifier):
    def __init__(self):
        super().__init__()
        self.net = DictNet()

    def forward(self, x):
        return self.net(x)["scores"]


def test_an_output_consolidation_cannot_read_fails_at_the_first_step():
    module = DictClassifier()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = MASLightningCallback(ml.MAS(module.net, lam=LAM, progress=False))
    with pytest.raises(ValueError, match="output_fn"):
        fit(trainer(4, [callback]), module, loader(TASK_A))
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())
    callback = MASLightningCallback(ml.MAS(module.net, lam=LAM, progress=False, output_fn=lambda o: o["scores"]))
    fit(trainer(4, [callback]), module, loader(TASK_A))
    assert callback.mas.num_tasks == 1
