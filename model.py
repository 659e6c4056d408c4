"""
The models of LinguDistill, from scratch and in reading order:

1. A Llama / SmolLM2-style decoder LM (RMSNorm, RoPE, grouped-query attention, SwiGLU).
   Its forward pass can take and return per-layer (K, V) tensors: that is the interface
   kvshare.py uses to hand the student's context KV to the frozen teacher.
2. A ViT / SigLIP vision tower and a pixel-shuffle + linear projector (as nanoVLM).
3. The VLM: image placeholder tokens in the prompt are replaced by projected image
   features, then the decoder runs.

Attention runs reference_attention (SDPA). On a GPU, train.py swaps in scale/cuda.py's forms
once at setup (scale.cuda.use_cuda_attention; tests/test_gpu_paths.py proves them equal). Weight
loading/saving for Hugging Face, nanoVLM and SmolVLM layouts lives in scale/weights.py.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------
# Configs

@dataclass
class LMConfig:
    vocab_size: int = 1024
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2          # grouped-query attention when < n_heads
    ffn_dim: int = 384
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_positions: int = 1024
    tie_embeddings: bool = True
    qkv_bias: bool = False       # True for Qwen2

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"LMConfig: dim ({self.dim}) must divide by n_heads ({self.n_heads}) "
                             f"and n_heads by n_kv_heads ({self.n_kv_heads})")


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 4
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_dim: int = 256
    ln_eps: float = 1e-6

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self):
        if self.image_size % self.patch_size or self.dim % self.n_heads:
            raise ValueError(f"VisionConfig: image_size ({self.image_size}) must divide by "
                             f"patch_size ({self.patch_size}) and dim ({self.dim}) by n_heads "
                             f"({self.n_heads})")


# The paper's vision tower (SigLIP2-B/16-512); train.py's paper preset uses its shape.
SIGLIP2_B16_512 = VisionConfig(image_size=512, patch_size=16, dim=768, n_layers=12, n_heads=12,
                               mlp_dim=3072, ln_eps=1e-6)


# ----------------------------------------------------------------------------------------
# Decoder building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables for rotary embeddings at the given positions: (B, 1, T, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float()
                               / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq           # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]              # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def positions_from_mask(attention_mask):
    """Position of each token = number of real tokens before it, so padding never shifts
    an example (README, batch layout). attention_mask: (B, T) 1 real / 0 pad."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(attention_mask, q_len, past_len):
    """(B, 1, Tq, Tk), True = may attend: a query sees the past_len cached keys and the new ones
    up to itself (causal), minus pads, and always itself (a pad query: no all-masked row, NaN)."""
    k_len = past_len + q_len
    q_idx = torch.arange(past_len, k_len, device=attention_mask.device)[:, None]
    k_idx = torch.arange(k_len, device=attention_mask.device)[None, :]
    causal = k_idx <= q_idx                                      # (Tq, Tk)
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | (k_idx == q_idx)[None, None]


