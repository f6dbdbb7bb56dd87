"""Every Hugging Face model family of the installed ``transformers``, built tiny (random init, nothing
downloaded), with right-padded inputs and the sweep's checks against brute-force oracles.

Used by ``bench/hf_sweep.py`` (the whole sweep, ``docs/models.md``) and ``tests/test_hf_sweep.py`` (a few
families). One function per step: :func:`discover` (model_type → head class), :func:`tiny_config`,
:func:`build`, :func:`make_data` and :func:`check_family` (the four estimator checks).

Set-up, the same for every family:

- text: two batches, right-padded to the longest sample, samples of 5, 3, 4 then 4, 2 tokens; pad token
  ``config.pad_token_id`` (0 when it has none or it is out of the vocabulary); ``attention_mask`` marks the
  real tokens. Encoder-decoder models pad the *encoder* only: ``decoder_input_ids`` are 3 real tokens for
  every sample (so the decoder's positions never have the mask's length, and nothing of the decoder is
  masked). A model whose forward takes no ``attention_mask`` gets samples of equal length (nothing padded).
- vision (``pixel_values``) and audio (``input_values`` / ``input_features``): float inputs, batches of 3 and
  2 samples, no mask; the "padding invariance" checks are then batch invariance (a batch equals its samples
  one by one).
- float64 (``model.double()``), ``eval()``, eager attention, eager MoE experts.
"""

from __future__ import annotations

import inspect
import math
import traceback

import torch

LENGTHS = ([5, 3, 4], [4, 2])
VOCAB = 128
H = 16  # hidden size
FFN = 24
LAYERS = 2
HEADS = 2
RTOL, ATOL_REL = 1e-5, 1e-6
ESTIMATORS = ("global_sample", "global_batch", "local_hebbian", "local_sample")

