"""The docs' examples run as written (#21): the README's quick start and Hugging Face example, and the Trainer
and Lightning examples of docs/integrations.md. Each block is taken from the file and executed in a fresh
directory; the names an example says it is given (a model, datasets) are supplied, and the Hugging Face
example's two downloads are replaced by a tokenizer and a tiny GPT-2 built here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def python_block(path: str, heading: str) -> str:
    """The first ```python block after ``heading`` in ``path``."""
    text = (ROOT / path).read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {heading!r} in {path}"
    return match.group(1)


def run(code: str, where: Path, **given) -> dict:
    namespace = {"__name__": "__docs_example__", **given}
    old = Path.cwd()
    try:
        import os

        os.chdir(where)
        exec(compile(code, "<docs example>", "exec"), namespace)
    finally:
        os.chdir(old)
    return namespace


def test_readme_quick_start(tmp_path):
    ns = run(python_block("README.md", "## Quick start"), tmp_path)
    mas = ns["mas"]
    assert mas.num_tasks == 2 and (tmp_path / "mas.pt").is_file()
    state = torch.load(tmp_path / "mas.pt", weights_only=True)
    assert state["num_tasks"] == 2


def test_readme_hugging_face_example(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.test_tokenizer_batch import TEXTS

    def tokenizer(*args, **kwargs):
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        texts = TEXTS + ["the first task's text", "a longer sample of the first task, padded on the right"]
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[EOS]", "[UNK]"]))
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", unk_token="[UNK]")

    def model(*args, **kwargs):
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=64)
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    ns = run(python_block("README.md", "## Hugging Face models"), tmp_path)
    mas = ns["mas"]
    assert mas.num_tasks == 1
    assert all(torch.isfinite(v).all() for v in mas.importance.values())
    assert sum(v.sum().item() for v in mas.importance.values()) > 0


def test_integrations_trainer_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tests.test_integrations_hf import TASK_A, TASK_B, tiny_gpt2

    torch.manual_seed(0)
    task1 = torch.utils.data.Subset(TASK_A, range(16))
    task2 = torch.utils.data.Subset(TASK_B, range(16))
    ns = run(
        python_block("docs/integrations.md", "## Hugging Face `Trainer`"),
        tmp_path,
        model=tiny_gpt2(),
        task1=task1,
        task2=task2,
    )
    # task 2 resumed from its last checkpoint (written before its consolidation): still two tasks, not three
    assert ns["mas"].num_tasks == 2
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "out" / "task2").iterdir())


def test_integrations_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    from tests.test_integrations_lightning import TASK_A, TASK_B, Classifier, loader

    ns = run(
        python_block("docs/integrations.md", "## Lightning: `MASLightningCallback`"),
        tmp_path,
        lit_module=Classifier(seed=1),
        task1_loader=loader(TASK_A),
        task2_loader=loader(TASK_B),
    )
    assert ns["mas"].num_tasks == 2
    assert (tmp_path / "ckpt" / "task2" / "last.ckpt").is_file()
