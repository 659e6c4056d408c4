"""
The tiny world: a deterministic miniature in which LinguDistill's degradation and recovery show on
a CPU in minutes (no downloads). build_world(seed) -> World.

- entities = colour x shape, drawn as small RGB images (position/size jitter). Each has
  text-only knowledge no image shows: a made-up name, a food, a home.
- the stage-1 corpus states those facts in several templates, with the name OR the
  description as subject ("kabol eats apples .", "the red circle eats apples ."), plus Q&A,
  one-sentence stories, arithmetic and word facts. Every document is one unit ending in
  " ."; data.encode_corpus puts <eos> after each, so the teacher learns to stop where a
  response stops.
- multimodal prompts use the corpus format with the image where the subject stands:
  "<image> eats" -> " apples ." (knowledge_vqa: the answer needs the image AND the text
  knowledge, so the KV handoff can matter); "<image> is coloured" -> " red ." (vision).
- held out: per entity and fact, one template never appears in training; the language
  benchmark asks exactly those. Benchmark images are fresh renders (layouts no training
  image has). Language sources cover only "seen" entities; the benchmark reports
  seen/unseen (KD's gain is mostly on unseen entities).
- a validation split (issue 31): a fixed fifth of the seen and of the unseen entities
  (VAL_FRACTION, drawn from its own RNG stream, so no training example and no benchmark item
  changes) are validation entities; every benchmark item about one of them is a validation
  item, every other item a test item. World.bench(name, part) gives either part; settings are
  chosen on "val", results are reported on "test" (eval.evaluate_models' default).
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data import IMAGE_TOKEN

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
VAL_FRACTION = 0.2          # of the seen and of the unseen entities: the validation entities
BENCHES = ("language_bench", "vision_bench", "knowledge_bench")
PARTS = ("test", "val", "all")

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
    """Everything build_world makes. Examples: {"image", "prompt", "response", "source"} and,
    with an image, "desc" (the words for what it shows, "the red circle": eval.transfer);
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
    # bench name -> "val" / "test" per item of that benchmark (the validation split); empty:
    # every item is a test item
    parts: dict = None
    kd_sources: tuple = ()  # given: only these sources get KD (the gate's table, gate_kinds)

    def bench(self, name, part="test"):
        """The items of benchmark `name` (BENCHES) in `part`: "test" (what results report),
        "val" (what settings are chosen on) or "all"."""
        if name not in BENCHES or part not in PARTS:
            raise ValueError(f"bench({name!r}, {part!r}): expected a name of {BENCHES} and a "
                             f"part of {PARTS}")
        items = getattr(self, name)
        if part == "all":
            return items
        labels = (self.parts or {}).get(name) or ["test"] * len(items)
        return [it for it, p in zip(items, labels) if p == part]

    @property
    def val_entities(self):
        return [e.name for e in self.entities if getattr(e, "val", False)]

    @property
    def gate_kinds(self):
        """source -> kind for the KD gate only (distill.table_from_kinds): SOURCE_KINDS, or with
        kd_sources (train.py --kd_sources) those sources "language" and the others "vision". The
        stage mixtures keep reading source_kinds, so --kd_sources changes the KD and nothing
        else."""
        if not self.kd_sources:
            return SOURCE_KINDS
        return {s: "language" if s in self.kd_sources else "vision" for s in SOURCE_KINDS}

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
            "source": source, "desc": e.desc}


def _knowledge_example(e, relation, template, scenes, fresh=False):
    prompt, response = fact(TEMPLATES[relation][template], IMAGE_TOKEN, e.value(relation))
    return {"image": scenes.draw(e, "single", fresh)[1], "prompt": prompt, "response": response,
            "source": "knowledge_vqa", "desc": e.desc}


def _mc_item(e, relation, kind, entities, rng):
    context, _ = fact(TEMPLATES[relation][e.held_out[relation, kind]], e.subject(kind), "")
    pool = {"food": FOODS, "home": HOMES, "name": [x.name for x in entities]}[relation]
    options = [f" {v}"
               for v in rng.choice([v for v in pool if v != e.value(relation)], 3, replace=False)]
    answer = int(rng.integers(4))
    options.insert(answer, f" {e.value(relation)}")
    return {"context": context, "options": options, "answer": answer,
            "split": "seen" if e.seen else "unseen"}


def _validation_entities(seed, entities, fraction=VAL_FRACTION):
    """The validation entities: round(fraction * n) of the seen and of the unseen ones (at least
    one of each group of two or more, never a whole group), drawn from the world's own RNG
    stream 4, which nothing else reads. Returns their indices."""
    rng, val = np.random.default_rng([seed, 4]), set()
    for group in ([i for i, e in enumerate(entities) if e.seen],
                  [i for i, e in enumerate(entities) if not e.seen]):
        k = min(len(group) - 1, max(1, round(fraction * len(group)))) if len(group) > 1 else 0
        val.update(int(group[j]) for j in rng.permutation(len(group))[:k])
    return val


def build_world(seed=0, n_entities=40, image_size=32, examples_per_source=600, seen_fraction=0.5,
                kd_sources=()):
    """The whole tiny world from one seed; same arguments -> byte-identical data. kd_sources:
    the sources the KD gate gives weight (World.gate_kinds; empty: SOURCE_KINDS' language
    ones)."""
    unknown = sorted(set(kd_sources) - set(SOURCE_KINDS))
    if unknown:
        raise ValueError(f"--kd_sources {unknown} are not tiny-world sources (sources: "
                         f"{sorted(SOURCE_KINDS)})")
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
    val = _validation_entities(seed, entities)
    for i, e in enumerate(entities):
        e.val = i in val                   # an attribute, not a field: Entity's repr is unchanged
    part = lambda i: "val" if i in val else "test"
    return World(
        seed, image_size, entities, corpus, sources,
        language_bench=[_mc_item(e, rel, kind, entities, pick) for e in entities for rel,
                        kind in BENCH_FACTS],
        vision_bench=[_vision_example(s, e, scenes, fresh=True) for s in VISION_PROMPTS
                      for e in entities],
        knowledge_bench=[{**_knowledge_example(e, rel, 0, scenes, fresh=True),
                          "split": "seen" if e.seen else "unseen"}
                         for e in entities for rel in ("food", "home")],
        parts={"language_bench": [part(i) for i in range(n_entities) for _ in BENCH_FACTS],
               "vision_bench": [part(i) for _ in VISION_PROMPTS for i in range(n_entities)],
               "knowledge_bench": [part(i) for i in range(n_entities) for _ in range(2)]},
        kd_sources=tuple(kd_sources))
