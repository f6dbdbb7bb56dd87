"""Measure what MAS adds per parameter on a small bf16 Llama (random weights) and scale it to 7B.

    .venv/bin/python examples/memory_report.py

Prints ``MAS.memory_report()`` after a local (Hebbian) consolidation for each
``omega_dtype`` and the bytes per parameter this implies for a 7B bf16 model,
unsharded and sharded over W ranks (FSDP2: Ω, θ* and the pass's sums are sharded like
the weights; measured on 2 ranks in tests/test_distributed.py, scaled here as 1/W).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mas_local as ml


def tiny_llama() -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def main() -> None:
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 256, (4, 16), generator=g)} for _ in range(2)]
    seven_b = 7e9
    for omega_dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama()
        mas = ml.MAS(model, mode="local", omega_dtype=omega_dtype, progress=False)
        mas.consolidate(data)
        rep = mas.memory_report()
        held = sum(v.numel() * v.element_size() for v in mas.importance.values()) + sum(
            v.numel() * v.element_size() for v in mas.anchors.values()
        )
        per = rep["bytes_per_param"]
        print(f"\n=== omega_dtype={omega_dtype}, parameters bf16, {rep['total']['numel']} parameters")
        print("\n".join(str(rep).splitlines()[-3:]))
        print(f"measured bytes held by MAS: {held} = {held / rep['total']['numel']:.3f} B/param")
        for w, how in ((1, "one device or DDP"), (8, "FSDP2 over 8 ranks")):
            kept = per["persistent"] * seven_b / w
            sums = per["estimation"] * seven_b / w
            print(
                f"7B bf16 model, {how}: {per['persistent'] / w:.3f} B/param kept = {kept / 2**30:.1f} GiB per rank; "
                f"+ {sums / 2**30:.1f} GiB fp32 sums while consolidating"
            )


if __name__ == "__main__":
    main()