def reference_attention(q, k, v, mask):
    """The reference (the CPU's): SDPA with the mask (B, 1, Tq, Tk) or causal; GQA in place."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=True)


class Attention(nn.Module):
    # the attention function: the reference; scale.cuda.use_cuda_attention sets a GPU form
    attend = staticmethod(reference_attention)

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, past_kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # nkv heads
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)     # bf16 under autocast: K stays bf16
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)                   # (B, nkv, Tp+T, hd)
            v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
        y = self.attend(q, k, v, mask)                                              # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)                                      # (B, T, nh*hd)
        return self.o_proj(y), (k, v)     # the cache keeps n_kv_heads


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_kv=None):
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past_kv)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class Decoder(nn.Module):
    """Decoder-only LM. The teacher is one of these; the student VLM contains one."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(init_weights)
        # Activation checkpointing of the blocks when grad is on: backward recomputes each block
        # from its input instead of keeping its activations (same loss and grads, ~1/3 more
        # compute). A runtime switch, not part of the config or the weights.
        self.gradient_checkpointing = False

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_kv=None, use_cache=False, logits_start=0):
        """(logits from column logits_start on, kv) of input_ids (B, T) (or inputs_embeds) after
        past_kv (per layer (K, V) (B, n_kv_heads, Tp, head_dim), K after RoPE); attention_mask
        (B, Tp+T): 1 real / 0 pad (None: all real); kv (use_cache): past + new, every layer."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds           # (B, T, D)
        B, T, _ = x.shape
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        if attention_mask is None and past_kv is not None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=x.device)
        # no past and no pads: plain causal (mask None)
        mask = None if attention_mask is None else build_attention_mask(attention_mask, T, past_len)
        if position_ids is None:
            position_ids = (torch.arange(T, device=x.device).expand(B, T) if attention_mask is None
                            else positions_from_mask(attention_mask)[:, past_len:])     # (B, T)
        x, kv = self.blocks(x, mask, position_ids, past_kv)
        return self.lm_head(self.norm(x[:, logits_start:])), (kv if use_cache else None)

    def blocks(self, x, mask, position_ids, past_kv=None):
        """The decoder blocks on embeddings x (B, T, D) -> (hidden (B, T, D), every layer's (K, V)).
        mask: None (causal) or what Attention.attend takes; position_ids (B, T): RoPE positions."""
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        if past_len + x.shape[1] > self.cfg.max_positions:   # only then: .max() is a device sync
            self.check_positions(position_ids, past_len)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.cfg.rope_theta, x.dtype)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()  # recompute in backward
        new_kv = []
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, mask, None if past_kv is None else past_kv[i])
            x, kv = checkpoint(layer, *args, use_reentrant=False) if ckpt else layer(*args)
            new_kv.append(kv)
        return x, new_kv

    def check_positions(self, position_ids, past_len):
        longest = int(position_ids.max()) + 1
        if longest > self.cfg.max_positions:
            raise ValueError(f"sequence of {longest} positions (past {past_len} + new "
                             f"{position_ids.shape[1]} columns) is longer than max_positions "
                             f"{self.cfg.max_positions}")

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=20, inputs_embeds=None,
                 past_kv=None, **pick):
        """New tokens (B, max_new_tokens) after LEFT-padded prompts (positions from the mask: each
        row as if alone) with a KV cache; pick: generate_tokens' options. past_kv: a prefix in the
        cache (a student's context KV for the teacher, tools/generate.py); attention_mask then
        covers past + prompt. The reference: scale/decode.py runs it on a preallocated cache."""
        logits, kv, attention_mask = self.prefill(input_ids, inputs_embeds, attention_mask, past_kv)

        def next_logits(tok):                           # tok (B,) into the cache: logits (B, V)
            nonlocal attention_mask, kv
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
            logits, kv = self(input_ids=tok[:, None], attention_mask=attention_mask, past_kv=kv,
                              use_cache=True)
            return logits[:, -1]
        return generate_tokens(logits, next_logits, max_new_tokens, **pick)

    def prefill(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_kv=None):
        """generate's first forward: (the last logits (B, V), every layer's (K, V), attention_mask
        over past + prompt: all ones when None)."""
        x = inputs_embeds if inputs_embeds is not None else input_ids
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[0], past_len + x.shape[1], dtype=torch.long,
                                        device=x.device)
        logits, kv = self(input_ids=input_ids, inputs_embeds=inputs_embeds, past_kv=past_kv,
                          attention_mask=attention_mask, use_cache=True, logits_start=-1)
        return logits[:, -1], kv, attention_mask


def generate_tokens(logits, next_logits, max_new_tokens, temperature=0.0, top_k=None,
                    generator=None, eos_id=None, pad_id=0, on_token=None):
    """The decoding loop: a token from logits (B, V) (pick_token), on_token(tok) (streaming), then
    logits = next_logits(tok); pad_id after a row's eos_id, until every row has one."""
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for i in range(max_new_tokens):
        tok = torch.where(done, pad_id, pick_token(logits, temperature, top_k, generator))
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if eos_id is not None:
            done |= tok == eos_id
            if done.all():
                break
        if i + 1 < max_new_tokens:
            logits = next_logits(tok)
    out = torch.stack(out, 1)
    return F.pad(out, (0, max_new_tokens - out.shape[1]), value=pad_id)


def pick_token(logits, temperature=0.0, top_k=None, generator=None):
    """The next token (B,) from logits (B, V): argmax (temperature 0) or sampled (top_k: among the
    k most likely)."""
    last = logits.float()
    if temperature > 0 and top_k:
        kth = last.topk(min(top_k, last.shape[-1]), -1).values[:, -1:]
        last = last.masked_fill(last < kth, float("-inf"))
    if temperature <= 0:
        return last.argmax(-1)
    return torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)[:, 0]


def init_weights(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


# ----------------------------------------------------------------------------------------
# Vision tower (ViT / SigLIP layout) and projector

class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); GELU(tanh)."""
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.dim, cfg.dim)
                                                                for _ in range(4))
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        B, N, D = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(B, N, self.n_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)  # no mask
        x = x + self.out_proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.n_patches, cfg.dim))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers))
        self.post_ln = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images):
        """images (N, 3, H, W) normalised to [-1, 1] -> patch features (N, n_patches, dim)."""
        if images.shape[1:] != (3, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"images must be (N, 3, {self.cfg.image_size}, "
                             f"{self.cfg.image_size}), got {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed         # (N, P, D)
        for block in self.blocks:
            x = block(x)
        return self.post_ln(x)


def pixel_shuffle(x, factor):
    """(B, h*w, D) -> (B, h/s * w/s, D*s*s): merge each s x s patch neighbourhood into one token."""
    (B, N, D), s = x.shape, factor
    h = w = math.isqrt(N)
    if h * w != N or h % s:
        raise ValueError(f"pixel_shuffle: {N} patches is not a square grid divisible by factor {s}")
    x = x.view(B, h // s, s, w // s, s, D).permute(0, 1, 3, 2, 4, 5)        # (B, h/s, w/s, s, s, D)
    return x.reshape(B, (h // s) * (w // s), D * s * s)


class Projector(nn.Module):
    """nanoVLM's modality projector: pixel shuffle then one linear layer (no bias)."""
    def __init__(self, vision_dim, lm_dim, factor):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(vision_dim * factor * factor, lm_dim, bias=False)
        init_weights(self.proj)

    def forward(self, x):
        return self.proj(pixel_shuffle(x, self.factor))


