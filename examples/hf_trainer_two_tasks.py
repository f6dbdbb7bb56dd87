"""Two token tasks in a row with the Hugging Face Trainer, with and without MASTrainerCallback.

A tiny GPT-2 (random init, nothing downloaded) learns task A (sequences counting up by 1 over tokens
0..29), then task B (counting up by 7 over tokens 30..60). The callback consolidates after task A on the
Trainer's own training data (labels dropped, attention mask honoured), adds the penalty gradient once per
optimizer step during task B, logs it as ``mas_penalty``, and saves the MAS state in every checkpoint.

Run: python examples/hf_trainer_two_tasks.py   (needs: pip install 'mas-local[hf]'; some 10 s on 2 cores)
"""

from __future__ import annotations

import copy
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import mas_local as ml
from mas_local.integrations import MASTrainerCallback


class CountingTask(Dataset):
    """Token sequences ``lo + (s + step·t) mod (hi − lo)``, as dicts with labels, as a tokenizer would give them."""

    def __init__(self, step: int, lo: int, hi: int, n: int = 64, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(lo, hi, (n,), generator=g)
        self.ids = lo + (start[:, None] - lo + step * torch.arange(length)) % (hi - lo)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def loss_on(model: torch.nn.Module, task: CountingTask) -> float:
    batch = {k: torch.stack([task[i][k] for i in range(len(task))]) for k in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def args(out: str, steps: int, **kw) -> TrainingArguments:
    return TrainingArguments(
        out,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=10,
        save_strategy="steps",
        save_steps=20,  # each checkpoint-N folder also holds mas_state.pt
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **kw,
    )


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    task_a, task_b = CountingTask(1, 0, 30), CountingTask(7, 30, 61, seed=1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    out = tempfile.mkdtemp(prefix="mas_hf_")

    # Task A. The callback creates MAS(model, lam=...) when training begins and consolidates when it ends.
    # λ's scale follows Ω's (here Ω sums to ~1e5 over a small model, so a small λ already holds task A).
    callback = MASTrainerCallback({"lam": 0.003, "progress": False})
    Trainer(model=model, args=args(f"{out}/a", 60), train_dataset=task_a, callbacks=[callback]).train()
    mas = callback.mas
    loss_a = loss_on(model, task_a)
    print(f"after task A: task-A loss {loss_a:.3f}; Ω of {len(mas.importance)} tensors, saved in {out}/a/mas_state.pt")

    # Task B, once without MAS and once with it, from the same weights.
    for name in ("fine-tune", "MAS"):
        run = copy.deepcopy(model)
        callbacks = []
        if name == "MAS":
            mas_b = ml.MAS(run, lam=mas.lam, progress=False)
            mas_b.load_state_dict(mas.state_dict())
            callbacks = [MASTrainerCallback(mas_b, consolidate_on=None)]
        trainer = Trainer(model=run, args=args(f"{out}/{name}", 60), train_dataset=task_b, callbacks=callbacks)
        trainer.train()
        penalty = [h["mas_penalty"] for h in trainer.state.log_history if "mas_penalty" in h]
        print(
            f"{name:>9}: task-A loss {loss_on(run, task_a):.3f} (was {loss_a:.3f}), task-B loss "
            f"{loss_on(run, task_b):.3f}" + (f", logged mas_penalty {penalty[-1]:.4f}" if penalty else "")
        )
    # Resuming: Trainer(...).train(resume_from_checkpoint=f"{out}/MAS/checkpoint-20") loads that folder's
    # mas_state.pt into the callback's MAS (torch.load(..., weights_only=True)) before the first step.


if __name__ == "__main__":
    main()
