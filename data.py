"""
What the method consumes: the tokenizer roles and the batch layout of the KV handoff.

- The layout (collate: encode_for_batch, then batch_of / pad_pairs): contexts LEFT-padded to P
  columns, responses RIGHT-padded to R, so every context ends in column P-1 (kvshare.py draws it).
- Tokenizers: train_tokenizer (the tiny world's byte-level BPE) or load_tokenizer (any Hugging
  Face tokenizer.json); <pad>, <eos> and <image> are roles, played by the tokenizer's own
  tokens where it has them (special_id).
- One view per image, image_to_tensor. Other layouts are composed from outside: image splitting
  (scale/tiles.py: tiles + a global view per image), packed rows (scale/pack.py).
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<pad>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

# ----------------------------------------------------------------------------------------
# The batch layout of the handoff

def collate(examples, tokenizer, n_image_tokens, image_size, max_len=None):
    """Examples -> a batch in the layout of kvshare.py: contexts LEFT-padded to P, responses
    RIGHT-padded to R; max_len cuts each response (not the context) so that context + response
    <= max_len. encode_for_batch, then batch_of (train.py encodes the tiny world once per stage)."""
    items = [encode_for_batch(ex, tokenizer, n_image_tokens, image_size) for ex in examples]
    return batch_of(items, special_id(tokenizer, PAD_TOKEN), max_len)


def encode_for_batch(example, tokenizer, n_image_tokens, image_size):
    """One example, ready for batch_of: its (context_ids, response_ids) (encode_example), its
    image views, (1, 3, S, S) tensors, one per image, the grid (1, 1) of each, and its source."""
    images = example_images(example)
    return {"pair": encode_example(example, tokenizer, n_image_tokens),
            "views": [image_to_tensor(im, image_size)[None] for im in images],
            "grids": [(1, 1)] * len(images), "source": example["source"]}


def batch_of(items, pad, max_len=None):
    """Encoded examples (encode_for_batch) -> a batch: the tokens (pad_pairs), "images"
    (N_views, 3, S, S) in <image>-run order, "grids", "source"."""
    return {**lay_out(fit_pairs([it["pair"] for it in items], max_len),
                      [it["views"] for it in items], pad),
            "grids": [it["grids"] for it in items], "source": [it["source"] for it in items]}


def fit_pairs(pairs, max_len=None):
    """Each response cut so that context + response <= max_len (None: unchanged)."""
    if max_len is None:
        return pairs
    if any(len(c) >= max_len for c, _ in pairs):
        raise ValueError(f"a context is {max(len(c) for c, _ in pairs)} tokens; max_len "
                         f"{max_len} leaves no room for its response")
    return [(c, r[:max_len - len(c)]) for c, r in pairs]


def lay_out(pairs, views, pad):
    """Tokens (pad_pairs) + "images": example i's views[i], (k, 3, S, S) tensors, concatenated in
    the order their <image> ids appear in the batch, row by row."""
    flat = [v for vs in views for v in vs]
    return {**pad_pairs(pairs, pad), "images": torch.cat(flat) if flat else None}


def pad_pairs(pairs, pad):
    """[(context_ids, response_ids), ...] -> input_ids, attention_mask (contexts LEFT-padded to P,
    responses RIGHT-padded to R), context_len P; labels, response_mask, token_example: (B, R)."""
    P, R = max(len(c) for c, _ in pairs), max(len(r) for _, r in pairs)
    ids = torch.full((len(pairs), P + R), pad, dtype=torch.long)  # (B, P+R)
    mask = torch.zeros((len(pairs), P + R), dtype=torch.long)  # (B, P+R)
    for i, (c, r) in enumerate(pairs):
        ids[i, P - len(c):P + len(r)] = torch.tensor(c + r)
        mask[i, P - len(c):P + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "context_len": P,
            "labels": ids[:, P:], "response_mask": mask[:, P:].bool(),         # (B, R) each
            "token_example": torch.arange(len(pairs))[:, None].expand(-1, R)}  # each row's index


def flat_index(mask):
    """The flat (row-major) indices of mask's True entries: what indexing by the mask gathers, as
    an index computed on the host where the batch is built, so that the step on the device has
    no shape that depends on values (and no host sync)."""
    return mask.reshape(-1).nonzero()[:, 0]


def encode_example(example, tokenizer, n_image_tokens, image_part=None):
    """-> (context_ids, response_ids). Context: the prompt, where the i-th "<image>" tag becomes
    image i's tokens (all tags at the start if the prompt names none; the tag count must match the
    images); response: answer + <eos>.

    Image i is n_image_tokens <image> ids (one view); image_part(i) -> (text, ids) replaces that:
    text appended to the prompt text before the image, and the image's ids (scale/tiles.py's
    layouts of a split image). Text and image ids are encoded separately; with byte-level BPE a
    leading space belongs to the next word, so "<image> eats" + " apples ." tokenizes like
    "... eats apples ."."""
    prompt, n_images = example["prompt"], len(example_images(example))
    n_tags = prompt.count(IMAGE_TOKEN)
    if n_tags and n_tags != n_images:
        raise ValueError(f"prompt {prompt!r} has {n_tags} {IMAGE_TOKEN} tags for {n_images} "
                         "image(s)")
    if n_images and not n_tags:
        prompt = IMAGE_TOKEN * n_images + prompt
    one_view = [special_id(tokenizer, IMAGE_TOKEN)] * n_image_tokens if n_images else []
    context = []
    for i, text in enumerate(prompt.split(IMAGE_TOKEN)):
        suffix, image_ids = ("", []) if i == n_images else \
            image_part(i) if image_part else ("", one_view)
        text += suffix
        context += (tokenizer.encode(text).ids if text else []) + image_ids
    if not context:
        raise ValueError(f"example from source {example['source']!r} has an empty context; "
                         "the first response token needs a context position to be predicted from")
    response = tokenizer.encode(example["response"]).ids + [special_id(tokenizer, EOS_TOKEN)]
    if IMAGE_TOKEN in example["response"]:       # a placeholder no image feature would fill
        raise ValueError(f"example from source {example['source']!r}: its response contains "
                         f"{IMAGE_TOKEN!r}; images belong in the prompt")
    return context, response


def example_images(example):
    """The example's images as a list: "image" is None, one PIL image, or a list of them."""
    image = example.get("image")
    return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]


