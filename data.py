"""
Data for LinguDistill in miniature: a deterministic tiny world (no downloads), the
tokenizer, the batch layout kvshare.py expects, and loaders for real data.

The tiny world (build_world), designed so that degradation and recovery show at tiny scale
(README "How LinguDistill works here"):
- entities = colour x shape, drawn as small RGB images (position/size jitter). Each has
  text-only knowledge no image shows: a made-up name, a food, a home.
- the stage-1 corpus states those facts in several templates, with the name OR the
  description as subject ("kabol eats apples .", "the red circle eats apples ."), plus Q&A,
  one-sentence stories, arithmetic and word facts. Every document is one unit ending in
  " ."; `encode_corpus` puts <eos> after each, so the teacher learns to stop where a
  response stops.
- multimodal prompts use the corpus format with the image where the subject stands:
  "<image> eats" -> " apples ." (knowledge_vqa: the answer needs the image AND the text
  knowledge, so the KV handoff can matter); "<image> is coloured" -> " red ." (vision).
- held out: per entity and fact, one template never appears in training; the language
  benchmark asks exactly those. Benchmark images are fresh renders (layouts no training
  image has). Language sources cover only "seen" entities; the benchmark reports
  seen/unseen (KD's gain is mostly on unseen entities).
"""
import io
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import MAX_GRID, ImageSplitting
from weights import atomic_write       # weights imports model only: no cycle

PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<pad>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN)
# nanoVLM's image-splitting tokens (models/config.py vlm_extra_tokens): one global-view token and
# an 8x8 table of 1-based grid tokens; load_tokenizer(image_splitting=True) appends them after
# <image> in this order, which is nanoVLM's numbering (<image> 49152, global 49153, <row_1_col_1>
# 49154, ...).
GLOBAL_IMAGE_TOKEN = "<|global_image|>"
grid_token = "<row_{}_col_{}>".format          # grid_token(row, col), both 1-based
VIEW_TOKENS = (GLOBAL_IMAGE_TOKEN,
               *(grid_token(r, c) for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)))

# source -> kind; distill.table_from_kinds turns this into KD weights (language 1, vision 0)
SOURCE_KINDS = {"colour": "vision", "shape": "vision", "count": "vision", "position": "vision",
                "caption": "vision", "knowledge_vqa": "language", "text_qa": "language"}

