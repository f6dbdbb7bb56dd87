"""MASTrainerCallback in a real transformers.Trainer: tiny GPT-2 (random init), two token tasks, CPU.

Task A continues sequences that count up by 1 over tokens 0..29; task B counts up by 7 over 30..60.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import mas_local as ml  # noqa: E402
from mas_local.integrations import MASTrainerCallback  # noqa: E402
from mas_local.integrations.hf_trainer import unscale_pending  # noqa: E402

LAM = 100.0


class CountingTask(Dataset):
    """Sequences ``lo + (s + step·t) mod (hi − lo)``; dict samples as a tokenizer gives them, with labels."""

    def __init__(self, step: int, lo: int, hi: int, n: int = 32, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(lo, hi, (n,), generator=g)
        self.ids = lo + (start[:, None] - lo + step * torch.arange(length)) % (hi - lo)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


TASK_A, TASK_B = CountingTask(1, 0, 30), CountingTask(7, 30, 61, seed=1)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def training_args(out, steps: int, **kw) -> TrainingArguments:
    kw = {
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "save_strategy": "no",
        "logging_steps": 1,
        **kw,
    }
    return TrainingArguments(str(out), max_steps=steps, report_to=[], disable_tqdm=True, use_cpu=True, seed=0, **kw)


def task_loss(model, task) -> float:
    batch = {k: torch.stack([task[i][k] for i in range(len(task))]) for k in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def spy(mas):
    """Record every add_penalty_grad_ call's value on this MAS object."""
    calls, original = [], mas.add_penalty_grad_

    def recorded():
        value = original()
        calls.append(float(value))
        return value

    mas.add_penalty_grad_ = recorded
    return calls


def drift(model, omega, star) -> float:
    return sum((omega[n] * (p.detach() - star[n]) ** 2).sum() for n, p in model.named_parameters()).item()


def copy_with_mas(model, mas, **kw):
    """A deep copy of a trained model and a MAS on it carrying ``mas``'s Ω and θ*."""
    clone = copy.deepcopy(model)
    mas_clone = ml.MAS(clone, lam=mas.lam, progress=False, **kw)
    mas_clone.load_state_dict(mas.state_dict())
    return clone, mas_clone


@pytest.fixture(scope="module")
def after_task_a(tmp_path_factory):
    """Task A trained with the callback, consolidated by it on the Trainer's training data."""
    out = tmp_path_factory.mktemp("task_a")
    model = tiny_gpt2()
    seen_keys = set()

    def forward_fn(m, batch):
        seen_keys.update(batch)
        return m(**batch)

    mas = ml.MAS(model, lam=LAM, progress=False, forward_fn=forward_fn)
    calls = spy(mas)
    trainer = Trainer(
        model=model, args=training_args(out, 30), train_dataset=TASK_A, callbacks=[MASTrainerCallback(mas)]
    )
    trainer.train()
    return types.SimpleNamespace(model=model, mas=mas, calls=calls, out=out, seen_keys=seen_keys, trainer=trainer)


def test_task_a_consolidates_on_training_data_without_labels(after_task_a):
    mas = after_task_a.mas
    assert mas.num_tasks == 1 and len(after_task_a.calls) == 30
    assert after_task_a.calls == [0.0] * 30  # no Ω yet: the penalty is zero during the first task
    assert after_task_a.seen_keys == {"input_ids", "attention_mask"}  # labels dropped, the mask kept
    batches = [
        {k: torch.stack([TASK_A[i][k] for i in range(j, j + 8)]) for k in ("input_ids", "attention_mask")}
        for j in range(0, 32, 8)
    ]
    expected = ml.compute_importance(after_task_a.model, batches, progress=False)
    assert set(mas.importance) == set(expected)
    for name, omega in expected.items():  # sample Ω is a mean over samples: the shuffled order changes nothing
        torch.testing.assert_close(mas.importance[name], omega, rtol=1e-4, atol=1e-7)
    assert all(v.sum() > 0 for v in mas.importance.values())
    saved = torch.load(after_task_a.out / "mas_state.pt", weights_only=True)  # written after the consolidation
    assert saved["num_tasks"] == 1
    for name, omega in mas.importance.items():
        assert torch.equal(saved["importance"][name], omega)