# head mappings in order of preference: the first mapping that names a model_type gives its head class
HEAD_MAPPINGS = [
    ("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("masked_lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("seq2seq_lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("seq_cls", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("image_cls", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("audio_cls", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    ("ctc", "MODEL_FOR_CTC_MAPPING_NAMES"),
    ("speech_seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
]

# parameters that local MAS judges over the padded grid by definition (docs/math.md, "Masks"): one output
# shared by the batch and laid out [T, T, heads]; left out of the local padding-invariance comparison
GRID_PARAMS = ("relative_attention_bias",)


def discover() -> dict[str, tuple[str, str]]:
    """{model_type: (head kind, head class name)}, one representative head per model_type."""
    from transformers.models.auto import modeling_auto as ma

    found = {}
    for kind, mapping in HEAD_MAPPINGS:
        for model_type, cls in getattr(ma, mapping, {}).items():
            if model_type in found:
                continue
            if isinstance(cls, (tuple, list)):
                cls = cls[0]
            found[model_type] = (kind, cls)
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------- config

_HIDDEN = (
    "hidden_size",
    "d_model",
    "n_embd",
    "word_embed_proj_dim",
    "output_hidden_size",
    "embedding_size",
    "emb_dim",
    "entity_emb_size",
)
_FFN = ("intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_inner")
_MOE_FFN = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size")
_LAYERS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
)
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads")
_KV = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
_HEAD_DIM = ("head_dim", "d_kv", "kv_channels", "qk_nope_head_dim", "v_head_dim", "attention_head_size")
_POS = ("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions")
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK = ("num_experts_per_tok", "moe_topk", "num_selected_experts", "top_k")
_FIXED = {
    "vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    "entity_vocab_size": 16,
    "image_size": 32,
    "patch_size": 4,
    "window_size": 2,
    "num_labels": 3,
    "n_shared_experts": 1,
    "n_group": 1,
    "n_groups": 1,  # Mamba-2: groups must divide the (shrunk) heads
    "topk_group": 1,
    "q_lora_rank": 8,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "num_mel_bins": 8,
    "max_source_positions": 16,
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 2,
    "classifier_proj_size": 16,
    "codevector_dim": 16,
    "proj_codevector_dim": 16,
    "xvector_output_dim": 16,
    "state_size": 4,
    "time_step_rank": 4,
    "first_k_dense_replace": 1,
    "relative_attention_num_buckets": 8,
    "num_buckets": 8,
    "sliding_window": 4096,
    # Falcon-H1's Mamba-2 mixer: heads × head dim = d_ssm = 2 × hidden; its scan pads the sequence to
    # a whole chunk, so the default 256-token chunk makes a 5-token batch 50× slower than it needs
    "mamba_n_heads": 4,
    "mamba_d_head": 8,
    "mamba_d_ssm": 32,
    "mamba_d_state": 8,
    "mamba_chunk_size": 8,
}
_STAGE_LISTS = {  # values for per-stage lists (their length follows `depths`)
    "depths": lambda i: 2 if i == 0 else 1,
    "hidden_sizes": lambda i: H * 2**i,
    "embed_dims": lambda i: H * 2**i,
    "embed_dim": lambda i: H * 2**i,
    "dims": lambda i: H * 2**i,
    "num_heads": lambda i: HEADS,
    "num_attention_heads": lambda i: HEADS,
    "heads": lambda i: HEADS,
}


def _shrink(d: dict) -> dict:
    """Keyword arguments that make this config (as ``to_dict()``) tiny; nested configs shrink recursively."""
    kw = {}
    depths = d.get("depths")
    n_stages = min(len(depths), 2) if isinstance(depths, list) and depths else None
    for key, value in d.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, dict) and "model_type" in value:
            kw[key] = {"model_type": value["model_type"], **_shrink(value)}
            continue
        if n_stages is not None and isinstance(value, list) and len(value) == len(depths):
            new = value[:n_stages]
            if key in _STAGE_LISTS and all(isinstance(v, int) for v in new):
                new = [_STAGE_LISTS[key](i) for i in range(n_stages)]
            kw[key] = new
            continue
        if n_stages is not None and key in ("num_layers", "num_stages") and isinstance(value, int):
            kw[key] = n_stages
            continue
        if key == "conv_dim" and isinstance(value, list):
            kw[key] = [H] * len(value)
            continue
        if key == "tdnn_dim" and isinstance(value, list):
            kw[key] = [H] * len(value)
            continue
        if key in ("image_size", "patch_size") and isinstance(value, (list, tuple)) and len(value) == 2:
            kw[key] = [_FIXED[key]] * 2
            continue
        if not isinstance(value, int):
            continue
        if key in _HIDDEN or key in ("dim", "embed_dim"):
            kw[key] = H
        elif key in _FFN or key == "hidden_dim":
            kw[key] = FFN
        elif key in _MOE_FFN:
            kw[key] = H
        elif key in _LAYERS:
            kw[key] = LAYERS
        elif key in _HEADS:
            kw[key] = HEADS
        elif key in _KV:
            kw[key] = 1
        elif key in _HEAD_DIM:
            kw[key] = 8
        elif key in _POS:
            kw[key] = 64
        elif key in _EXPERTS:
            kw[key] = 4
        elif key in _TOPK:
            kw[key] = 2
        elif key in _FIXED:
            kw[key] = _FIXED[key]
    if n_stages is not None and isinstance(d.get("num_encoder_blocks"), int):
        kw["num_encoder_blocks"] = n_stages
    for types_key in ("layer_types", "layers_block_type"):  # the latter: Zamba2
        types = d.get(types_key)
        if not (isinstance(types, list) and types and all(isinstance(t, str) for t in types)):
            continue
        # one layer of each kind (sliding/full attention, mamba/attention, ...), at least LAYERS layers
        firsts = sorted({t: i for i, t in reversed(list(enumerate(types)))}.values())
        picked = [types[i] for i in firsts]
        picked += [picked[0]] * (LAYERS - len(picked))
        kw[types_key] = picked
        for key in _LAYERS:
            if key in kw:
                kw[key] = len(picked)
        if isinstance(d.get("hybrid_layer_ids"), list):
            kw["hybrid_layer_ids"] = [i for i, t in enumerate(picked) if t == "hybrid"]
    if isinstance(d.get("attention_types"), list):  # GPT-Neo: [[["global", "local"], 12]]
        kw["attention_types"] = [[d["attention_types"][0][0], 1]]
    if isinstance(d.get("qk_rope_head_dim"), int) and "head_dim" in d:  # MLA: rotary dims are head_dim
        kw["head_dim"] = kw["qk_rope_head_dim"]
    if all(isinstance(d.get(k), int) for k in ("expand", "num_heads", "head_dim")) and "state_size" in d:
        kw["num_heads"] = H * d["expand"] // kw["head_dim"]  # Mamba-2: heads × head_dim = expand × hidden
    if "id2label" in d and "num_labels" not in kw:
        kw["num_labels"] = 3
    kw.pop("id2label", None)
    kw.pop("label2id", None)
    vocab = kw.get("vocab_size", d.get("vocab_size"))
    if isinstance(vocab, int):
        for key, value in d.items():
            if (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int):
                if value >= vocab:
                    kw[key] = vocab - 1 - (hash(key) % 8)
    return kw


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    cfg = cls(**_shrink(default.to_dict()))
    return cfg


def _special_ids(cfg) -> set[int]:
    ids = set()
    todo = [cfg]
    while todo:
        c = todo.pop()
        for key, value in vars(c).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                todo.append(value)
            elif (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int):
                ids.add(value)
            elif key.endswith("_token_id") and isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return ids


def _set_eager(cfg):
    for attr, value in (("_attn_implementation", "eager"), ("_experts_implementation", "eager")):
        try:
            setattr(cfg, attr, value)
        except Exception:
            pass
    for sub in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
        c = getattr(cfg, sub, None)
        if c is not None and hasattr(c, "to_dict"):
            _set_eager(c)


def build(model_type: str, head: str, seed: int = 0, dtype=torch.float64):
    """The tiny model (eval, ``dtype``) and its config."""
    import transformers

    cfg = tiny_config(model_type)
    _set_eager(cfg)
    cls = getattr(transformers, head)
    torch.manual_seed(seed)
    model = cls(cfg)
    model = model.to(dtype).eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


# ---------------------------------------------------------------------------------------------- inputs


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def out_tensor(y):
    """The model output the library judges: ``.logits`` if present, else the first tensor."""
    if torch.is_tensor(y):
        return y
    logits = getattr(y, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if hasattr(y, "to_tuple"):
        y = y.to_tuple()
    if isinstance(y, (tuple, list)):
        for t in y:
            if torch.is_tensor(t):
                return t
    raise TypeError(f"no tensor in the output ({type(y).__name__})")


def run(model, batch):
    return out_tensor(model(**batch))


def _find(cfg, *names):
    todo = [cfg]
    for sub in ("vision_config", "audio_config", "encoder_config", "text_config"):
        if getattr(cfg, sub, None) is not None:
            todo.append(getattr(cfg, sub))
    for c in todo:
        for n in names:
            v = getattr(c, n, None)
            if v is not None and not isinstance(v, bool):
                return v
    return None


def _float_candidates(model, name):
    cfg = model.config
    if name == "pixel_values":
        size = _find(cfg, "image_size") or 32
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        ch = _find(cfg, "num_channels") or 3
        return [lambda b, g: torch.randn(b, ch, *size, generator=g, dtype=torch.float64)]
    if name == "input_values":
        mel = _find(cfg, "num_mel_bins", "feature_size") or 8
        return [
            lambda b, g: torch.randn(b, 1600, generator=g, dtype=torch.float64),
            lambda b, g: torch.randn(b, 64, mel, generator=g, dtype=torch.float64),
            lambda b, g: torch.randn(b, 1024, mel, generator=g, dtype=torch.float64),
        ]
    if name == "input_features":
        mel = _find(cfg, "num_mel_bins", "feature_size", "input_feat_per_channel") or 8
        src = _find(cfg, "max_source_positions") or 16
        ch = _find(cfg, "input_channels") or 1
        return [
            lambda b, g: torch.randn(b, mel, 2 * src, generator=g, dtype=torch.float64),
            lambda b, g: torch.randn(b, 32, mel * ch, generator=g, dtype=torch.float64),
            lambda b, g: torch.randn(b, 32, 80, generator=g, dtype=torch.float64),
        ]
    return []


def make_data(model, seed: int = 1):
    """(batches, singles, notes): the padded batches, the unpadded samples of each batch (lists of
    dict batches of one sample) and what the set-up had to do for this model."""
    cfg = model.config
    params = _forward_params(model)
    name = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(seed)
    notes = []
    if name != "input_ids":
        errors = []
        for make in _float_candidates(model, name):
            trial = {name: make(2, torch.Generator().manual_seed(0))}
            if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
                trial["decoder_input_ids"] = torch.full((2, 3), 3)
            try:
                with torch.no_grad():
                    run(model, trial)
            except Exception as e:
                errors.append(f"{tuple(trial[name].shape)}: {_first_line(e)}")
                continue
            batches, singles = [], []
            seq2seq = bool(getattr(cfg, "is_encoder_decoder", False)) and "decoder_input_ids" in params
            for lengths in LENGTHS:
                x = make(len(lengths), g)
                batches.append({name: x})
                singles.append([{name: x[k : k + 1]} for k in range(len(lengths))])
                if seq2seq:
                    top = min(_find(cfg, "vocab_size") or VOCAB, VOCAB)
                    dec = torch.randint(3, top, (len(lengths), 3), generator=g)
                    batches[-1]["decoder_input_ids"] = dec
                    for k, one in enumerate(singles[-1]):
                        one["decoder_input_ids"] = dec[k : k + 1]
            notes.append(f"{name} {tuple(batches[0][name].shape[1:])}, no mask")
            return batches, singles, notes
        raise ValueError(f"no input layout for {name} ran a forward ({'; '.join(errors)[:250]})")
    vocab = _find(cfg, "vocab_size") or VOCAB
    special = _special_ids(cfg)
    allowed = torch.tensor([i for i in range(3, min(vocab, VOCAB)) if i not in special])
    pad = cfg.pad_token_id if isinstance(getattr(cfg, "pad_token_id", None), int) else 0
    pad = pad if 0 <= pad < vocab else 0
    masked = "attention_mask" in params
    seq2seq = bool(getattr(cfg, "is_encoder_decoder", False)) and "decoder_input_ids" in params
    if not masked:
        notes.append("forward takes no attention_mask: equal lengths, nothing padded")
    batches, singles = [], []
    for lengths in LENGTHS:
        if not masked:
            lengths = [max(lengths)] * len(lengths)
        width = max(lengths)
        ids = allowed[torch.randint(len(allowed), (len(lengths), width), generator=g)]
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for k, n in enumerate(lengths):
            mask[k, :n] = 1
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
        batch = {"input_ids": ids}
        if masked:
            batch["attention_mask"] = mask
        one = [{"input_ids": ids[k : k + 1, :n]} for k, n in enumerate(lengths)]
        if masked:
            for k, n in enumerate(lengths):
                one[k]["attention_mask"] = mask[k : k + 1, :n]
        if seq2seq:
            dec = allowed[torch.randint(len(allowed), (len(lengths), 3), generator=g)]
            batch["decoder_input_ids"] = dec
            for k, s in enumerate(one):
                s["decoder_input_ids"] = dec[k : k + 1]
        batches.append(batch)
        singles.append(one)
    if seq2seq:
        notes.append("encoder padded+masked, decoder_input_ids 3 real tokens")
    return batches, singles, notes


# ---------------------------------------------------------------------------------------------- oracles


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_sample_grads(model, singles):
    """[[{name: ∂‖f(x_k)‖²/∂θ} for k in batch] for batch]: each unpadded sample alone."""
    named = _trainable(model)
    out = []
    for batch in singles:
        grads_b = []
        for x in batch:
            y = run(model, x)
            gs = torch.autograd.grad(y.double().pow(2).sum(), [p for _, p in named], allow_unused=True)
            grads_b.append(
                {
                    n: (torch.zeros_like(p, dtype=torch.float64) if g is None else g.double())
                    for (n, p), g in zip(named, gs)
                }
            )
        out.append(grads_b)
    return out


def oracle_global_sample(grads):
    """Ω = (1/N) Σ_k |g_k|."""
    flat = [g for b in grads for g in b]
    return {n: sum(g[n].abs() for g in flat) / len(flat) for n in flat[0]}


def oracle_global_batch(grads):
    """The official formula Ω = (1/#B) Σ_B |Σ_{k∈B} g_k| / b_B (gradients of a sum add up)."""
    names = grads[0][0].keys()
    return {n: sum(sum(g[n] for g in b).abs() / len(b) for b in grads) / len(grads) for n in names}


def invariance(model, batches, singles) -> float:
    """How much the model's own output on the real positions changes with padding and batching: the largest
    |f(padded batch)[k, :n_k] − f(x_k alone)| relative to max |f(x_k)| (0 for a padding-invariant model)."""
    worst = 0.0
    with torch.no_grad():
        for batch, ones in zip(batches, singles):
            out = run(model, batch)
            for k, one in enumerate(ones):
                y = run(model, one)[0]
                o = out[k]
                if o.shape != y.shape and o.dim() >= 1 and o.shape[1:] == y.shape[1:] and o.shape[0] > y.shape[0]:
                    o = o[: y.shape[0]]  # right padding: the real positions come first
                if o.shape != y.shape:
                    return math.nan
                scale = y.abs().max().item() or 1.0
                worst = max(worst, (o.double() - y.double()).abs().max().item() / scale)
    return worst


def gradient_drift(model, batches, grads) -> float:
    """The same for gradients: ∂(Σ over real positions of ‖f(padded batch)‖²) against Σ_k ∂‖f(x_k)‖²/∂θ of
    the samples alone, as (largest excess over the tolerance) — above 1 the model's own gradients change with
    padding/batching beyond rounding (float32 computed inside a float64 model, ties, ...)."""
    named = _trainable(model)
    scale = max(max(g[n].abs().max().item() for g in b for n in g) for b in grads) or 1.0
    worst = 0.0
    for batch, ones in zip(batches, grads):
        y = run(model, batch).double()
        mask = batch.get("attention_mask")
        if mask is not None and y.dim() >= 2 and y.shape[1] == mask.shape[1]:
            y = y * mask.reshape(*mask.shape, *([1] * (y.dim() - 2))).to(y.dtype)
        gs = torch.autograd.grad(y.pow(2).sum(), [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, gs):
            want = sum(one[n] for one in ones)
            g = torch.zeros_like(want) if g is None else g.double()
            excess = ((g - want).abs() / (ATOL_REL * scale + RTOL * want.abs())).max().item()
            worst = max(worst, excess)
    return worst


# ---------------------------------------------------------------------------------------------- checks


def compare(got: dict, want: dict, scale: float | None = None):
    """(ok, error, worst parameter): model-wide tolerance rtol 1e-5, atol 1e-6 × ``scale`` (default max |Ω|;
    global batch passes the scale of the per-sample gradients it sums, since |Σ_k g_k| carries a rounding
    error relative to Σ_k |g_k|, not to the cancelled sum). When it holds, the
    error is max |got − want| / max |want| over the model; when not, the largest max |got − want| relative to
    the parameter's own max |want| over the parameters that fail, and the worst of them."""
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        return False, math.inf, f"keys differ: missing {missing[:3]} extra {extra[:3]}"
    if scale is None:
        scale = max((w.abs().max().item() for w in want.values() if w.numel()), default=0.0)
    ok, worst, worst_name, model_wide = True, 0.0, None, 0.0
    for n, w in want.items():
        g = got[n].double()
        w = w.double()
        if g.shape != w.shape:
            return False, math.inf, f"{n}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if not torch.isfinite(g).all():
            return False, math.inf, f"{n}: not finite"
        diff = (g - w).abs()
        if not diff.numel():
            continue
        model_wide = max(model_wide, diff.max().item() / (scale or 1.0))
        if (diff > ATOL_REL * scale + RTOL * w.abs()).any():
            ok = False
            err = diff.max().item() / (w.abs().max().item() or scale or 1.0)
            if err > worst:
                worst, worst_name = err, n
    return ok, (model_wide if ok else worst), worst_name


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _lib(model, data, **kw):
    import mas_local as ml

    return ml.compute_importance(model, data, progress=False, **kw)


def _check(fn):
    from mas_local.errors import ImportanceError

    try:
        ok, err, worst = fn()
    except ImportanceError as e:
        return {"status": "refused", "detail": str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}
    except TimeoutError:
        raise
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = next(
            (f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(tb) if "mas_local" in f.filename), None
        )
        return {"status": "crash", "detail": _first_line(e), "where": where}
    if ok:
        return {"status": "exact", "error": err}
    return {"status": "wrong", "error": err, "detail": worst}


def check_family(model_type: str, head: str, estimators=ESTIMATORS) -> dict:
    """Build, make inputs, run the checks; a dict that says what happened (never raises, except timeouts)."""
    res = {"family": model_type, "head": head, "checks": {}, "notes": []}
    try:
        model = build(model_type, head)
    except TimeoutError:
        raise
    except Exception as e:
        res["status"] = f"not built: {_first_line(e)}"
        return res
    res["dtype"] = "float64"
    try:
        batches, singles, notes = make_data(model)
        res["notes"] += notes
        with torch.no_grad():
            for b in batches:
                run(model, b)
        grads = per_sample_grads(model, singles)
    except TimeoutError:
        raise
    except Exception as e:
        res["status"] = f"not built: forward: {_first_line(e)}"
        return res
    res["status"] = "built"
    res["params"] = sum(p.numel() for _, p in _trainable(model))
    try:
        drift = invariance(model, batches, singles)
    except TimeoutError:
        raise
    except Exception as e:
        drift = math.nan
        res["notes"].append(f"invariance not measured: {_first_line(e)}")
    res["invariance"] = drift
    variant = drift > 1e-9
    if variant:
        res["notes"].append(f"the model's output on real positions changes with padding/batching ({drift:.1e})")
    else:
        try:
            excess = gradient_drift(model, batches, grads)
        except TimeoutError:
            raise
        except Exception as e:
            excess = math.nan
            res["notes"].append(f"gradient invariance not measured: {_first_line(e)}")
        res["gradient_excess"] = excess
        if excess > 1:
            variant = True
            res["notes"].append(f"the model's own gradients change with padding/batching ({excess:.1f}× the tolerance)")
    trainable = {n for n, _ in _trainable(model)}
    flat_singles = [[s] for b in singles for s in b]

    def g_sample():
        # every batch twice (the same mean): the second of each signature skips the self-check and streams
        # through the backward (mas_local/importance/backward_stream.py), so that path is checked too
        twice = batches + batches
        return compare(_lib(model, twice, mode="global", estimator="sample"), oracle_global_sample(grads))

    def g_batch():
        summed = max((w.abs().max().item() for w in oracle_global_sample(grads).values() if w.numel()), default=0.0)
        return compare(_lib(model, batches, mode="global", estimator="batch"), oracle_global_batch(grads), summed)

    def local(estimator):
        def fn():
            padded = _lib(model, batches, mode="local", estimator=estimator)
            bad = sorted(n for n in trainable if n not in padded or not torch.isfinite(padded[n]).all())
            if bad:
                return False, math.inf, f"no finite Ω for {bad[:3]} ({len(bad)} parameters)"
            one_by_one = _lib(model, flat_singles, mode="local", estimator=estimator)
            grid = [k for k in padded if any(s in k for s in GRID_PARAMS)]
            for k in grid:
                padded.pop(k), one_by_one.pop(k, None)
            if grid and "grid" not in " ".join(res["notes"]):
                res["notes"].append(f"local: {len(grid)} relative-position-bias parameters judged over the grid")
            return compare(padded, {k: v.double() for k, v in one_by_one.items()})

        return fn

    fns = {
        "global_sample": g_sample,
        "global_batch": g_batch,
        "local_hebbian": local("hebbian"),
        "local_sample": local("sample"),
    }
    for est in estimators:
        check = _check(fns[est])
        if check["status"] == "wrong" and variant:
            # the oracles assume f(x_k) is the same alone and in a padded batch; this model breaks that
            check = {
                "status": "n/a",
                "detail": "the model itself is not padding/batch invariant",
                "error": check["error"],
                "worst": check.get("detail"),
            }
        res["checks"][est] = check
    return res