# ----------------------------------------------------------------------------------------
# The VLM

class VLM(nn.Module):
    """Vision tower + projector + decoder. Each image view becomes n_image_tokens embeddings that
    replace, in order, the positions of `image_token_id` in input_ids.

    view_token_ids: with image splitting, the ids of the global-image and grid tokens
    (data.VIEW_TOKENS) that frame the views; like image_token_id they are student-only ids
    (student_only_ids), which the teacher reads as KV and never embeds.
    image_splitting: how this model's images are prepared (an ImageSplitting, or None for
    one view per image); stored in the model folder, used by collate and tools/generate.py."""

    def __init__(self, lm_cfg: LMConfig, vision_cfg: VisionConfig, image_token_id, shuffle_factor=2,
                 view_token_ids=(), image_splitting=None):
        super().__init__()
        bad = [i for i in (image_token_id, *view_token_ids) if not 0 <= i < lm_cfg.vocab_size]
        if bad:
            raise ValueError(f"image/view token id(s) {bad} outside the vocabulary [0, "
                             f"{lm_cfg.vocab_size})")
        self.image_token_id = image_token_id
        self.view_token_ids = tuple(view_token_ids)
        self.image_splitting = image_splitting
        self.vision = VisionEncoder(vision_cfg)
        self.projector = Projector(vision_cfg.dim, lm_cfg.dim, shuffle_factor)
        self.decoder = Decoder(lm_cfg)
        self.n_image_tokens = vision_cfg.n_patches // shuffle_factor ** 2

    @property
    def student_only_ids(self):
        """Ids only the student embeds (kvshare.teacher_continue): <image> and the view tokens."""
        return (self.image_token_id, *self.view_token_ids)

    def embed(self, input_ids, images=None):
        """Token embeddings, image features in the placeholders (counts: check_image_slots)."""
        x = self.decoder.embed(input_ids)                                                # (B, T, D)
        if images is None or len(images) == 0:
            return x
        slots = input_ids == self.image_token_id                                        # (B, T)
        feats = self.image_features(images).to(x.dtype)                          # (N, n_img_tok, D)
        return x.masked_scatter(slots[..., None], feats.reshape(-1, x.shape[-1]))

    def check_image_slots(self, input_ids, images=None):
        """ValueError unless input_ids hold n_image_tokens placeholders per image view (host)."""
        n_views = 0 if images is None else len(images)
        n_slots = int((input_ids == self.image_token_id).sum())
        n_feats = n_views * self.n_image_tokens
        if n_slots != n_feats:
            raise ValueError(f"{n_slots} image placeholder tokens in input_ids but {n_feats} image "
                             f"features ({n_views} image views x {self.n_image_tokens} tokens)")

    def image_features(self, images):
        """images (N, 3, H, W) -> (N, n_image_tokens, D): tower, projector (tools/oracle.py)."""
        return self.projector(self.vision(images))

    def forward(self, input_ids, images=None, attention_mask=None, position_ids=None,
                use_cache=False, logits_start=0):
        """Decoder.forward on the embedded tokens."""
        return self.decoder(inputs_embeds=self.embed(input_ids, images),
                            attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=use_cache, logits_start=logits_start)

    @torch.no_grad()
    def generate(self, input_ids, images=None, attention_mask=None, **kw):
        self.check_image_slots(input_ids, images)
        return self.decoder.generate(inputs_embeds=self.embed(input_ids, images),
                                     attention_mask=attention_mask, **kw)


def grow_vocab(decoder, vocab_size):
    """A copy of `decoder` whose vocabulary grows to vocab_size (e.g. for a new <image> id at
    the end): existing rows are kept exactly; new embedding/head rows start at the mean row."""
    old = decoder.cfg.vocab_size
    if vocab_size < old:
        raise ValueError(f"grow_vocab: vocab_size {vocab_size} < the decoder's {old}")
    grown = Decoder(replace(decoder.cfg,
                            vocab_size=vocab_size)).to(next(decoder.parameters()).device)
    sd = dict(decoder.state_dict())
    for key in ("embed.weight", "lm_head.weight"):
        w = sd[key]
        sd[key] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    grown.load_state_dict(sd)
    return grown


def vlm_from_teacher(teacher, vision_cfg, image_token_id, shuffle_factor=2, view_token_ids=(),
                     image_splitting=None):
    """The student before training (README, how it works): a copy of the teacher's decoder
    (vocabulary grown if the image / view tokens are new ids), a vision tower and a fresh
    projector."""
    decoder = grow_vocab(teacher, max(teacher.cfg.vocab_size, image_token_id + 1,
                                      *(i + 1 for i in view_token_ids)))
    vlm = VLM(decoder.cfg, vision_cfg, image_token_id, shuffle_factor, view_token_ids,
              image_splitting)
    vlm.decoder.load_state_dict(decoder.state_dict())
    return vlm.to(next(teacher.parameters()).device)
