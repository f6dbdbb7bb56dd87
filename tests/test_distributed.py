"""MAS under torch.distributed: 2 gloo processes on CPU against single-process runs on all the data.

One spawn runs every distributed scenario (``_worker``) and saves each rank's results;
the tests below compare them with single-process references computed here. Float
sums are added in another order across ranks than in one process, so Ω is compared
with a float32 tolerance (rtol 1e-5), not bit for bit.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mas_local as ml
from mas_local.distributed import sharded
from mas_local.importance import run_pass
from tests.models import MLP, TokenModel

WORLD = 2
CASES = [("global", "sample"), ("global", "batch"), ("local", "hebbian"), ("local", "sample")]
FSDP_CASES = [("global", "sample"), ("global", "batch"), ("local", "hebbian"), ("local", "sample"), ("local", "batch")]
TOL = dict(rtol=1e-5, atol=1e-7)


def _data(kind):
    """Five batches of different sizes (so the batch estimator's per-batch grouping matters)."""
    g = torch.Generator().manual_seed(1)
    if kind == "tokens":
        return [torch.randint(0, 17, (b, 3), generator=g) for b in (4, 3, 5, 2, 4)]
    return [torch.randn(b, 13, generator=g) for b in (4, 3, 5, 2, 4)]


def _model(kind):
    torch.manual_seed(0)
    return TokenModel() if kind == "tokens" else MLP()


def _perturb(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def _llama():
    from tests.models import tiny_llama

    return tiny_llama().to(torch.bfloat16)


def _token_batches():
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 97, (3, 8), generator=g)} for _ in range(4)]


def _step_input():
    return torch.randn(8, 13, generator=torch.Generator().manual_seed(3))


class _Interrupt(Exception):
    pass