COLOURS = {"red": (220, 50, 50), "green": (50, 180, 70), "blue": (60, 100, 235),
           "yellow": (235, 215, 50),
           "purple": (150, 70, 210), "orange": (245, 140, 30), "pink": (250, 135, 195),
           "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "bar")
FOODS = ("apples", "bread", "carrots", "cheese", "fish", "grapes", "honey", "nuts", "rice", "seeds",
         "soup", "plums")
HOMES = ("forest", "cave", "river", "desert", "castle", "garden", "mountain", "lake", "village",
         "meadow")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIDES = ("left", "right", "top", "bottom")
# arithmetic facts: a + b <= 10
SUMS = tuple((a, b) for a in range(1, 10) for b in range(1, 11 - a))
OPPOSITES = (("big", "small"), ("hot", "cold"), ("up", "down"), ("day", "night"), ("fast", "slow"),
             ("old", "new"), ("happy", "sad"), ("wet", "dry"))
BACKGROUND = (25, 25, 25)

# Fact templates: {s} = subject (a name, a description, or <image>), {v} = value. The text
# before " {v}" is a context, the rest completes the sentence.
TEMPLATES = {
    "food": ("{s} eats {v} .", "{s} likes to eat {v} .", "the favourite food of {s} is {v} .",
             "every morning {s} has {v} for breakfast ."),
    "home": ("{s} lives in the {v} .", "{s} sleeps in the {v} .", "the home of {s} is the {v} .",
             "every night {s} goes back to the {v} ."),
    "name": ("{s} is called {v} .", "people call {s} {v} .", "the name of {s} is {v} .",
             "everyone knows {s} as {v} ."),
}
# (relation, subject kind) pairs the language benchmark asks about, each in its held-out template
BENCH_FACTS = (("food", "name"), ("food", "desc"), ("home", "name"), ("home", "desc"),
               ("name", "desc"))
# subject-first templates, so the image can stand where the subject stands: (relation, template
# index)
KNOWLEDGE_PROMPTS = (("food", 0), ("food", 1), ("home", 0), ("home", 1), ("name", 0))
STORIES = ("once upon a time , {n} the {c} {sh} was hungry , so {n} went out and found some {f} .",
           "after a long day , {d} walked back to the {h} and ate some {f} .",
           "{n} never leaves the {h} without a bag of {f} .")
VISION_PROMPTS = {"colour": "<image> is coloured", "shape": "<image> has the shape of a",
                  "count": "<image> the number of shapes is",
                  "position": "<image> the shape is on the", "caption": "<image> is"}


# ----------------------------------------------------------------------------------------
# The tiny world

@dataclass
class Entity:
    name: str
    colour: str
    shape: str
    food: str
    home: str
    seen: bool          # appears in the language sources (knowledge_vqa, text_qa) of training
    held_out: dict      # (relation, subject kind) -> template index no training text uses

    @property
    def desc(self):
        return f"the {self.colour} {self.shape}"

    @property
    def a_desc(self):
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {self.shape}"

    def subject(self, kind):
        return self.name if kind == "name" else self.desc

    def value(self, relation):
        return {"food": self.food, "home": self.home, "name": self.name}[relation]


@dataclass
class World:
    """Everything build_world makes. Examples: {"image", "prompt", "response", "source"};
    language_bench items: {"context", "options", "answer", "split"}; knowledge_bench items
    are examples with a "split" too."""
    seed: int
    image_size: int
    entities: list
    corpus: list            # stage-1 documents, one sentence each
    sources: dict           # source name -> training examples
    language_bench: list    # 4-way multiple choice, text only, held-out templates
    vision_bench: list      # one fresh render per entity per vision source
    knowledge_bench: list   # "<image> eats" / "<image> lives in the" on fresh renders

    @property
    def source_kinds(self):
        """source -> "vision" | "language" (the KD gate's input), as for real data (RealData)."""
        return SOURCE_KINDS


def fact(template, subject, value):
    """Split a fact into (context, completion): ("kabol eats", " apples .")."""
    head, tail = template.split(" {v}")
    return head.format(s=subject), f" {value}{tail}"


def _make_names(rng, n):
    """Made-up CVCVC names that are no word of the world's other text."""
    taken = set(" ".join([*TEMPLATES["food"], *TEMPLATES["home"], *TEMPLATES["name"], *STORIES,
                          *VISION_PROMPTS.values(), *FOODS, *HOMES, *NUMBERS, *SIDES, *COLOURS,
                          *SHAPES, *(w for pair in OPPOSITES for w in pair)]).split())
    cons, vows = "bdfgklmnprstvz", "aeiou"
    names = []
    while len(names) < n:
        c, v = rng.integers(len(cons), size=3), rng.integers(len(vows), size=2)
        name = cons[c[0]] + vows[v[0]] + cons[c[1]] + vows[v[1]] + cons[c[2]]
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _make_entities(rng, n, seen_fraction):
    looks = [(c, s) for c in COLOURS for s in SHAPES]
    if not 4 <= n <= len(looks):
        raise ValueError(f"n_entities must be in [4, {len(looks)}] (colour x shape), got {n}")
    names = _make_names(rng, n)
    n_seen = min(n - 1, max(1, round(n * seen_fraction)))
    return [Entity(names[i], *looks[p], food=str(rng.choice(FOODS)), home=str(rng.choice(HOMES)),
                   seen=i < n_seen,
                   held_out={key: int(rng.integers(len(TEMPLATES[key[0]]))) for key in BENCH_FACTS})
            for i, p in enumerate(rng.permutation(len(looks))[:n])]


def _entity_qa(e):
    qa = []
    for s in (e.name, e.desc):
        qa += [(f"question : what does {s} eat ? answer :", f" {e.food} ."),
               (f"question : where does {s} live ? answer :", f" the {e.home} .")]
    return qa + [(f"question : who is {e.desc} ? answer :", f" {e.name} ."),
                 (f"question : what is {e.name} ? answer :", f" {e.a_desc} .")]


def _general_qa():
    """Arithmetic and word facts: language skills that involve no entity."""
    qa = [(f"question : what is {NUMBERS[a]} plus {NUMBERS[b]} ? answer :", f" {NUMBERS[a + b]} .")
          for a, b in SUMS]
    return qa + [(f"question : what is the opposite of {x} ? answer :", f" {y} .")
                 for pair in OPPOSITES for x, y in (pair, pair[::-1])]


def _entity_docs(e):
    docs = ["".join(fact(tpl, e.subject(kind), e.value(rel)))
            for rel, kind in BENCH_FACTS for t,
            tpl in enumerate(TEMPLATES[rel]) if t != e.held_out[rel, kind]]
    docs.append(f"{e.name} is {e.a_desc} .")
    for s in (e.name, e.desc):
        docs += [f"{s} is coloured {e.colour} .", f"{s} has the shape of a {e.shape} ."]
    docs += [p + r for p, r in _entity_qa(e)]
    return docs + [story.format(n=e.name, d=e.desc, c=e.colour, sh=e.shape, f=e.food, h=e.home)
                   for story in STORIES]


def _make_corpus(rng, entities):
    docs = [d for e in entities for d in _entity_docs(e)]
    docs += [f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} ." for a, b in SUMS]
    docs += [f"the opposite of {x} is {y} ." for pair in OPPOSITES for x, y in (pair, pair[::-1])]
    docs += [p + r for p, r in _general_qa()]
    return [docs[i] for i in rng.permutation(len(docs))]


def _layout(rng, kind, S):
    """(answer, objects) of a scene; objects = ((cx, cy, r), ...) in pixels of an S x S image.
    single: one shape near the centre; position: one shape on a side; count: 1-4 in a 2x2 grid."""
    j = max(1, S // 16)
    if kind == "single":
        cx, cy = (S // 2 + rng.integers(-(S // 8), S // 8 + 1, size=2)).tolist()
        return None, ((cx, cy, int(rng.integers(S // 5, 3 * S // 10 + 1))),)
    if kind == "position":
        side = int(rng.integers(4))
        cx, cy = ((S // 4, S // 2), (3 * S // 4, S // 2), (S // 2, S // 4),
                  (S // 2, 3 * S // 4))[side]
        dx, dy = rng.integers(-j, j + 1, size=2).tolist()
        return SIDES[side], ((cx + dx, cy + dy, int(rng.integers(S // 8, S // 5 + 1))),)
    k = int(rng.integers(1, 5))
    cells = sorted(rng.choice(4, size=k, replace=False).tolist())
    return NUMBERS[k], tuple((S // 4 + (c % 2) * (S // 2) + int(rng.integers(-j, j + 1)),
                              S // 4 + (c // 2) * (S // 2) + int(rng.integers(-j, j + 1)),
                              int(rng.integers(S // 8, S // 6 + 1))) for c in cells)


def render(colour, shape, objects, size):
    """Draw copies of one coloured shape on a dark background -> PIL RGB image."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    for cx, cy, r in objects:
        box, w = (cx - r, cy - r, cx + r, cy + r), max(1, r // 3)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape in ("triangle", "diamond"):
            corners = {"triangle": [(0, -r), (r, r), (-r, r)],
                       "diamond": [(0, -r), (r, 0), (0, r), (-r, 0)]}[shape]
            draw.polygon([(cx + x, cy + y) for x, y in corners], fill=fill)
        else:   # rectangles: square, bar, or the two bars of a cross
            rects = {"square": [box], "bar": [(cx - r, cy - r // 2, cx + r, cy + r // 2)],
                     "cross": [(cx - r, cy - w, cx + r, cy + w),
                               (cx - w, cy - r, cx + w, cy + r)]}[shape]
            for rect in rects:
                draw.rectangle(rect, fill=fill)
    return img


class _Scenes:
    """Renders entity scenes and remembers every one drawn, so benchmark scenes can be fresh."""

    def __init__(self, rng, size):
        self.rng, self.size, self.used = rng, size, set()

    def draw(self, e, kind, fresh=False):
        for _ in range(1000):
            answer, objects = _layout(self.rng, kind, self.size)
            key = (e.colour, e.shape, kind, objects)
            if not (fresh and key in self.used):
                break
        else:
            raise RuntimeError(f"no fresh {kind} scene left for {e.desc} at image_size {self.size}")
        self.used.add(key)
        return answer, render(e.colour, e.shape, objects, self.size)


def _vision_example(source, e, scenes, fresh=False):
    answer, image = scenes.draw(e, source if source in ("count", "position") else "single", fresh)
    answer = {"colour": e.colour, "shape": e.shape, "caption": e.a_desc}.get(source, answer)
    return {"image": image, "prompt": VISION_PROMPTS[source], "response": f" {answer} .",
            "source": source}


def _knowledge_example(e, relation, template, scenes, fresh=False):
    prompt, response = fact(TEMPLATES[relation][template], IMAGE_TOKEN, e.value(relation))
    return {"image": scenes.draw(e, "single", fresh)[1], "prompt": prompt, "response": response,
            "source": "knowledge_vqa"}


def _mc_item(e, relation, kind, entities, rng):
    context, _ = fact(TEMPLATES[relation][e.held_out[relation, kind]], e.subject(kind), "")
    pool = {"food": FOODS, "home": HOMES, "name": [x.name for x in entities]}[relation]
    options = [f" {v}"
               for v in rng.choice([v for v in pool if v != e.value(relation)], 3, replace=False)]
    answer = int(rng.integers(4))
    options.insert(answer, f" {e.value(relation)}")
    return {"context": context, "options": options, "answer": answer,
            "split": "seen" if e.seen else "unseen"}


def build_world(seed=0, n_entities=40, image_size=32, examples_per_source=600, seen_fraction=0.5):
    """The whole tiny world from one seed; same arguments -> byte-identical data."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw the shapes, got {image_size}")
    rng = lambda part: np.random.default_rng([seed, part])
    entities = _make_entities(rng(0), n_entities, seen_fraction)
    corpus, scenes, pick = _make_corpus(rng(1), entities), _Scenes(rng(2), image_size), rng(3)
    seen = [e for e in entities if e.seen]
    sources = {s: [_vision_example(s, entities[i], scenes)
                   for i in pick.integers(n_entities, size=examples_per_source)]
               for s in VISION_PROMPTS}
    sources["knowledge_vqa"] = [
        _knowledge_example(seen[i], *KNOWLEDGE_PROMPTS[k], scenes)
        for i, k in zip(pick.integers(len(seen), size=examples_per_source),
                        pick.integers(len(KNOWLEDGE_PROMPTS), size=examples_per_source))]
    sources["text_qa"] = [{"image": None, "prompt": p, "response": r, "source": "text_qa"}
                          for p, r in [qa for e in seen for qa in _entity_qa(e)] + _general_qa()]
    # benchmarks last: their scenes must be fresh against every training scene
    return World(
        seed, image_size, entities, corpus, sources,
        language_bench=[_mc_item(e, rel, kind, entities, pick) for e in entities for rel,
                        kind in BENCH_FACTS],
        vision_bench=[_vision_example(s, e, scenes, fresh=True) for s in VISION_PROMPTS
                      for e in entities],
        knowledge_bench=[{**_knowledge_example(e, rel, 0, scenes, fresh=True),
                          "split": "seen" if e.seen else "unseen"}
                         for e in entities for rel in ("food", "home")])


# ----------------------------------------------------------------------------------------
# Tokenizer

def train_tokenizer(corpus, vocab_size=512):
    """Byte-level BPE (GPT-2 style: a space belongs to the word after it) with <pad>, <eos>,
    <image> as ids 0, 1, 2."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special "
                         f"tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
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


# ----------------------------------------------------------------------------------------
# Encoding and batching

def split_size(h, w, tile, max_side, resize_to_max_side):
    """nanoVLM's resize rule (DynamicResize._get_new_hw): (h, w) -> (H, W), both multiples of tile.
    The long side becomes max_side (resize_to_max_side) or min(max_side, ceil(long / tile) * tile);
    the short side is scaled by the same factor and rounded UP to a multiple of tile (at least one
    tile), so the aspect ratio is kept up to that rounding. Same float operations as nanoVLM."""
    long, short = max(h, w), min(h, w)
    target_long = max_side if resize_to_max_side else min(max_side, math.ceil(long / tile) * tile)
    scale = target_long / long
    target_short = max(math.ceil(short * scale / tile) * tile, tile)
    return (target_short, target_long) if w >= h else (target_long, target_short)


def tile_grid(h, w, tile):
    """(n_h, n_w) tiles of an image already resized to multiples of tile (nanoVLM SplitImage)."""
    if h % tile or w % tile:
        raise ValueError(f"image size {(h, w)} is not a multiple of the tile {tile}")
    return h // tile, w // tile


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


def image_views(image, tile, splitting=None):
    """PIL image -> (views (k, 3, tile, tile), (n_h, n_w)), views in the order of view_tokens.

    splitting None: one view, the image resized to the tile (grid (1, 1)). Else nanoVLM's rule:
    resize (bicubic) to split_size, cut row-major tiles; when there is more than one tile the
    first view is the global view (the resized image squeezed to one tile; nanoVLM resizes the
    tensor bilinearly, we use PIL's bilinear); a 1x1 split is just its one tile."""
    image = image.convert("RGB")
    if splitting is None:
        return image_to_tensor(image, tile)[None], (1, 1)
    splitting.check_tile(tile)
    w, h = image.size
    H, W = split_size(h, w, tile, splitting.max_side, splitting.resize_to_max_side)
    resized = image.resize((W, H), Image.BICUBIC) if (W, H) != (w, h) else image
    n_h, n_w = tile_grid(H, W, tile)
    views = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(n_h)
             for c in range(n_w)]
    if len(views) > 1:
        views.insert(0, resized.resize((tile, tile), Image.BILINEAR))
    return torch.stack([image_to_tensor(v, tile, splitting.pixels) for v in views]), (n_h, n_w)


def example_images(example):
    """The example's images as a list: "image" is None, one PIL image, or a list of them."""
    image = example.get("image")
    return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]


def encode_example(example, tokenizer, n_image_tokens, grids=None):
    """-> (context_ids, response_ids). Context: the prompt, where the i-th "<image>" tag becomes
    image i's tokens (all tags at the start if the prompt names none; the tag count must match the
    images); response: answer + <eos>.

    grids None: each image is n_image_tokens <image> ids (one view). grids = [(n_h, n_w) per image]
    (image splitting): each image is view_tokens(n_h, n_w, n_image_tokens), and with several
    images each is preceded by the text "<image: i>" as nanoVLM writes it.
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
        if i < n_images and grids is not None and n_images > 1:
            text += f"<image: {i}>"
        context += tokenizer.encode(text).ids if text else []
        if i < n_images:
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


def image_to_tensor(image, image_size, pixels="[-1,1]"):
    """PIL image -> (3, image_size, image_size) float in [-1, 1] (or [0, 1]); resized if needed."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return x if pixels == "[0,1]" else (x - 0.5) / 0.5


def collate(examples, tokenizer, n_image_tokens, image_size, max_len=None, image_splitting=None):
    """Batch in the layout of kvshare.py: contexts LEFT-padded to P, responses RIGHT-padded to R.
    max_len cuts each response (not the context) so that context + response <= max_len.

    images: every view of every image of the batch, (N_views, 3, image_size, image_size), in
    token order (example by example, image by image, global view then tiles), so the VLM
    scatters view k's features into the k-th run of <image> ids. image_splitting: None (one
    view per image) or an ImageSplitting (nanoVLM's rule). grids: per example, (n_h, n_w) per
    image."""
    pad = special_id(tokenizer, PAD_TOKEN)
    views, grids = [], []
    for ex in examples:
        per_image = [image_views(im, image_size, image_splitting) for im in example_images(ex)]
        views += [v for v, _ in per_image]
        grids.append([g for _, g in per_image])
    pairs = [encode_example(ex, tokenizer, n_image_tokens,
                            g if image_splitting is not None else None)
             for ex, g in zip(examples, grids)]
    if max_len is not None:
        if any(len(c) >= max_len for c, _ in pairs):
            raise ValueError(f"a context is {max(len(c) for c, _ in pairs)} tokens; max_len "
                             f"{max_len} leaves no room for its response")
        pairs = [(c, r[:max_len - len(c)]) for c, r in pairs]
    # (N_views, 3, S, S)
    return {**pad_pairs(pairs, pad), "images": torch.cat(views) if views else None,
            "grids": grids, "source": [ex["source"] for ex in examples]}


def pad_pairs(pairs, pad):
    """[(context_ids, response_ids), ...] -> the token part of a batch: input_ids and
    attention_mask (contexts LEFT-padded to P, responses RIGHT-padded to R), context_len = P,
    labels and response_mask (the R response columns)."""
    P, R = max(len(c) for c, _ in pairs), max(len(r) for _, r in pairs)
    ids = torch.full((len(pairs), P + R), pad, dtype=torch.long)  # (B, P+R)
    mask = torch.zeros((len(pairs), P + R), dtype=torch.long)  # (B, P+R)
    for i, (c, r) in enumerate(pairs):
        ids[i, P - len(c):P + len(r)] = torch.tensor(c + r)
        mask[i, P - len(c):P + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "context_len": P,
            "labels": ids[:, P:], "response_mask": mask[:, P:].bool()}  # (B, R) each


def encode_corpus(corpus, tokenizer):
    """Stage-1 token stream: every document followed by <eos>, as a 1-D LongTensor."""
    eos = special_id(tokenizer, EOS_TOKEN)
    return torch.tensor([i for enc in tokenizer.encode_batch(corpus) for i in enc.ids + [eos]],
                        dtype=torch.long)


# ----------------------------------------------------------------------------------------
# Real data

def conversation_examples(turns, last_only=False):
    """[(user, assistant), ...] -> [(prompt, response), ...], one per assistant turn:
    prompt = "\\n".join(u1, a1, ..., u_k), response = a_k. last_only=True: the last turn only
    (for data whose earlier answers should not be trained on)."""
    texts = [text for pair in turns for text in pair]
    pairs = [("\n".join(texts[:2 * k + 1]), texts[2 * k + 1]) for k in range(len(turns))]
    return pairs[-1:] if last_only else pairs


def _parse_record(line, image_root):
    """Validate one JSONL line without reading its image's pixels -> {"turns": [(user,
    assistant), ...], "image": path or None, "source": str}. The image file must exist."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"bad JSON ({err.msg}); expected one JSON object per line") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    if "conversations" in obj:
        turns = obj["conversations"]
        roles = [t.get("from") if isinstance(t, dict) else None
                 for t in turns] if isinstance(turns, list) else []
        if len(roles) < 2 or len(roles) % 2 or roles != ["human", "gpt"] * (len(roles) // 2) \
                or not all(isinstance(t.get("value"), str) for t in turns):
            raise ValueError("expected 'conversations' as alternating human/gpt turns with string "
                             "'value's")
        values = [t["value"] for t in turns]
        pairs = list(zip(values[0::2], values[1::2]))
    elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        pairs = [(obj["prompt"], obj["response"])]
    else:
        raise ValueError("missing field: expected 'conversations' or string 'prompt' and "
                         f"'response', found keys {sorted(obj)}")
    source = obj.get("source", "unknown")
    if not isinstance(source, str) or not source:
        raise ValueError(f"expected 'source' to be a non-empty string, found {source!r}")
    if any(IMAGE_TOKEN in answer for _, answer in pairs):
        raise ValueError(f"the response has {IMAGE_TOKEN}; expected it only in the prompt")
    image = None
    if obj.get("image") is not None:
        paths = obj["image"] if isinstance(obj["image"], list) else [obj["image"]]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError("expected 'image' to be a file path or a list of them, found "
                             f"{obj['image']!r}")
        paths = [os.path.join(image_root, p) for p in paths]   # an absolute path ignores image_root
        for path in paths:
            if not os.path.isfile(path):
                raise ValueError(f"image file not found: {path}")
        image = paths if isinstance(obj["image"], list) else paths[0]
    # all but the last answer
    elif IMAGE_TOKEN in conversation_examples(pairs, last_only=True)[0][0]:
        raise ValueError(f"the prompt has {IMAGE_TOKEN} but the line names no 'image'")
    elif not pairs[0][0].strip():
        raise ValueError("empty prompt and no image: the context would be empty; expected some "
                         "prompt text for the first response token to be predicted from")
    return {"turns": pairs, "image": image, "source": source}


def _decode_utf8(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                         "expected UTF-8 text") from None


def _parse_line(raw, image_root):
    """One JSONL line (bytes) -> the example of its last turn, its image decoded."""
    rec = _parse_record(_decode_utf8(raw), image_root)
    (prompt, response), = conversation_examples(rec["turns"], last_only=True)
    paths = rec["image"] if isinstance(rec["image"],
                                       list) else [rec["image"]] * (rec["image"] is not None)
    images = [_open_image(path, f"image {path}") for path in paths]
    image = images if isinstance(rec["image"], list) else (images[0] if images else None)
    return {"image": image, "prompt": prompt, "response": response, "source": rec["source"]}


def load_jsonl(path, image_root=None, skip_bad=False):
    """LLaVA-style JSONL -> examples. Per line: {"image"?: path or [paths], "conversations":
    [{"from":
    "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]} (earlier turns
    join the prompt, the last gpt turn is the response) or {"prompt", "response"}; optional
    "source" (default "unknown"). Image paths are relative to image_root (default: the
    file's folder); images are loaded eagerly. A bad line (bad JSON or UTF-8, a missing or
    wrong-typed field, an empty context, <image> in a response, an unreadable or
    decompression-bomb image) is a ValueError naming the file and line; with skip_bad=True bad
    lines are skipped and summarised on stderr. The file is read as bytes and decoded line by
    line, so bad UTF-8 is one bad line too."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; expected a JSONL file")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    examples, bad = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(_parse_line(line, root))
            except ValueError as err:
                if not skip_bad:
                    raise ValueError(f"{path} line {n}: {err}") from None
                bad.append(f"line {n}: {err}")
    if bad:
        print(f"load_jsonl: skipped {len(bad)} bad line(s) of {path}, kept {len(examples)} (first: "
              f"{bad[0]})",
              file=sys.stderr)
    return examples


def load_text(path):
    """Plain text -> documents: one per blank-line-separated paragraph (inner newlines kept)."""
    with open(path, encoding="utf-8") as f:
        docs = [p.strip() for p in re.split(r"\n\s*\n", f.read()) if p.strip()]
    if not docs:
        raise ValueError(f"{path}: no text found; expected paragraphs separated by blank lines")
    return docs


# ----------------------------------------------------------------------------------------
# Real tokenizers: saving the role mapping, chat prompts

def save_tokenizer(tokenizer, folder):
    """tokenizer.json + (if load_tokenizer mapped roles to the tokenizer's own tokens) a
    tokenizer_config.json naming them, so load_tokenizer(folder/tokenizer.json) maps them again
    instead of appending new <pad>/<eos> ids. Keys of an existing tokenizer_config.json (a chat
    template, ...) are kept."""
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "tokenizer.json"), tokenizer.save)
    roles = getattr(tokenizer, "role_tokens", {})
    if roles:
        path = os.path.join(folder, "tokenizer_config.json")
        cfg = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        cfg.update({key: roles[role] for role,
                    key in ((EOS_TOKEN, "eos_token"), (PAD_TOKEN, "pad_token")) if role in roles})
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
        atomic_write(path, write)


def load_chat_template(folder):
    """The Hugging Face chat_template (a Jinja string) of a model folder's tokenizer_config.json, or
    None."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):          # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def chat_prompt(user_text, template=None, system=None):
    """One user turn formatted for an instruct model, ending where the assistant's answer
    starts, so prompts for a real teacher are in its own format (the response then ends with
    its <|im_end|>, the eos role load_tokenizer gives SmolLM2-Instruct).

    template=None: ChatML as SmolLM2-Instruct / Qwen2 use it, written out:
        [<|im_start|>system\\n{system}<|im_end|>\\n]
        <|im_start|>user\\n{user_text}<|im_end|>\\n<|im_start|>assistant\\n
    template=a Jinja chat_template string (load_chat_template): rendered with jinja2 in the sandbox
    transformers' apply_chat_template(add_generation_prompt=True) uses; SmolLM2's inserts its
    default system prompt when system is None. "<image>" in user_text stays a tag that
    encode_example replaces by the image tokens."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
               [{"role": "user", "content": user_text}]
    if template is None:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat_prompt(template=...) needs jinja2 (pip install jinja2); "
                          "template=None writes ChatML without it") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)

# ----------------------------------------------------------------------------------------
# Streaming real data
#
# For data too large to hold decoded: StreamDataset indexes LLaVA-style JSONL files (byte
# offset of each line) and The Cauldron / FineVision Parquet files (row numbers; the text
# columns only are read to index) without decoding any image. __getitem__ reads one example
# back, tokenizes it and decodes + resizes its image, in the DataLoader worker. make_loader
# gives batches whose example indices are a pure function of (seed, step), split over DDP
# ranks, starting at any step (resume).
#
# One conversation of n user/assistant turns gives n examples (conversation_examples). The
# context of turn k is every earlier user and assistant text and the k-th user text joined
# by "\n"; its response is the k-th assistant text (the last turn of this is exactly what
# load_jsonl makes of a line; conversation_examples, above). The image belongs to every
# turn's context.

def fit_to_max_len(n_context, n_response, max_len):
    """The max_len rule -> how many response tokens to keep (0: drop the example).

    The context (the prompt with its n_image_tokens image tokens) is never cut. If context +
    response > max_len, the response's tail is cut so the sequence is exactly max_len tokens
    (its <eos> is then lost); if the context alone leaves no room for one response token
    (n_context >= max_len), the example is dropped. max_len=None keeps everything."""
    if max_len is None:
        return n_response
    return max(0, min(n_response, max_len - n_context))


def _open_image(source, what):
    """A file path or encoded bytes -> RGB PIL image; any decoding failure, and a
    decompression bomb (PIL only warns between 1x and 2x MAX_IMAGE_PIXELS), is a ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise ValueError(f"cannot read {what} ({type(err).__name__}: {err}); "
                         "expected a valid image file") from None


def _parquet_turns(cell, row_source, default_source):
    """One Parquet row's texts -> ([(user, assistant), ...], [source per turn])."""
    if not isinstance(cell, list) or not cell:
        raise ValueError(f"expected 'texts' to be a non-empty list of turns, found {cell!r:.80}")
    pairs, sources = [], []
    for turn in cell:
        if not (isinstance(turn, dict) and isinstance(turn.get("user"), str)
                and isinstance(turn.get("assistant"), str)):
            raise ValueError(f"expected each turn of 'texts' as {{'user': str, 'assistant': str}}, "
                             f"found {turn!r:.80}")
        source = turn.get("source") or row_source or default_source
        if not isinstance(source, str):
            raise ValueError(f"expected 'source' to be a string, found {source!r}")
        pairs.append((turn["user"], turn["assistant"]))
        sources.append(source)
    return pairs, sources


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq


class StreamDataset(torch.utils.data.Dataset):
    """Examples of LLaVA JSONL and Cauldron/FineVision Parquet files, read back lazily.

    paths: one file or a list; ".jsonl" files are read as load_jsonl describes (image paths
    relative to image_root, default the file's folder; the file must exist at index time),
    ".parquet" files as The Cauldron / FineVision store them: a 'texts' column (a list of
    {"user", "assistant", "source"?} turns), an optional 'images' column (a list of {bytes,
    path} structs or of binary; at most one image per row here), an optional 'source'
    column. An example's source is its turn's "source", else the row's, else default_source.
    Parquet rows are numbered from 0 within their file, JSONL lines from 1.

    Indexing keeps a few integers per example (file, byte offset or row, turn, source) and no
    text or pixels. turns="all": every assistant turn is an example (conversation_examples);
    "last": the last turn of each conversation only. A bad line or row found while indexing
    is a ValueError naming the file and line/row; with skip_bad it is skipped and counted
    (self.n_bad_index).

    dataset[i] -> {"context", "response": token id lists, "image": (n_views, 3, S, S) or None,
    "grids",
    "source", "index": the example actually returned, "skipped", "dropped", "errors"}. An
    example fit_to_max_len drops (context >= max_len) is replaced by the next index and counted
    in "dropped"; a bad one (unreadable image, too many <image> tags, ...) is a ValueError
    naming file and line/row, or, with skip_bad, replaced by the next index and counted in
    "skipped" (its message in "errors"). Parquet reads whole row groups (a worker caches the
    last cache_row_groups of them): random access is cheap only with small row groups."""

    def __init__(self, paths, tokenizer, n_image_tokens, image_size, max_len=None, image_root=None,
                 turns="all", skip_bad=False, default_source="unknown", cache_row_groups=2,
                 max_skip=1000, image_splitting=None):
        if turns not in ("all", "last"):
            raise ValueError(f"turns must be 'all' or 'last', got {turns!r}")
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.bind(tokenizer, n_image_tokens, image_splitting)
        self.image_size, self.max_len = image_size, max_len
        self.image_root, self.last_only, self.skip_bad = image_root, turns == "last", skip_bad
        self.default_source, self.cache_row_groups = default_source, cache_row_groups
        self.max_skip = max_skip
        self.sources, self.n_bad_index = [], 0
        self._source_id, self._row_groups, cols, bad = {}, {}, [], []
        for f, path in enumerate(self.paths):
            path = os.fspath(path)
            if path.endswith(".jsonl"):
                cols += self._index_jsonl(f, path, bad)
            elif path.endswith(".parquet"):
                cols += self._index_parquet(f, path, bad)
            else:
                raise ValueError(f"{path}: unknown data file type; expected .jsonl or .parquet")
        self.n_bad_index = len(bad)
        if bad:
            print(f"StreamDataset: skipped {len(bad)} bad line(s)/row(s) while indexing "
                  f"(first: {bad[0]})", file=sys.stderr)
        if not cols:
            raise ValueError(f"{', '.join(map(os.fspath, self.paths))}: no examples")
        # one row per example: file, byte offset (JSONL) or row (Parquet), line or row, turn, source
        index = np.array(cols, dtype=np.int64)
        self._file, self._pos, self._where, self._turn, self._src = index.T.copy()
        self._handles = None

    # -- indexing (main process; no image is opened)

    def _source(self, name):
        if name not in self._source_id:
            self._source_id[name] = len(self.sources)
            self.sources.append(name)
        return self._source_id[name]

    def _turn_rows(self, f, pos, where, sources):
        keep = range(len(sources) - 1, len(sources)) if self.last_only else range(len(sources))
        return [(f, pos, where, k, self._source(sources[k])) for k in keep]

    def _root(self, f):
        """Folder that relative image paths of file f start from."""
        if self.image_root is not None:
            return self.image_root
        return os.path.dirname(os.path.abspath(self.paths[f]))

    def _index_jsonl(self, f, path, bad):
        root = self._root(f)
        rows, offset = [], 0
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                pos, offset = offset, offset + len(raw)
                try:
                    line = _decode_utf8(raw)
                    if not line.strip():
                        continue
                    rec = _parse_record(line, root)
                    if isinstance(rec["image"], list):
                        raise ValueError("a list of images; StreamDataset reads one image per "
                                         "example")
                except ValueError as err:
                    if not self.skip_bad:
                        raise ValueError(f"{path} line {n}: {err}") from None
                    bad.append(f"{path} line {n}: {err}")
                    continue
                rows += self._turn_rows(f, pos, n, [rec["source"]] * len(rec["turns"]))
        return rows

    def _index_parquet(self, f, path, bad):
        pq = _pyarrow()
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:            # pyarrow raises its own error types for a bad file
            raise ValueError(f"{path}: cannot read as Parquet ({err})") from None
        names = pf.schema_arrow.names
        if "texts" not in names:
            raise ValueError(f"{path}: no 'texts' column; expected The Cauldron / FineVision "
                             f"layout (columns 'images', 'texts'), found {names}")
        columns = ["texts"] + (["source"] if "source" in names else [])
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        self._row_groups[f] = np.cumsum([0] + sizes)
        rows, row = [], 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=columns)
            texts = table.column("texts").to_pylist()
            row_sources = (table.column("source").to_pylist() if "source" in names
                           else [None] * len(texts))
            for cell, row_source in zip(texts, row_sources):
                try:
                    _, sources = _parquet_turns(cell, row_source, self.default_source)
                except ValueError as err:
                    if not self.skip_bad:
                        raise ValueError(f"{path} row {row}: {err}") from None
                    bad.append(f"{path} row {row}: {err}")
                else:
                    rows += self._turn_rows(f, row, row, sources)
                row += 1
        return rows

    # -- reading back (worker process)

    def __len__(self):
        return len(self._file)

    def bind(self, tokenizer, n_image_tokens, image_splitting=None):
        """Set how examples become tokens. Indexing needs none of it, so a training run can
        check its data files first and bind the student's layout when the student exists
        (tokenizer=None: index only; dataset[i] then fails)."""
        self.tokenizer = tokenizer
        self.role_tokens = dict(getattr(tokenizer, "role_tokens", {}))
        self.pad_id = None if tokenizer is None else special_id(tokenizer, PAD_TOKEN)
        self.n_image_tokens, self.image_splitting = n_image_tokens, image_splitting

    def indices_of(self, sources):
        """The example indices whose source is in `sources` (a stage's share of the data)."""
        wanted = [k for k, name in enumerate(self.sources) if name in set(sources)]
        return np.flatnonzero(np.isin(self._src, wanted)).tolist()

    def source_counts(self):
        """source -> number of examples."""
        counts = np.bincount(self._src, minlength=len(self.sources))
        return {s: int(n) for s, n in zip(self.sources, counts)}

    def __getstate__(self):                 # open files and caches stay in their process
        return {**self.__dict__, "_handles": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tokenizer.role_tokens = self.role_tokens     # a pickled Tokenizer loses its attributes

    def _open(self):
        """This process's open files and row-group cache (a forked worker opens its own)."""
        if self._handles is None or self._handles["pid"] != os.getpid():
            self._handles = {"pid": os.getpid(), "files": {}, "groups": {}}
        return self._handles

    def _read_jsonl(self, f, pos):
        files = self._open()["files"]
        if f not in files:
            files[f] = open(self.paths[f], "rb")
        files[f].seek(pos)
        rec = _parse_record(files[f].readline().decode("utf-8"), self._root(f))
        return rec["turns"], [rec["source"]] * len(rec["turns"]), rec["image"], rec["image"]

    def _read_parquet(self, f, row):
        h = self._open()
        g = int(np.searchsorted(self._row_groups[f], row, side="right") - 1)
        if (f, g) not in h["groups"]:
            if f not in h["files"]:
                h["files"][f] = _pyarrow().ParquetFile(self.paths[f])
            pf = h["files"][f]
            columns = [c for c in ("texts", "source", "images") if c in pf.schema_arrow.names]
            h["groups"][f, g] = pf.read_row_group(g, columns=columns)
            while len(h["groups"]) > self.cache_row_groups:
                del h["groups"][next(iter(h["groups"]))]        # the oldest
        table, j = h["groups"][f, g], row - int(self._row_groups[f][g])
        row_source = table.column("source")[j].as_py() if "source" in table.column_names else None
        texts = table.column("texts")[j].as_py()
        turns, sources = _parquet_turns(texts, row_source, self.default_source)
        images = table.column("images")[j].as_py() if "images" in table.column_names else None
        if len(images or []) > 1:
            raise ValueError(f"{len(images)} images in one row; expected at most 1 "
                             "(one image per example)")
        if not images:
            return turns, sources, None, None
        image = images[0]
        if isinstance(image, dict):
            if image.get("bytes"):
                return turns, sources, image["bytes"], "its image bytes"
            if not image.get("path"):
                raise ValueError("the image has neither 'bytes' nor 'path'")
            image = os.path.join(self._root(f), image["path"])
            return turns, sources, image, image
        if isinstance(image, bytes):
            return turns, sources, image, "its image bytes"
        raise ValueError(f"expected an image as {{bytes, path}} or binary, "
                         f"found {type(image).__name__}")

    def _load(self, i):
        """Example i, or None if fit_to_max_len drops it. ValueError names file and line/row."""
        f, pos, where = int(self._file[i]), int(self._pos[i]), int(self._where[i])
        path = os.fspath(self.paths[f])
        jsonl = path.endswith(".jsonl")
        try:
            read = self._read_jsonl if jsonl else self._read_parquet
            turns, sources, image, what = read(f, pos)
            k = int(self._turn[i])
            prompt, response = conversation_examples(turns)[k]
            example = {"image": image, "prompt": prompt, "response": response, "source": sources[k]}
            views, grids = None, []                 # the grid (tile layout) sets the token count
            if image is not None:
                views, grid = image_views(_open_image(image, f"image {what}"), self.image_size,
                                          self.image_splitting)     # (n_views, 3, S, S)
                grids = [grid]
            context, reply = encode_example(example, self.tokenizer, self.n_image_tokens,
                                            grids if self.image_splitting is not None else None)
            keep = fit_to_max_len(len(context), len(reply), self.max_len)
            if keep == 0:
                return None
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path} {'line' if jsonl else 'row'} {where}: {err}") from None
        return {"context": context, "response": reply[:keep], "image": views, "grids": grids,
                "source": sources[k]}

    def __getitem__(self, i):
        skipped, dropped, errors = 0, 0, []
        for j in range(i, i + self.max_skip + 1):
            j %= len(self)
            try:
                item = self._load(j)
            except ValueError as err:
                if not self.skip_bad:
                    raise
                skipped, errors = skipped + 1, errors + [str(err)]
                continue
            if item is None:
                dropped += 1
                continue
            return {**item, "index": j, "skipped": skipped, "dropped": dropped, "errors": errors}
        raise ValueError(f"no usable example among indices {i}..{i + self.max_skip} "
                         f"(mod {len(self)}): {skipped} bad, {dropped} longer than "
                         f"max_len={self.max_len}"
                         + (f"; first error: {errors[0]}" if errors else ""))

    def collate(self, items):
        """dataset[i] items -> a batch in data.collate's layout, plus "index" (LongTensor),
        "skipped" / "dropped" (ints: bad / too-long examples replaced) and "errors" (messages)."""
        views = [it["image"] for it in items if it["image"] is not None]
        return {**pad_pairs([(it["context"], it["response"]) for it in items], self.pad_id),
                "images": torch.cat(views) if views else None,  # (N_views, 3, S, S)
                "grids": [it["grids"] for it in items],
                "source": [it["source"] for it in items],
                "index": torch.tensor([it["index"] for it in items]),
                "skipped": sum(it["skipped"] for it in items),
                "dropped": sum(it["dropped"] for it in items),
                "errors": [e for it in items for e in it["errors"]]}


class RealData:
    """Real data in place of the tiny world (train.py --data_path): the files' sources, the
    ones in kd_sources language-intensive (KD), the others vision-heavy. The files are indexed
    here (every line/row checked, no image decoded), so bad data fails before any training;
    examples then stream from disk through a StreamDataset, with the student's token layout
    bound by open() once the student exists. No corpus, no built-in benchmarks."""

    def __init__(self, paths, image_size, max_len=None, image_root=None, skip_bad=False,
                 kd_sources=()):
        self.dataset = StreamDataset(paths, None, 0, image_size, max_len=max_len,
                                     image_root=image_root, skip_bad=skip_bad)
        unknown = sorted(set(kd_sources) - set(self.dataset.sources))
        if unknown:
            raise ValueError(f"--kd_sources {unknown} not found in --data_path (sources: "
                             f"{sorted(self.dataset.sources)})")
        self.sources = list(self.dataset.sources)
        self.source_kinds = {s: "language" if s in kd_sources else "vision" for s in self.sources}
        self.corpus, self.language_bench, self.vision_bench, self.knowledge_bench = [], [], [], []

    def open(self, student, tokenizer):
        """The dataset, tokenizing for `student` (its image tokens per view and splitting)."""
        self.dataset.bind(tokenizer, student.n_image_tokens, student.image_splitting)
        return self.dataset


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of example indices that are a pure function of (seed, step).

    The example stream is epoch 0's permutation, then epoch 1's, ... (epoch e:
    np.random.default_rng([seed, e]).permutation(n); shuffle=False: 0..n-1 every epoch, for
    data already shuffled on disk, which reads Parquet row groups in order). Global batch
    `step` is stream[step * G:(step + 1) * G] with G = batch_size * world_size (it may
    straddle two epochs); rank r gets its r-th slice of batch_size. Iteration yields this
    rank's batches from start_step on, until `steps` (None: forever)."""

    def __init__(self, n, batch_size, seed, start_step=0, rank=0, world_size=1, steps=None,
                 shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 examples and batch_size >= 1, "
                             f"got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size, self.steps, self.shuffle = rank, world_size, steps, shuffle
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.n)
                                  if self.shuffle else np.arange(self.n))
        return self._perms[epoch]

    def global_batch(self, step):
        """The example indices of global batch `step`, all ranks' slices in rank order."""
        G = self.batch_size * self.world_size
        pos = np.arange(step * G, (step + 1) * G)
        return np.concatenate([self._perm(e)[pos[pos // self.n == e] % self.n]
                               for e in range(pos[0] // self.n, pos[-1] // self.n + 1)])

    def __iter__(self):
        step = self.start_step
        while self.steps is None or step < self.steps:
            lo = self.rank * self.batch_size
            yield self.global_batch(step)[lo:lo + self.batch_size].tolist()
            step += 1

    def __len__(self):
        if self.steps is None:
            raise TypeError("an endless StepBatchSampler (steps=None) has no length")
        return max(0, self.steps - self.start_step)


def make_loader(dataset, batch_size, seed, start_step=0, rank=0, world_size=1, num_workers=0,
                collate_fn=None, pin_memory=False, steps=None, shuffle=True, timeout=0,
                prefetch_factor=4):
    """DataLoader over `dataset` (a StreamDataset, or any map-style dataset with collate_fn)
    yielding this rank's batch of each step from start_step on (StepBatchSampler; batch_size
    is per rank). Workers (num_workers > 0) decode, resize and collate; they persist across
    epochs and prefetch prefetch_factor batches each. timeout (seconds, workers only): a
    worker that produces nothing for that long is an error instead of a hang. A worker's
    ValueError (bad line, corrupt image) is re-raised in this process with its message."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, rank, world_size, steps,
                               shuffle)
    extra = {}
    if num_workers > 0:
        # the tokenizer's thread pool must not be used across fork; the workers are the parallelism
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor, "timeout": timeout}
    return _StoppingLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                           collate_fn=collate_fn or dataset.collate, pin_memory=pin_memory, **extra)


class _StoppingLoader(torch.utils.data.DataLoader):
    """A DataLoader that stops its workers as soon as iterating raises (a worker's error, a
    timeout, Ctrl-C). Left to garbage collection, an iterator caught in a traceback is torn
    down after its queues, and each worker then takes a 5 s join timeout to die."""

    def __iter__(self):
        it = super().__iter__()
        try:
            yield from it
        except BaseException:
            stop = getattr(it, "_shutdown_workers", None)       # private DataLoader API
            if stop is not None:
                stop()
                self._iterator = None                           # persistent workers: start anew
            raise
