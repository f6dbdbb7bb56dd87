"""Tiny Hugging Face models (random init, nothing downloaded) for the model-zoo tests."""

from __future__ import annotations

import torch

VOCAB = 61


def _cfg(name):
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if name == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, **common), tf.GPT2LMHeadModel
    if name == "bert":
        cfg = tf.BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            **common,
        )
        return cfg, tf.BertForSequenceClassification
    if name == "distilbert":
        cfg = tf.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=32, **common)
        return cfg, tf.DistilBertForSequenceClassification
    if name == "opt":
        cfg = tf.OPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=24,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
            **common,
        )
        return cfg, tf.OPTForCausalLM
    if name == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            **common,
        )
        return cfg, tf.GPTNeoXForCausalLM
    if name == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=24,
            max_position_embeddings=32,
            **common,
        )
        return cfg, tf.LlamaForCausalLM
    if name == "qwen2":
        cfg = tf.Qwen2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=24,
            max_position_embeddings=32,
            **common,
        )
        return cfg, tf.Qwen2ForCausalLM
    if name == "mixtral":
        cfg = tf.MixtralConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=24,
            max_position_embeddings=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            **common,
        )
        return cfg, tf.MixtralForCausalLM
    if name == "t5":
        cfg = tf.T5Config(
            d_model=16,
            d_kv=8,
            d_ff=24,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            **common,
        )
        return cfg, tf.T5ForConditionalGeneration
    if name == "vit":
        cfg = tf.ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            image_size=8,
            patch_size=4,
            num_channels=3,
            num_labels=3,
        )
        return cfg, tf.ViTForImageClassification
    raise KeyError(name)


MODELS = ["gpt2", "bert", "distilbert", "opt", "gpt_neox", "llama", "qwen2", "mixtral", "t5", "vit"]
CAUSAL = {"gpt2", "opt", "gpt_neox", "llama", "qwen2", "mixtral"}


def build(name, seed=0, dtype=torch.float64):
    cfg, cls = _cfg(name)
    cfg._attn_implementation = "eager"
    if name == "mixtral":
        cfg._experts_implementation = "eager"  # the per-expert loop (the grouped kernel has no float64)
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def lengths_batch(name, lengths, seed=1, pad_to=None):
    """A right-padded dict batch for samples of the given lengths, and the unpadded samples one by one."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        x = torch.randn(len(lengths), 3, 8, 8, generator=g, dtype=torch.float64)
        return {"pixel_values": x}, [{"pixel_values": x[k : k + 1]} for k in range(len(lengths))]
    width = pad_to or max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for k, n in enumerate(lengths):
        mask[k, :n] = 1
    ids = ids * mask  # pad token 0 after each sample's end
    batch = {"input_ids": ids, "attention_mask": mask}
    singles = [{"input_ids": ids[k : k + 1, :n], "attention_mask": mask[k : k + 1, :n]} for k, n in enumerate(lengths)]
    if name == "t5":
        dec = torch.randint(1, VOCAB, (len(lengths), 3), generator=g)
        batch["decoder_input_ids"] = dec
        for k, s in enumerate(singles):
            s["decoder_input_ids"] = dec[k : k + 1]
    return batch, singles