def test_mas_reduces_drift_and_forgetting_of_task_a(after_task_a, tmp_path):
    base, mas = after_task_a.model, after_task_a.mas
    omega, star = mas.importance, mas.anchors
    loss_a = task_loss(base, TASK_A)
    results = {}
    for use_mas in (False, True):
        model, mas_b = copy_with_mas(base, mas)
        callbacks = [MASTrainerCallback(mas_b, consolidate_on=None)] if use_mas else []
        trainer = Trainer(model=model, args=training_args(tmp_path, 20), train_dataset=TASK_B, callbacks=callbacks)
        trainer.train()
        logged = [h["mas_penalty"] for h in trainer.state.log_history if "mas_penalty" in h and "loss" in h]
        results[use_mas] = (drift(model, omega, star), task_loss(model, TASK_A) - loss_a, logged)
    (drift_plain, forget_plain, logged_plain), (drift_mas, forget_mas, logged_mas) = results[False], results[True]
    assert drift_plain > 1.0 and forget_plain > 0.1  # task B moves task A's important weights when unregularised
    assert drift_mas < 0.05 * drift_plain
    assert forget_mas < 0.2 * forget_plain
    assert logged_plain == [] and len(logged_mas) == 20  # the penalty is logged with the loss at every log step
    assert logged_mas[0] == 0.0 and max(logged_mas) > 1.0  # θ = θ* at the first step, then the penalty acts


def test_gradient_accumulation_adds_the_penalty_once_per_optimizer_step(after_task_a, tmp_path):
    model, mas = copy_with_mas(after_task_a.model, after_task_a.mas)
    with torch.no_grad():  # θ ≠ θ* from the first step on, so the penalty gradient is not zero
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    calls = spy(mas)
    grads = {"before": [], "after": [], "expected": []}

    class Probe(TrainerCallback):
        def __init__(self, when):
            self.when = when

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads[self.when].append({n: p.grad.clone() for n, p in model.named_parameters()})
            if self.when == "before":
                grads["expected"].append(
                    {
                        n: 2 * LAM * mas.importance[n] * (p.detach() - mas.anchors[n])
                        for n, p in model.named_parameters()
                    }
                )

    args = training_args(tmp_path, 2, gradient_accumulation_steps=3, per_device_train_batch_size=4)
    callbacks = [Probe("before"), MASTrainerCallback(mas, consolidate_on=None), Probe("after")]
    Trainer(model=model, args=args, train_dataset=TASK_B, callbacks=callbacks).train()
    assert len(calls) == 2  # 2 optimizer steps of 3 micro-batches each: 2 calls, not 6
    assert len(grads["after"]) == 2
    for before, after, expected in zip(grads["before"], grads["after"], grads["expected"]):
        added = {n: after[n] - before[n] for n in after}
        assert sum(e.abs().sum() for e in expected.values()) > 1.0
        for n in added:
            torch.testing.assert_close(added[n], expected[n], rtol=1e-4, atol=1e-5)


