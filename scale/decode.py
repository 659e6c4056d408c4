"""
Generation on a preallocated cache: the GPU form of model.Decoder.generate, chosen once at setup
(use_static_cache; tools/generate.py on CUDA). Decoder.generate stays the readable reference, and
tests/test_decode.py proves this equal to it on the CPU (tokens, and every step's logits).

What the reference does per new token, and what this does instead:
- it concatenates every layer's cache with the new K/V (a copy of the whole cache per token): here
  each layer's cache is allocated once, (B, n_kv_heads, context + max_new_tokens, head_dim), in the
  compute dtype (the prefill's K/V dtype: bf16 under autocast), and a step writes one column;
- with a mask, grouped-query heads need K/V repeated to the query heads on CUDA's fused kernels
  (scale/cuda.py): here the query heads of a group are folded into the query rows, (B, n_kv, group,
  head_dim) against (B, n_kv, T, head_dim), so no kernel needs K/V repeated;
- its attention grows one column per step (a new shape each token: a new cuDNN graph or compiled
  graph): here every step attends over the whole buffer, the unwritten columns masked out, so a
  generation has one shape.
A generation that could run past max_positions is refused before its first new token (the
reference stops at the step that would). The decoding loop (sampling, eos, streaming) is model.generate_tokens.
"""
import types
from functools import partial

import torch
import torch.nn.functional as F

from model import Decoder, apply_rope, generate_tokens, rope_cos_sin


class StaticCache:
    """Every layer's K/V in one preallocated buffer each, filled from a prefill's cache."""

    def __init__(self, kv, attention_mask, max_new_tokens):
        B, n_kv, T0, hd = kv[0][0].shape          # (B, n_kv_heads, context, head_dim)
        size = (B, n_kv, T0 + max_new_tokens, hd)
        self.k = [k.new_zeros(size) for k, _ in kv]
        self.v = [v.new_zeros(size) for _, v in kv]
        for k_buf, v_buf, (k, v) in zip(self.k, self.v, kv):
            k_buf[:, :, :T0], v_buf[:, :, :T0] = k, v
        self.visible = torch.zeros(B, size[2], dtype=torch.bool, device=attention_mask.device)
        self.visible[:, :T0] = attention_mask.bool()                  # pads stay invisible
        self.column = T0                                              # the next column to write
        self.position = attention_mask.long().sum(1)                  # the next RoPE position (B,)

    def step(self, decoder, tok):
        """Logits (B, V) of tok (B,) appended to the cache (Block.forward, one column)."""
        x = decoder.embed(tok[:, None])                                            # (B, 1, D)
        cos, sin = rope_cos_sin(self.position[:, None], decoder.head_dim, decoder.cfg.rope_theta,
                                x.dtype)                                           # (B, 1, 1, hd)
        self.visible[:, self.column] = True
        mask = self.visible[:, None, None, :]                                      # (B, 1, 1, T)
        for layer, k_buf, v_buf in zip(decoder.layers, self.k, self.v):
            a = layer.attn
            h = layer.attn_norm(x)
            B, group = h.shape[0], a.n_heads // a.n_kv_heads
            q = a.q_proj(h).view(B, a.n_kv_heads, group, a.head_dim)   # a group's heads as rows
            k = a.k_proj(h).view(B, a.n_kv_heads, 1, a.head_dim)
            v = a.v_proj(h).view(B, a.n_kv_heads, 1, a.head_dim)
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            q, k = apply_rope(q, c, s), apply_rope(k, c, s)
            k_buf[:, :, self.column] = k[:, :, 0]
            v_buf[:, :, self.column] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask)  # (B,n_kv,group,hd)
            x = x + a.o_proj(y.reshape(B, 1, -1))                     # heads in the query's order
            x = x + layer.mlp(layer.mlp_norm(x))
        self.column += 1
        self.position = self.position + 1
        return decoder.lm_head(decoder.norm(x))[:, -1]


@torch.no_grad()
def static_generate(decoder, input_ids=None, attention_mask=None, max_new_tokens=20,
                    inputs_embeds=None, past_kv=None, **pick):
    """Decoder.generate (the same arguments, the same tokens) on a StaticCache."""
    logits, kv, attention_mask = decoder.prefill(input_ids, inputs_embeds, attention_mask, past_kv)
    longest = int(attention_mask.sum(1).max()) + max_new_tokens - 1    # positions 0 .. longest-1
    if longest > decoder.cfg.max_positions:
        raise ValueError(f"generating {max_new_tokens} tokens after a context of up to "
                         f"{longest - max_new_tokens + 1} positions needs {longest} positions; "
                         f"the model has max_positions {decoder.cfg.max_positions}")
    cache = StaticCache(kv, attention_mask, max_new_tokens)
    return generate_tokens(logits, partial(cache.step, decoder), max_new_tokens, **pick)


def use_static_cache(model):
    """model's decoder (a Decoder, or a VLM's .decoder) generates with static_generate from now on
    (VLM.generate calls decoder.generate); returns the model. Called once at setup."""
    decoder = model if isinstance(model, Decoder) else model.decoder
    decoder.generate = types.MethodType(static_generate, decoder)
    return model
