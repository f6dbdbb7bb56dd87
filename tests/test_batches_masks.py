"""Batches as users write them, masks, and what a failed estimate leaves behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mas_local as ml
from tests import oracles
from tests.models import ConvNet, TokenModel
from tests.test_importance import assert_close


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) * self.b(z)


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 17, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    return ids * mask, mask


def test_forward_fn_and_tuple_batches():
    torch.manual_seed(0)
    model = TwoInputs().double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64))
    ]
    got = ml.compute_importance(model, batches, forward_fn=lambda m, b: m(*b), progress=False)
    want = oracles.global_sample(_Packed(model), [torch.cat(b, 1) for b in batches])
    assert_close(got, {k.removeprefix("inner."): v for k, v in want.items()})
    # a tuple whose first element is a dict calls model(**dict); the labels are ignored
    as_dict = [({"x": x, "z": z}, torch.zeros(5)) for x, z in batches]
    again = ml.compute_importance(model, as_dict, progress=False)
    for k in got:
        torch.testing.assert_close(again[k], got[k])


class _Packed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, xz):
        return self.inner(xz[:, :4], xz[:, 4:])


class MaskedTokens(nn.Module):
    """A token model that takes (input_ids, attention_mask) and ignores the mask (positions are independent)."""

    def __init__(self):
        super().__init__()
        self.inner = TokenModel()

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids)


@pytest.mark.parametrize("mode,estimator", [("global", "sample"), ("local", "hebbian"), ("local", "sample")])
def test_mask_selects_positions_and_padding_changes_nothing(mode, estimator):
    torch.manual_seed(0)
    model = MaskedTokens().double().eval()
    ids, mask = _tokens()
    padded = ml.compute_importance(
        model, [{"input_ids": ids, "attention_mask": mask}], mode=mode, estimator=estimator, progress=False
    )
    singles = [{"input_ids": ids[k : k + 1, : int(mask[k].sum())]} for k in range(3)]
    alone = ml.compute_importance(model, singles, mode=mode, estimator=estimator, progress=False)
    assert_close(padded, {k: v.double() for k, v in alone.items()})
    # the same mask by another key, by a callable; mask=None counts the padding
    renamed = [{"input_ids": ids, "keep": mask}]
    by_key = ml.compute_importance(
        model,
        renamed,
        mode=mode,
        estimator=estimator,
        mask="keep",
        forward_fn=lambda m, b: m(b["input_ids"]),
        progress=False,
    )
    by_fn = ml.compute_importance(
        model, [(ids, mask)], mode=mode, estimator=estimator, mask=lambda b: b[1], progress=False
    )  # a tuple: the model gets its first element, the mask comes from the callable
    unmasked = ml.compute_importance(
        model, [{"input_ids": ids, "attention_mask": mask}], mode=mode, estimator=estimator, mask=None, progress=False
    )
    for k in padded:
        torch.testing.assert_close(by_key[k], padded[k])
        torch.testing.assert_close(by_fn[k], padded[k])
    assert any(not torch.allclose(unmasked[k], padded[k]) for k in padded)


def test_bad_masks_are_refused():
    model = MaskedTokens().double()
    ids, mask = _tokens()
    with pytest.raises(ml.ImportanceError, match="no such key"):
        ml.compute_importance(model, [{"input_ids": ids}], mask="keep", progress=False)
    with pytest.raises(ml.ImportanceError, match=r"must be a \[batch=3, positions\]"):
        ml.compute_importance(model, [{"input_ids": ids, "attention_mask": mask[:2]}], progress=False)
    with pytest.raises(ml.ImportanceError, match="boolean or 0/1"):
        ml.compute_importance(model, [{"input_ids": ids, "attention_mask": mask * 2}], progress=False)
    with pytest.raises(TypeError, match="mask must be"):
        ml.MAS(model, mask=3)


def test_failed_estimate_in_train_mode_leaves_buffers_untouched():
    model = ConvNet().double()
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ml.ImportanceError, match="train mode mixes the samples"):
        ml.compute_importance(model.train(), [x], eval_mode=False, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_reentrant_checkpointing_gets_a_clear_error():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=31)
    model = transformers.GPT2LMHeadModel(cfg).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batch = {"input_ids": torch.randint(0, 31, (2, 5))}
    with pytest.raises(ml.ImportanceError, match="use_reentrant=False"):
        ml.compute_importance(model, [batch], eval_mode=False, progress=False)
    imp = ml.compute_importance(model, [batch], progress=False)  # eval mode: no checkpointing, works
    assert all(torch.isfinite(v).all() for v in imp.values())


class PositionModel(nn.Module):
    """A position embedding on ids shared by the batch ([1, T]), used in two ways."""

    def __init__(self, collapse: bool):
        super().__init__()
        self.collapse = collapse
        self.tok, self.pos = nn.Embedding(11, 4), nn.Embedding(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))  # [1, T, 4]
        if self.collapse:  # a consumer that reduces over dim 0: expanding the shared output would change it
            pos = pos.sum(0)
        return self.out(torch.tanh(self.tok(ids) + pos))


@pytest.mark.parametrize("collapse", [False, True], ids=["broadcast", "reduced-over-dim0"])
def test_shared_position_embedding_is_exact(collapse, caplog):
    torch.manual_seed(0)
    model = PositionModel(collapse).double()
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(2))
    from mas_local.importance.estimator import Estimator

    est = Estimator(model)
    with caplog.at_level("INFO", logger="mas_local"):
        est.update(ids)
    assert (id(model.pos) in est.plan.expand) != collapse  # expanded unless that changes the output
    assert ("not expanding" in caplog.text) == collapse
    assert_close(est.result(), oracles.global_sample(model, [ids]))


@pytest.mark.parametrize("mode,estimator", [("global", "sample"), ("local", "hebbian"), ("local", "sample")])
def test_micro_batches_give_the_same_importance(mode, estimator):
    torch.manual_seed(0)
    model = MaskedTokens().double().eval()
    ids, mask = _tokens()
    batches = [{"input_ids": ids, "attention_mask": mask}, ({"input_ids": ids[:2], "attention_mask": mask[:2]}, 0)]
    whole = ml.compute_importance(model, batches, mode=mode, estimator=estimator, progress=False)
    pieces = ml.compute_importance(model, batches, mode=mode, estimator=estimator, micro_batch=2, progress=False)
    for k in whole:
        torch.testing.assert_close(pieces[k], whole[k], rtol=1e-5, atol=1e-7)


def test_micro_batch_is_validated():
    with pytest.raises(ValueError, match="estimator='batch'"):
        ml.MAS(MaskedTokens(), estimator="batch", micro_batch=2)
    with pytest.raises(ValueError, match="positive int"):
        ml.compute_importance(MaskedTokens(), [torch.zeros(2, 3, dtype=torch.long)], micro_batch=0)