def image_to_tensor(image, image_size, pixels="[-1,1]"):
    """PIL image -> (3, image_size, image_size) float in [-1, 1] (or [0, 1]); resized if needed."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return x if pixels == "[0,1]" else (x - 0.5) / 0.5


def encode_corpus(corpus, tokenizer):
    """Stage-1 token stream: every document followed by <eos>, as a 1-D LongTensor."""
    eos = special_id(tokenizer, EOS_TOKEN)
    return torch.tensor([i for enc in tokenizer.encode_batch(corpus) for i in enc.ids + [eos]],
                        dtype=torch.long)


# ----------------------------------------------------------------------------------------
# Tokenizers

def train_tokenizer(corpus, vocab_size=512, special_tokens=SPECIAL_TOKENS):
    """Byte-level BPE (GPT-2 style: a space belongs to the word after it) with the special tokens
    as its first ids (ours: <pad>, <eos>, <image> as 0, 1, 2)."""
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be >= {256 + len(special_tokens)} (bytes + special "
                         f"tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def load_tokenizer(path, roles=None, extra_tokens=()):
    """A tokenizer.json (ours or any Hugging Face one), ready for encode_example/collate.

    The <pad> and <eos> roles are played by the tokenizer's OWN tokens where it has them, so
    a real model's vocabulary (and embedding) is not extended for them:
      1. `roles`, e.g. {EOS_TOKEN: "<|endoftext|>"} (plain-text documents for SmolLM2);
      2. else eos_token / pad_token of the tokenizer_config.json next to tokenizer.json
         (SmolLM2-Instruct: both "<|im_end|>", id 2: chat responses end with it); no
         pad_token -> pad = the eos token (pad ids are never attended to nor scored);
      3. else literal "<pad>"/"<eos>" tokens (ours: ids 0, 1).
    Whatever is still missing, and "<image>" (always a literal token), is added as a new id
    at the END of the vocabulary (SmolLM2: <image> = 49152); no existing id changes. The model's
    embedding must cover added ids. The mapping is kept on the object (`tok.role_tokens`) and
    read by special_id. extra_tokens (e.g. scale.tiles.VIEW_TOKENS, image splitting's global-image
    and grid tokens) are appended after <image>, in their order, where the tokenizer lacks them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found; expected a tokenizer.json (every model "
                                "folder needs one)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:                   # the tokenizers library raises its own Exception type
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
    chosen = {}
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        # str or serialised AddedToken
        name = lambda v: v.get("content") if isinstance(v, dict) else v
        eos, pad = name(cfg.get("eos_token")), name(cfg.get("pad_token"))
        chosen = {EOS_TOKEN: eos, PAD_TOKEN: pad if pad is not None else eos}
    chosen.update(roles or {})
    role_tokens = {}
    for role, token in chosen.items():
        if role not in (PAD_TOKEN, EOS_TOKEN):
            raise ValueError(f"roles: unknown role {role!r}; expected {PAD_TOKEN!r} or "
                             f"{EOS_TOKEN!r}")
        if token is not None and tok.token_to_id(token) is not None:
            role_tokens[role] = token
        elif role in (roles or {}):
            raise ValueError(f"roles: {path} has no token {token!r} for {role}")
    missing = [t for t in SPECIAL_TOKENS if t not in role_tokens and tok.token_to_id(t) is None]
    missing += [t for t in extra_tokens if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    tok.role_tokens = role_tokens
    return tok


def special_id(tokenizer, token):
    """Id of a special token; <pad>/<eos> follow the tokenizer's role mapping (load_tokenizer)."""
    i = tokenizer.token_to_id(getattr(tokenizer, "role_tokens", {}).get(token, token))
    if i is None:
        raise ValueError(f"tokenizer has no {token} token; expected all of {SPECIAL_TOKENS} (use "
                         "load_tokenizer)")
    return i
