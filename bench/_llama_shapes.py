"""Parameter names and shapes of a LLaMA-architecture model, for the benchmarks (no weights, no download).

``llama_shapes()`` with no arguments gives the 1.1B configuration used by the benchmarks (TinyLlama's
shape: hidden 2048, intermediate 5632, 22 layers, 32 heads with 4 KV heads so k_proj and v_proj are
[256, 2048], vocab 32000, untied embedding and lm_head): 201 tensors, 1,100,048,384 elements.
Names follow transformers' LlamaForCausalLM, so stream ids match a real model's.
"""
from __future__ import annotations

from typing import List, Tuple

LLAMA_1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000,
                tie_embeddings=False)
# A tiny configuration with the same structure, for smoke runs on CPU.
LLAMA_TINY = dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=256,
                  tie_embeddings=False)


def llama_shapes(hidden: int = 2048, intermediate: int = 5632, layers: int = 22, heads: int = 32,
                 kv_heads: int = 4, vocab: int = 32000,
                 tie_embeddings: bool = False) -> List[Tuple[str, Tuple[int, ...]]]:
    """[(name, shape)] of a LlamaForCausalLM's parameters, in module order."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    kv = hidden // heads * kv_heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tie_embeddings:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def numel_of(shapes) -> int:
    total = 0
    for _, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def make_params(shapes, dtype, device, seed: int = 0):
    """Random-valued tensors (normal * 0.02) for [(name, shape)], as a list of (name, tensor)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed) if torch.device(device).type == "cuda" \
        else torch.Generator().manual_seed(seed)
    out = []
    for name, shape in shapes:
        t = torch.empty(shape, dtype=dtype, device=device)
        t.normal_(0.0, 0.02, generator=g)
        out.append((name, t))
    return out


if __name__ == "__main__":
    s = llama_shapes()
    print(f"{len(s)} tensors, {numel_of(s):,} elements")
