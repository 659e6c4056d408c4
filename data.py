"""
What the method consumes: the tokenizer roles and the batch layout of the KV handoff.

- The layout (collate, pad_pairs): contexts LEFT-padded to P columns, responses RIGHT-padded
  to R, so every context ends in column P-1 (kvshare.py draws it). The reference, and the
  default. pack.py: the packed layout (--pack=true), several examples end to end per row.
- Tokenizers: train_tokenizer (the tiny world's byte-level BPE) or load_tokenizer (any Hugging
  Face tokenizer.json); <pad>, <eos> and <image> are roles, played by the tokenizer's own
  tokens where it has them (special_id).
- Image splitting: tiles.py (nanoVLM's tiles + global view per image; view_tokens here).
"""
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import pack
from tiles import (GLOBAL_IMAGE_TOKEN, MAX_GRID, VIEW_TOKENS, Idefics3Grid, grid_token,
                   idefics3_image_prompt, image_views)

PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<pad>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

# ----------------------------------------------------------------------------------------
# The batch layout of the handoff

def collate(examples, tokenizer, n_image_tokens, image_size, max_len=None, image_splitting=None,
            pack=False):
    """Batch in the layout of kvshare.py: contexts LEFT-padded to P, responses RIGHT-padded to R
    (pack=True: the packed layout of pack.pack, rows of at most max_len columns).
    max_len cuts each response (not the context) so that context + response <= max_len.
    encode_for_batch, then batch_of (train.py encodes the tiny world once per stage)."""
    if pack and max_len is None:
        raise ValueError("collate: pack=True needs max_len (the tokens of one packed row)")
    items = [encode_for_batch(ex, tokenizer, n_image_tokens, image_size, image_splitting)
             for ex in examples]
    return batch_of(items, special_id(tokenizer, PAD_TOKEN), max_len, pack)


def encode_for_batch(example, tokenizer, n_image_tokens, image_size, image_splitting=None):
    """One example, ready for batch_of: its (context_ids, response_ids) (encode_example), its
    image views, (k, 3, S, S) tensors in token order (global view then tiles), the grid
    (n_h, n_w) of each image, and its source. image_splitting: None (one view per image) or an
    ImageSplitting (nanoVLM's rule)."""
    per_image = [image_views(im, image_size, image_splitting) for im in example_images(example)]
    grids = [g for _, g in per_image]
    pair = encode_example(example, tokenizer, n_image_tokens,
                          grids if image_splitting is not None else None)
    return {"pair": pair, "views": [v for v, _ in per_image], "grids": grids,
            "source": example["source"]}


def batch_of(items, pad, max_len=None, pack=False):
    """Encoded examples (encode_for_batch) -> a batch: the token part (pad_pairs, or pack.pack into
    max_len rows), "images" (N_views, 3, S, S) in <image>-run order, "grids", "source"."""
    pairs = [it["pair"] for it in items]
    if max_len is not None:
        if any(len(c) >= max_len for c, _ in pairs):
            raise ValueError(f"a context is {max(len(c) for c, _ in pairs)} tokens; max_len "
                             f"{max_len} leaves no room for its response")
        pairs = [(c, r[:max_len - len(c)]) for c, r in pairs]
    return {**lay_out(pairs, [it["views"] for it in items], pad, max_len if pack else None),
            "grids": [it["grids"] for it in items], "source": [it["source"] for it in items]}


def lay_out(pairs, views, pad, pack_len=None):
    """Tokens (pad_pairs, or pack.pack into pack_len rows) + "images": example i's views[i], (k, 3,
    S, S) tensors, concatenated in the order their <image> ids appear in the batch, row by row."""
    batch = pad_pairs(pairs, pad) if pack_len is None else pack.pack(pairs, pad, pack_len)
    flat = [v for i in batch.pop("order", range(len(pairs))) for v in views[i]]
    return {**batch, "images": torch.cat(flat) if flat else None}