def test_resume_from_checkpoint_restores_omega_and_the_next_penalty(after_task_a, tmp_path):
    model, mas = copy_with_mas(after_task_a.model, after_task_a.mas)
    calls = spy(mas)
    args = training_args(tmp_path, 4, save_strategy="steps", save_steps=2)
    Trainer(
        model=model, args=args, train_dataset=TASK_B, callbacks=[MASTrainerCallback(mas, consolidate_on=None)]
    ).train()
    assert len(calls) == 4 and calls[2] > 0
    checkpoint = tmp_path / "checkpoint-2"
    saved = torch.load(checkpoint / "mas_state.pt", weights_only=True)
    assert saved["num_tasks"] == 1

    fresh = tiny_gpt2(seed=1)  # other weights and no Ω: everything must come from the checkpoint
    mas_fresh = ml.MAS(fresh, lam=LAM, progress=False)
    calls_fresh = spy(mas_fresh)
    trainer = Trainer(
        model=fresh, args=args, train_dataset=TASK_B, callbacks=[MASTrainerCallback(mas_fresh, consolidate_on=None)]
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert mas_fresh.num_tasks == 1
    for name, omega in after_task_a.mas.importance.items():
        assert torch.equal(mas_fresh.importance[name], omega)
        assert torch.equal(mas_fresh.anchors[name], after_task_a.mas.anchors[name])
    assert len(calls_fresh) == 2
    assert calls_fresh[0] == pytest.approx(calls[2], rel=1e-6)  # the step after the checkpoint: the same penalty

    named = MASTrainerCallback(
        ml.MAS(tiny_gpt2(), lam=LAM, progress=False), consolidate_on=None, resume_from=checkpoint
    )
    args_elsewhere = training_args(tmp_path / "elsewhere", 1)
    Trainer(model=named.mas.model, args=args_elsewhere, train_dataset=TASK_B, callbacks=[named]).train()
    assert named.mas.num_tasks == 1 and named.resume_from is None  # loaded once, at this start only
    torch.testing.assert_close(named.mas.importance, after_task_a.mas.importance, rtol=0, atol=0)

    stripped = tmp_path / "no_state"
    shutil.copytree(checkpoint, stripped)
    os.remove(stripped / "mas_state.pt")
    args = training_args(stripped.parent / "elsewhere", 4, save_strategy="steps", save_steps=2)
    callback = MASTrainerCallback(ml.MAS(tiny_gpt2(), progress=False), consolidate_on=None)
    with pytest.raises(FileNotFoundError, match="mas_state.pt"):
        Trainer(model=callback.mas.model, args=args, train_dataset=TASK_B, callbacks=[callback]).train(
            resume_from_checkpoint=str(stripped)
        )


def test_settings_dict_named_dataset_and_clipping_of_the_sum(tmp_path):
    model = tiny_gpt2()
    callback = MASTrainerCallback(
        {"lam": LAM, "mode": "local", "progress": False}, consolidate_on=TASK_A, max_batches=2
    )
    Trainer(model=model, args=training_args(tmp_path, 3), train_dataset=TASK_A, callbacks=[callback]).train()
    assert callback.mas.model is model and callback.mas.mode == "local" and callback.mas.num_tasks == 1

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    norms = {}
    mas = callback.mas

    class Norm(TrainerCallback):
        def __init__(self, when):
            self.when = when

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad for p in model.parameters()]
            if self.when == "before":  # what task + penalty would be without clipping
                penalty = [
                    2 * LAM * mas.importance[n] * (p.detach() - mas.anchors[n]) for n, p in model.named_parameters()
                ]
                grads = [g + q for g, q in zip(grads, penalty)]
            norms[self.when] = torch.cat([g.flatten() for g in grads]).norm().item()

    clipped = MASTrainerCallback(mas, consolidate_on=None, clip_grad_norm=0.5)
    args = training_args(tmp_path, 1, max_grad_norm=0.0)
    Trainer(model=model, args=args, train_dataset=TASK_B, callbacks=[Norm("before"), clipped, Norm("after")]).train()
    assert norms["before"] > 2.0  # the sum is well above the limit ...
    assert norms["after"] == pytest.approx(0.5, rel=1e-4)  # ... and task + penalty are clipped together
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        Trainer(model=model, args=training_args(tmp_path, 1), train_dataset=TASK_B, callbacks=[clipped]).train()


def test_refuses_a_mas_of_another_model_and_bad_arguments(tmp_path):
    other = ml.MAS(tiny_gpt2(), progress=False)
    with pytest.raises(ValueError, match="not part of"):
        Trainer(
            model=tiny_gpt2(),
            args=training_args(tmp_path, 1),
            train_dataset=TASK_A,
            callbacks=[MASTrainerCallback(other)],
        ).train()
    with pytest.raises(ValueError, match="consolidate_on"):
        MASTrainerCallback(other, consolidate_on="test")
    with pytest.raises(TypeError, match="mas_local.MAS or a dict"):
        MASTrainerCallback(object())
    with pytest.raises(ValueError, match="clip_grad_norm"):
        MASTrainerCallback(other, clip_grad_norm=-1.0)
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="max_batches must be a positive int"):
            MASTrainerCallback(other, max_batches=bad)