def _interrupted(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise _Interrupt
        yield b


def _full(t):
    return t.full_tensor() if ml.distributed.is_dtensor(t) else t


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from torch.nn.parallel import DistributedDataParallel as DDP

    res = {}
    try:
        # 1. data parallel importance: DDP-wrapped MAS and plain compute_importance, each rank its share
        for kind in ("mlp", "tokens"):
            data = _data(kind)
            for mode, est in CASES:
                shard = data[rank::WORLD]
                model = _model(kind)
                res["plain", kind, mode, est] = ml.compute_importance(model, shard, mode, est, progress=False)
                ddp = DDP(_model(kind))
                res["ddp", kind, mode, est] = ml.MAS(ddp, mode=mode, estimator=est, progress=False).consolidate(shard)
        data = _data("mlp")
        res["uneven"] = ml.compute_importance(_model("mlp"), data if rank == 0 else [], progress=False)
        res["nosync"] = ml.compute_importance(_model("mlp"), data[rank::WORLD], progress=False, sync=False)

        # 2. one DDP step with the penalty (autograd route and fused route) and the state-dict naming
        for route in ("penalty", "fused"):
            ddp = DDP(_model("mlp"))
            mas = ml.MAS(ddp, lam=0.9, progress=False)
            mas.consolidate(data[rank::WORLD])
            _perturb(ddp.module)
            x = _step_input()[4 * rank : 4 * rank + 4]
            loss = ddp(x).pow(2).mean()
            if route == "penalty":
                (loss + mas.penalty()).backward()
                res["pen_value", route] = mas.penalty().detach()
            else:
                loss.backward()
                res["pen_value", route] = mas.add_penalty_grad_()
            res["grads", route] = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
        sd = mas.state_dict()
        inner = ml.MAS(ddp.module, progress=False)
        inner.load_state_dict(sd)
        res["sd_keys"] = sorted(sd["importance"])
        res["sd_roundtrip"] = all(torch.equal(inner.importance[k], mas.importance[k]) for k in sd["importance"])

        # 3. resumable pass under sync: every rank interrupted after 1 of its batches, then resumed
        path = os.path.join(out_dir, "ckpt.pt")
        mas = ml.MAS(_model("mlp"), progress=False)
        shard = data[rank::WORLD]
        try:
            mas.consolidate(_interrupted(shard, 1), checkpoint_path=path, checkpoint_every=1)
        except _Interrupt:
            pass
        res["ckpt_file"] = os.path.exists(ml.distributed.rank_path(path, dist.group.WORLD))
        res["resumed"] = mas.consolidate(shard, checkpoint_path=path, checkpoint_every=1)
        res["ckpt_removed"] = not os.path.exists(ml.distributed.rank_path(path, dist.group.WORLD))

        # 4. FSDP2: sharded Ω and θ*, local-mode estimation, penalty on shards. Every forward of an
        # FSDP2 model is a collective, so each rank passes the same number of batches (2 each).
        from torch.distributed.fsdp import fully_shard

        data = data[:4]

        for mode, est in FSDP_CASES:
            # "sample": a 256-byte flush cap, so pending full-size sums are all-reduced several times a batch
            sharded.SYNC_BUCKET_BYTES = 256 if est == "sample" else 64 << 20
            model = _model("mlp")
            for m in (model.fc1, model.norm, model.fc2, model.head):  # the LayerNorm is an FSDP unit too
                fully_shard(m)
            fully_shard(model)
            mas = ml.MAS(model, lam=0.9, mode=mode, estimator=est, progress=False)
            mas.consolidate(data[rank::WORLD])
            res["fsdp_omega", mode, est] = {k: _full(v) for k, v in mas.importance.items()}
            shards = [ml.distributed.shard_of(v) for v in mas.importance.values()]
            res["fsdp_local_numel", mode, est] = sum(v.numel() for v in shards)
            res["fsdp_anchor_local_numel", mode, est] = sum(
                ml.distributed.shard_of(v).numel() for v in mas.anchors.values()
            )
        res["fsdp_report"] = dict(mas.memory_report()["total"])
        est_obj = mas.estimator_for_pass()
        run_pass(est_obj, data[rank::WORLD][:1], progress=False)
        res["fsdp_estimator"] = (type(est_obj).__name__, {k: tuple(v.shape) for k, v in est_obj.stats.sums.items()})
        # resumable pass on the sharded model: interrupted after 1 of 2 batches, resumed
        path = os.path.join(out_dir, "fsdp_ckpt.pt")
        fresh = ml.MAS(model, mode="local", estimator="batch", progress=False)
        try:
            fresh.consolidate(_interrupted(data[rank::WORLD], 1), checkpoint_path=path, checkpoint_every=1)
        except _Interrupt:
            pass
        res["fsdp_ckpt_file"] = os.path.exists(ml.distributed.rank_path(path, dist.group.WORLD))
        resumed = fresh.consolidate(data[rank::WORLD], checkpoint_path=path, checkpoint_every=1)
        res["fsdp_resumed_equal"] = all(
            torch.equal(resumed[k].to_local(), mas.importance[k].to_local()) for k in resumed
        )
        # state dicts: a sharded state loads into another sharded MAS; a full (single-process) state is sharded
        other = ml.MAS(model, mode="local", estimator="batch", progress=False)
        other.load_state_dict(mas.state_dict())
        res["fsdp_sd_sharded"] = all(
            ml.distributed.is_dtensor(other.importance[k]) and torch.equal(other.importance[k].to_local(), v.to_local())
            for k, v in mas.importance.items()
        )
        single = ml.MAS(_model("mlp"), mode="local", estimator="batch", progress=False, sync=False)
        single.consolidate(data)
        other.load_state_dict(single.state_dict())
        res["fsdp_sd_from_full"] = {k: _full(v) for k, v in other.importance.items()}
        res["fsdp_sd_full_ref"] = single.importance
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().add_(0.05)
        x = _step_input()[4 * rank : 4 * rank + 4]
        (model(x).pow(2).mean() + mas.penalty()).backward()
        res["fsdp_pen_value"] = mas.penalty().detach()
        res["fsdp_grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        res["fsdp_fused_value"] = mas.add_penalty_grad_()
        res["fsdp_fused_grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
        # a bf16 Llama sharded per decoder layer: local importance and the memory it costs per rank
        if importlib.util.find_spec("transformers") is not None:
            for mode in ("local", "global"):
                llama = _llama()
                for layer in llama.model.layers:
                    fully_shard(layer)
                fully_shard(llama)
                mas = ml.MAS(llama, mode=mode, progress=False)
                mas.consolidate(_token_batches()[rank::WORLD])
                res["llama_omega", mode] = {k: _full(v) for k, v in mas.importance.items()}
                res["llama_report", mode] = dict(mas.memory_report()["bytes_per_param"])
        # a tied head read outside its module (F.linear(h, emb.weight) in the root): the usage probe follows
        # FSDP2's unsharded parameters, so the plan is the unsharded model's
        for mode, est in TIED_CASES:
            tied = _tied()
            fully_shard(tied.mix)
            fully_shard(tied)
            mas = ml.MAS(tied, mode=mode, estimator=est, progress=False)
            mas.consolidate(_tied_batches()[rank::WORLD])
            res["tied_omega", mode, est] = {k: _full(v) for k, v in mas.importance.items()}
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


TIED_CASES = [("global", "sample"), ("global", "batch"), ("local", "hebbian"), ("local", "sample")]


def _tied():
    from tests.patterns import TiedOutside

    torch.manual_seed(4)
    return TiedOutside()


def _tied_batches():
    g = torch.Generator().manual_seed(6)
    return [torch.randint(0, 13, (3, 5), generator=g) for _ in range(4)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_dicts_close(got, want, **tol):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k].to(got[k].dtype), **(tol or TOL), msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["mlp", "tokens"])
@pytest.mark.parametrize("mode,est", CASES)
@pytest.mark.parametrize("how", ["plain", "ddp"])
def test_data_parallel_importance_equals_single_process(ranks, how, kind, mode, est):
    want = ml.compute_importance(_model(kind), _data(kind), mode, est, progress=False)
    for r in range(WORLD):
        _assert_dicts_close(ranks[r][how, kind, mode, est], want)
    for k in want:  # every rank ends with the same Ω
        assert torch.equal(ranks[0][how, kind, mode, est][k], ranks[1][how, kind, mode, est][k])


def test_rank_without_data_and_sync_off(ranks):
    data = _data("mlp")
    want = ml.compute_importance(_model("mlp"), data, progress=False)
    for r in range(WORLD):
        _assert_dicts_close(ranks[r]["uneven"], want)
        mine = ml.compute_importance(_model("mlp"), data[r::WORLD], progress=False)
        _assert_dicts_close(ranks[r]["nosync"], mine)


@pytest.mark.parametrize("route", ["penalty", "fused"])
def test_ddp_step_with_penalty_matches_single_process(ranks, route):
    model = _model("mlp")
    mas = ml.MAS(model, lam=0.9, progress=False)
    mas.consolidate(_data("mlp"))
    _perturb(model)
    (model(_step_input()).pow(2).mean() + mas.penalty()).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    for r in range(WORLD):
        _assert_dicts_close(ranks[r]["grads", route], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[r]["pen_value", route], mas.penalty().detach(), rtol=1e-5, atol=1e-7)


def test_ddp_state_dict_uses_inner_names(ranks):
    names = sorted(n for n, _ in _model("mlp").named_parameters())
    for r in range(WORLD):
        assert ranks[r]["sd_keys"] == names
        assert ranks[r]["sd_roundtrip"]


def test_resume_under_sync(ranks):
    want = ml.compute_importance(_model("mlp"), _data("mlp"), progress=False)
    for r in range(WORLD):
        assert ranks[r]["ckpt_file"] and ranks[r]["ckpt_removed"]
        _assert_dicts_close(ranks[r]["resumed"], want)


@pytest.mark.parametrize("mode,est", FSDP_CASES)
def test_fsdp_sharded_importance(ranks, mode, est):
    model = _model("mlp")
    want = ml.compute_importance(model, _data("mlp")[:4], mode, est, progress=False)
    total = sum(p.numel() for p in model.parameters())
    for r in range(WORLD):
        _assert_dicts_close(ranks[r]["fsdp_omega", mode, est], want)
    # each rank keeps only its shard of Ω and θ*: the shards add up to the model
    assert 0 < ranks[0]["fsdp_local_numel", mode, est] < total
    assert sum(ranks[r]["fsdp_local_numel", mode, est] for r in range(WORLD)) == total
    assert sum(ranks[r]["fsdp_anchor_local_numel", mode, est] for r in range(WORLD)) == total


def test_fsdp_penalty_and_fused_grad_match_single_process(ranks):
    model = _model("mlp")
    mas = ml.MAS(model, lam=0.9, mode="local", estimator="batch", progress=False)
    mas.consolidate(_data("mlp")[:4])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    x = _step_input()
    (model(x).pow(2).mean() + mas.penalty()).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["fsdp_pen_value"], mas.penalty().detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[r]["fsdp_fused_value"], mas.penalty().detach(), rtol=1e-5, atol=1e-7)
        _assert_dicts_close(ranks[r]["fsdp_grads"], want, rtol=1e-5, atol=1e-6)
        _assert_dicts_close(ranks[r]["fsdp_fused_grads"], want, rtol=1e-5, atol=1e-6)


def test_fsdp_memory_report(ranks):
    total = sum(p.numel() for p in _model("mlp").parameters())
    reports = [ranks[r]["fsdp_report"] for r in range(WORLD)]
    assert sum(rep["local_numel"] for rep in reports) == total
    assert sum(rep["omega"] for rep in reports) == 4 * total  # fp32 Ω, sharded
    assert sum(rep["anchor"] for rep in reports) == 4 * total  # fp32 θ*, sharded
    assert sum(rep["estimation"] for rep in reports) == 4 * total  # the pass's fp32 sums are sharded too


def test_fsdp_pass_keeps_only_shards_and_resumes(ranks):
    model = _model("mlp")
    for r in range(WORLD):
        name, shapes = ranks[r]["fsdp_estimator"]
        assert name == "ShardedEstimator"
        assert sum(torch.Size(s).numel() for s in shapes.values()) < sum(p.numel() for p in model.parameters())
        assert ranks[r]["fsdp_ckpt_file"] and ranks[r]["fsdp_resumed_equal"]


def test_fsdp_state_dicts(ranks):
    for r in range(WORLD):
        assert ranks[r]["fsdp_sd_sharded"]
        _assert_dicts_close(ranks[r]["fsdp_sd_from_full"], ranks[r]["fsdp_sd_full_ref"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["local", "global"])
def test_fsdp_bf16_llama_importance_and_memory(ranks, mode):
    pytest.importorskip("transformers")
    want = ml.compute_importance(_llama(), _token_batches(), mode=mode, progress=False)
    for r in range(WORLD):
        _assert_dicts_close(ranks[r]["llama_omega", mode], want)
        rep = ranks[r]["llama_report", mode]  # bytes per parameter of the whole model, on this rank
        assert rep["persistent"] == pytest.approx(6.0 / WORLD, rel=0.02)  # (fp32 Ω 4 + bf16 θ* 2) / W
        assert rep["estimation"] == pytest.approx(4.0 / WORLD, rel=0.02)  # fp32 sums / W


@pytest.mark.parametrize("mode,est", TIED_CASES)
def test_fsdp_probe_follows_a_tied_head_read_outside_its_module(ranks, mode, est):
    """FSDP2 gets the same usage probe as an unsharded model: a head written F.linear(h, emb.weight) in the root
    is computed where it is read, and Ω equals the single process's (planning by registration was wrong), and
    an FSDP2 unit keeps its layer's rule (FSDP2's own forward hooks are not a user's)."""
    want = ml.compute_importance(_tied(), _tied_batches(), mode, est, progress=False)
    for r in range(WORLD):
        _assert_dicts_close(ranks[r]["tied_omega", mode, est], want)