def pad_pairs(pairs, pad):
    """[(context_ids, response_ids), ...] -> input_ids, attention_mask (contexts LEFT-padded to P,
    responses RIGHT-padded to R), context_len = P, labels and response_mask (the R columns)."""
    P, R = max(len(c) for c, _ in pairs), max(len(r) for _, r in pairs)
    ids = torch.full((len(pairs), P + R), pad, dtype=torch.long)  # (B, P+R)
    mask = torch.zeros((len(pairs), P + R), dtype=torch.long)  # (B, P+R)
    for i, (c, r) in enumerate(pairs):
        ids[i, P - len(c):P + len(r)] = torch.tensor(c + r)
        mask[i, P - len(c):P + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "context_len": P,
            "labels": ids[:, P:], "response_mask": mask[:, P:].bool()}  # (B, R) each


def encode_example(example, tokenizer, n_image_tokens, grids=None):
    """-> (context_ids, response_ids). Context: the prompt, where the i-th "<image>" tag becomes
    image i's tokens (all tags at the start if the prompt names none; the tag count must match the
    images); response: answer + <eos>.

    grids None: each image is n_image_tokens <image> ids (one view). grids = [(n_h, n_w) per image]
    (image splitting): each image is view_tokens(n_h, n_w, n_image_tokens), and with several
    images each is preceded by the text "<image: i>" as nanoVLM writes it. An Idefics3Grid
    (tiles.Idefics3Splitting, a SmolVLM student) is its processor's text for the image
    (tiles.idefics3_image_prompt), tokenized as the processor tokenizes it.
    Text and image ids are encoded separately; with byte-level BPE a leading space belongs to the
    next word, so "<image> eats" + " apples ." tokenizes like "... eats apples ."."""
    prompt, n_images = example["prompt"], len(example_images(example))
    n_tags = prompt.count(IMAGE_TOKEN)
    if n_tags and n_tags != n_images:
        raise ValueError(f"prompt {prompt!r} has {n_tags} {IMAGE_TOKEN} tags for {n_images} "
                         "image(s)")
    if grids is not None and len(grids) != n_images:
        raise ValueError(f"{len(grids)} image grids for {n_images} image(s)")
    if n_images and not n_tags:
        prompt = IMAGE_TOKEN * n_images + prompt
    texts, context = prompt.split(IMAGE_TOKEN), []
    for i, text in enumerate(texts):
        idefics3 = i < n_images and grids is not None and isinstance(grids[i], Idefics3Grid)
        if i < n_images and grids is not None and n_images > 1 and not idefics3:
            text += f"<image: {i}>"
        context += tokenizer.encode(text).ids if text else []
        if idefics3:
            context += tokenizer.encode(idefics3_image_prompt(grids[i], n_image_tokens)).ids
        elif i < n_images:
            if grids is None:
                names = [IMAGE_TOKEN] * n_image_tokens
            else:
                names = view_tokens(*grids[i], n_image_tokens)
            ids = {t: special_id(tokenizer, t) for t in set(names)}
            context += [ids[t] for t in names]
    if not context:
        raise ValueError(f"example from source {example['source']!r} has an empty context; "
                         "the first response token needs a context position to be predicted from")
    return context, tokenizer.encode(example["response"]).ids + [special_id(tokenizer, EOS_TOKEN)]


def example_images(example):
    """The example's images as a list: "image" is None, one PIL image, or a list of them."""
    image = example.get("image")
    return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]


def view_tokens(n_h, n_w, n_image_tokens):
    """The token sequence of one image split into n_h x n_w tiles (nanoVLM get_image_string):
    GLOBAL_IMAGE_TOKEN + n <image> (the global view), then for each tile in row-major order
    grid_token(r, c) (1-based) + n <image>. A 1x1 split is the global view alone."""
    if not (1 <= n_h <= MAX_GRID and 1 <= n_w <= MAX_GRID):
        raise ValueError(f"a {n_h}x{n_w} split has no grid tokens; at most {MAX_GRID}x{MAX_GRID}")
    out = [GLOBAL_IMAGE_TOKEN] + [IMAGE_TOKEN] * n_image_tokens
    if (n_h, n_w) != (1, 1):
        for r in range(1, n_h + 1):
            for c in range(1, n_w + 1):
                out += [grid_token(r, c)] + [IMAGE_TOKEN] * n_image_tokens
    return out


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


def load_tokenizer(path, roles=None, image_splitting=False):
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
    read by special_id. image_splitting=True also appends VIEW_TOKENS (global-image and grid
    tokens) after <image>, in nanoVLM's order, where the tokenizer lacks them."""
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
    if image_splitting:
        missing += [t for t in VIEW_TOKENS if tok.token_to_id(t) is None]
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