def test_fp16_gradients_are_unscaled_before_the_penalty():
    """With max_grad_norm=0 the Trainer leaves fp16 gradients scaled: the callback unscales them first, once."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 3)
    true = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    scaler.scale(layer(x).square().sum()).backward()
    torch.testing.assert_close(layer.weight.grad, 1024.0 * true)
    accelerated = types.SimpleNamespace(scaler=scaler, optimizer=opt)  # what accelerate hands the callbacks
    unscale_pending(accelerated)
    torch.testing.assert_close(layer.weight.grad, true)
    unscale_pending(accelerated)  # a second call changes nothing
    before = layer.weight.detach().clone()
    scaler.step(opt)  # sees the gradients unscaled already: no second division
    torch.testing.assert_close(before - layer.weight.detach(), true)


def test_import_mas_local_imports_no_framework_and_a_missing_one_names_the_extra():
    code = (
        "import sys, mas_local, mas_local.integrations\n"
        "assert 'transformers' not in sys.modules and 'lightning' not in sys.modules, 'a framework was imported'\n"
        "sys.modules['transformers'] = None\n"  # as if transformers were not installed
        "try:\n"
        "    from mas_local.integrations import MASTrainerCallback\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'mas-local[hf]'" in out.stdout and "transformers" in out.stdout


def _ddp_worker(out: str) -> None:
    """One rank of the DDP test (run by torchrun): task A with the callback, then this rank's Ω and weights."""
    import torch.distributed as dist

    transformers.logging.set_verbosity_error()
    model = tiny_gpt2()
    mas = ml.MAS(model, lam=LAM, progress=False)
    args = training_args(out, 2, ddp_backend="gloo", per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=TASK_A, callbacks=[MASTrainerCallback(mas)])
    trainer.train()
    result = {
        "wrapper": type(trainer.model_wrapped).__name__,
        "omega": mas.importance,
        "params": {n: p.detach() for n, p in model.named_parameters()},
    }
    torch.save(result, os.path.join(out, f"rank{dist.get_rank()}.pt"))


@pytest.mark.slow
def test_trainer_ddp_ranks_consolidate_on_their_shares(tmp_path):
    """Two gloo ranks under the Trainer's DDP: each consolidates on its half of task A, and Ω is that of all of it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    out = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["wrapper"] for r in ranks] == ["DistributedDataParallel"] * 2
    model = tiny_gpt2()
    model.load_state_dict(ranks[0]["params"], strict=False)
    batches = [
        {k: torch.stack([TASK_A[i][k] for i in range(j, j + 4)]) for k in ("input_ids", "attention_mask")}
        for j in range(0, 32, 4)
    ]
    expected = ml.compute_importance(model, batches, progress=False)  # one process, all 32 samples
    for name, omega in expected.items():
        assert torch.equal(ranks[0]["omega"][name], ranks[1]["omega"][name])
        torch.testing.assert_close(ranks[0]["omega"][name], omega, rtol=1e-5, atol=1e-7)
    state = torch.load(tmp_path / "checkpoint-2" / "mas_state.pt", weights_only=True)  # written once, by rank 0
    assert state["num_tasks"] == 0


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


def test_a_callback_registered_twice_adds_the_penalty_once_and_consolidates_once(after_task_a, tmp_path):
    """callbacks=[cb] and then callback_handler.callbacks.insert(0, cb), as an old version of the docs advised:
    one penalty per optimizer step and one consolidation, with a warning."""
    model, mas = copy_with_mas(after_task_a.model, after_task_a.mas)
    calls = spy(mas)
    tasks_before = mas.num_tasks
    callback = MASTrainerCallback(mas, max_batches=1)
    trainer = Trainer(model=model, args=training_args(tmp_path, 2), train_dataset=TASK_B, callbacks=[callback])
    trainer.callback_handler.callbacks.insert(0, callback)
    assert trainer.callback_handler.callbacks.count(callback) == 2
    with pytest.warns(UserWarning, match="registered twice"):
        trainer.train()
    assert len(calls) == 2  # 2 optimizer steps
    assert mas.num_tasks == tasks_before + 1


class DictOutput(torch.nn.Module):
    """Returns a plain dict: the Trainer trains on its "loss", but consolidation cannot read it."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(61, 8)
        self.head = torch.nn.Linear(8, 61)

    def forward(self, input_ids, attention_mask=None, labels=None):
        scores = self.head(self.emb(input_ids))
        out = {"scores": scores}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(scores.flatten(0, 1), labels.flatten())
        return out


def test_an_output_consolidation_cannot_read_fails_at_the_first_step(tmp_path):
    model = DictOutput()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = MASTrainerCallback({"lam": 1.0, "progress": False})
    trainer = Trainer(model=model, args=training_args(tmp_path, 3), train_dataset=TASK_B, callbacks=[callback])
    with pytest.raises(ValueError, match="output_fn"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no optimizer step ran
    # with output_fn it trains and consolidates
    callback = MASTrainerCallback({"lam": 1.0, "progress": False, "output_fn": lambda out: out["scores"]})
    Trainer(model=model, args=training_args(tmp_path, 2), train_dataset=TASK_B, callbacks=[callback]).train()
    assert callback.mas.num_tasks == 1
