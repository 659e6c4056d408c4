"""data.py: the tiny world is deterministic and leak-free, and batches have the layout
kvshare.py expects (contexts left-padded to P, responses right-padded to R)."""
import hashlib
import json
import re

import pytest
import torch
from PIL import Image

import data
from scale import tiles
import world as tinyworld
from conftest import load_jsonl


@pytest.fixture(scope="module")
def world():
    return tinyworld.build_world(0)            # the defaults train.py uses: the data actually trained on


@pytest.fixture(scope="module")
def tok(world):
    return data.train_tokenizer(world.corpus, 512)


def digest(world):
    """sha256 over every string, label and image byte of a world."""
    h = hashlib.sha256()
    h.update(repr([vars(e) for e in world.entities]).encode())
    h.update(repr((world.corpus, world.language_bench)).encode())
    examples = [ex for exs in world.sources.values()
                for ex in exs] + world.vision_bench + world.knowledge_bench
    for ex in examples:
        h.update(repr(sorted((k, v) for k, v in ex.items() if k != "image")).encode())
        h.update(b"-" if ex["image"] is None else ex["image"].tobytes())
    return h.hexdigest()


def training_examples(world):
    return [ex for exs in world.sources.values() for ex in exs]


# --------------------------------------------------------------------------- the world

def test_same_seed_same_bytes_other_seed_other_bytes(world):
    assert digest(tinyworld.build_world(0)) == digest(world)
    assert digest(tinyworld.build_world(1)) != digest(world)


def test_source_kinds_cover_every_source(world):
    assert set(world.sources) == set(tinyworld.SOURCE_KINDS)
    assert set(tinyworld.SOURCE_KINDS.values()) == {"vision", "language"}
    for name, examples in world.sources.items():
        assert examples and all(ex["source"] == name for ex in examples)
    assert {ex["source"] for ex in world.vision_bench} == {s for s,
                                                           k in tinyworld.SOURCE_KINDS.items()
                                                           if k == "vision"}
    with_image = {s for s,
                  exs in world.sources.items() if all(ex["image"] is not None for ex in exs)}
    text_only = {s for s, exs in world.sources.items() if all(ex["image"] is None for ex in exs)}
    language = {s for s, k in tinyworld.SOURCE_KINDS.items() if k == "language"}
    assert language & with_image and language & text_only     # a handoff source and a text-only one


def test_benchmark_items_never_appear_in_training(world):
    texts = world.corpus + [ex["prompt"] + ex["response"] for ex in training_examples(world)]
    haystack = "\n".join(f" {t} " for t in texts)
    for item in world.language_bench:
        assert f" {item['context']}{item['options'][item['answer']]} " not in haystack, item
    train_images = {ex["image"].tobytes() for ex in training_examples(world)
                    if ex["image"] is not None}
    bench_images = [ex["image"].tobytes() for ex in world.vision_bench + world.knowledge_bench]
    assert not train_images & set(bench_images)
    assert len(set(bench_images)) == len(bench_images)


def test_benchmark_facts_are_taught_in_the_other_templates(world):
    corpus = set(world.corpus)
    for e in world.entities:
        for rel, kind in tinyworld.BENCH_FACTS:
            for t, template in enumerate(tinyworld.TEMPLATES[rel]):
                sentence = "".join(tinyworld.fact(template, e.subject(kind), e.value(rel)))
                assert (sentence in corpus) == (t != e.held_out[rel, kind]), sentence


def test_language_sources_name_only_seen_entities(world):
    language_text = " ".join(ex["prompt"] + ex["response"] for s, exs in world.sources.items()
                             if tinyworld.SOURCE_KINDS[s] == "language" for ex in exs)
    words = set(re.findall(r"[a-z]+", language_text))
    for e in world.entities:
        assert (e.name in words) == e.seen, e.name
    assert sum(e.seen for e in world.entities) == len(world.entities) // 2       # seen_fraction 0.5
    assert {it["split"] for it in world.language_bench} == {"seen", "unseen"}
    assert {it["split"] for it in world.knowledge_bench} == {"seen", "unseen"}


def test_knowledge_vqa_answer_needs_the_image(world):
    """No name, colour or shape in the prompt: only the image says which entity is meant."""
    clues = {w for e in world.entities for w in (e.name, e.colour, e.shape)}
    for ex in world.sources["knowledge_vqa"] + world.knowledge_bench:
        assert ex[
            "prompt"].startswith(
                data.IMAGE_TOKEN) and not clues & set(ex["prompt"].split()), ex["prompt"]


def test_multiple_choice_items_are_well_formed(world):
    for item in world.language_bench:
        assert len(item["options"]) == 4 == len(set(item["options"])) and 0 <= item["answer"] < 4
        assert all(o.startswith(" ") for o in item["options"])


def test_every_document_and_response_ends_a_sentence(world, tok):
    """The teacher sees <eos> after every " ." (encode_corpus), so it can end a response too."""
    assert all(doc.endswith(" .") for doc in world.corpus)
    assert all(ex["response"].endswith(" .") for ex in training_examples(world)
               + world.vision_bench)
    stream = data.encode_corpus(world.corpus, tok)
    assert int((stream == tok.token_to_id(data.EOS_TOKEN)).sum()) == len(world.corpus)
    assert int(stream[-1]) == tok.token_to_id(data.EOS_TOKEN)


def test_world_arguments_are_checked():
    with pytest.raises(ValueError, match="n_entities must be in"):
        tinyworld.build_world(0, n_entities=49)
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        tinyworld.build_world(0, image_size=8)


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_save_reload_and_special_tokens(world, tok, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    again = data.load_tokenizer(path)
    text = "<image> eats apples . question : what is one plus two ? answer : three .<eos>"
    assert again.encode(text).ids == tok.encode(text).ids
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2]
    assert data.train_tokenizer(world.corpus, 512).get_vocab() == tok.get_vocab()   # deterministic


def test_load_tokenizer_adds_missing_special_tokens(world, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.train_from_iterator(world.corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    bare.save(str(tmp_path / "bare.json"))
    tok = data.load_tokenizer(str(tmp_path / "bare.json"))
    ids = [tok.token_to_id(t) for t in data.SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == 3
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        data.train_tokenizer(world.corpus, 100)


# --------------------------------------------------------------------------- encoding

def test_encode_example_tokenizes_like_the_corpus(world, tok):
    """A prompt/response split must not change tokenization: "<image> eats" + " apples ." gives
    the ids of "... eats apples ." after the image, and a text prompt + response the ids of the
    text."""
    n_img = 5
    subject = world.entities[0].desc
    for ex in world.sources["knowledge_vqa"][:100] + world.knowledge_bench + world.vision_bench:
        context, response = data.encode_example(ex, tok, n_img)
        assert context[:n_img] == [tok.token_to_id(data.IMAGE_TOKEN)] * n_img
        assert response[-1] == tok.token_to_id(data.EOS_TOKEN)
        sentence = ex["prompt"].replace(data.IMAGE_TOKEN, subject) + ex["response"]
        assert tok.encode(subject).ids + context[n_img:] + response[:-1] == tok.encode(sentence).ids
    for ex in world.sources["text_qa"]:
        context, response = data.encode_example(ex, tok, n_img)
        assert context + response[:-1] == tok.encode(ex["prompt"] + ex["response"]).ids
    for item in world.language_bench:
        for option in item["options"]:
            assert tok.encode(
                item[
                    "context"]).ids + tok.encode(
                        option).ids == tok.encode(item["context"] + option).ids


def test_encode_example_rejects_mismatched_image_tags(tok):
    with pytest.raises(ValueError, match="1 <image> tags for 0 image"):
        data.encode_example({"image": None, "prompt": "<image> eats", "response": " x",
                             "source": "s"}, tok, 4)
    with pytest.raises(ValueError, match="empty context"):
        data.encode_example({"image": None, "prompt": "", "response": " x", "source": "s"}, tok, 4)


def make_examples(world):
    img = world.sources["colour"][0]["image"]
    # no tag: image first
    return [
        {"image": img, "prompt": "<image> eats", "response": " apples .",
         "source": "knowledge_vqa"},
        {"image": None, "prompt": "question : what is one plus two ? answer :",
         "response": " three .", "source": "text_qa"},
        {"image": Image.new("RGB", (20, 20), (255, 0, 0)), "prompt": " is coloured",
         "response": " red and very very red .", "source": "colour"},
    ]


def test_collate_layout(world, tok):
    examples, n_img, pad = make_examples(world), 4, tok.token_to_id(data.PAD_TOKEN)
    b = data.collate(examples, tok, n_img, 32)
    pairs = [data.encode_example(ex, tok, n_img) for ex in examples]
    P, R = max(len(c) for c, _ in pairs), max(len(r) for _, r in pairs)
    assert b["context_len"] == P and b["input_ids"].shape == b["attention_mask"].shape == (3, P + R)
    for i, (c, r) in enumerate(pairs):
        row, m = b["input_ids"][i].tolist(), b["attention_mask"][i].tolist()
        assert row == [pad] * (P - len(c)) + c + r + [pad] * (R - len(r))     # left / right padding
        assert m == [0] * (P - len(c)) + [1] * (len(c) + len(r)) + [0] * (R - len(r))
    assert (b["attention_mask"][:, P - 1] == 1).all()                    # every context ends at P-1
    assert torch.equal(b["labels"], b["input_ids"][:, P:])
    assert torch.equal(b["response_mask"], b["attention_mask"][:, P:].bool())
    assert b["source"] == [ex["source"] for ex in examples]
    assert (
        b["input_ids"] == tok.token_to_id(data.IMAGE_TOKEN)).sum(1).tolist() == [n_img, 0, n_img]
    c2 = pairs[2][0]
    assert b["input_ids"][2,
                          P - len(c2):P - len(c2)
                          + n_img].eq(tok.token_to_id(data.IMAGE_TOKEN)).all()
    assert b["images"].shape == (2, 3, 32, 32) and b["images"].dtype == torch.float32
    assert torch.equal(b["images"][0], tiles.image_to_tensor(examples[0]["image"], 32))
    # background
    assert b["images"][0, :, 0, 0].tolist() == pytest.approx([(25 / 255 - 0.5) / 0.5] * 3)
    assert b["images"][1, :, 10, 10].tolist() == pytest.approx([1.0, -1.0, -1.0])      # resized red


def test_collate_text_only_batch_and_max_len(world, tok):
    text = make_examples(world)[1]
    b = data.collate([text], tok, 4, 32)
    assert b["images"] is None
    P = b["context_len"]
    cut = data.collate([text], tok, 4, 32, max_len=P + 1)
    assert cut["input_ids"].shape == (1, P + 1) and torch.equal(cut["input_ids"],
                                                                b["input_ids"][:, :P + 1])
    with pytest.raises(ValueError, match="no room for its response"):
        data.collate([text], tok, 4, 32, max_len=P)


# --------------------------------------------------------------------------- real data

@pytest.fixture
def jsonl_dir(tmp_path):
    Image.new("RGB", (8, 8), (0, 128, 255)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


GOOD = [
    {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                          {"from": "gpt", "value": "Blue."}], "source": "vqa"},
    {"prompt": "2+2=", "response": "4"},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                       {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]},
]


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                              for line in lines) + "\n\n")
    return str(path)


def test_load_jsonl_reads_llava_and_prompt_response_lines(jsonl_dir):
    examples = load_jsonl(write_jsonl(jsonl_dir / "good.jsonl", GOOD))
    assert [(ex["prompt"], ex["response"], ex["source"]) for ex in examples] == [
        ("<image>\nWhat colour?", "Blue.", "vqa"), ("2+2=", "4", "unknown"),
        ("Hi\nHello\nBye", "Ciao", "unknown")]
    assert examples[
        0]["image"].mode == "RGB" and examples[0]["image"].getpixel((0, 0)) == (0, 128, 255)
    assert examples[1]["image"] is None


@pytest.mark.parametrize("bad_line,expected", [
    ("{not json", "bad JSON"),
    ({"prompt": "hi"}, "missing field: expected 'conversations' or string 'prompt' and 'response'"),
    ({"conversations": [{"from": "gpt", "value": "x"}]}, "alternating human/gpt turns"),
    ({"image": "missing.png", "prompt": "<image> hi", "response": "x"}, "image file not found"),
    ({"image": "corrupt.png", "prompt": "<image> hi", "response": "x"}, "cannot read image"),
    ({"prompt": "<image> hi", "response": "x"}, "names no 'image'"),
])
def test_load_jsonl_bad_line_names_file_and_line(jsonl_dir, bad_line, expected):
    path = write_jsonl(jsonl_dir / "bad.jsonl", [GOOD[1], bad_line, GOOD[1]])
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert "bad.jsonl line 2: " in str(err.value) and expected in str(err.value)


def test_load_jsonl_skip_bad_counts_skipped_lines(jsonl_dir, capsys):
    path = write_jsonl(jsonl_dir / "mixed.jsonl", [GOOD[1], "{oops", {"prompt": 1}, GOOD[0],
                                                   {"image": "corrupt.png", "prompt": "a",
                                                    "response": "b"}])
    examples = load_jsonl(path, skip_bad=True)
    assert len(examples) == 2
    assert "skipped 3 bad line(s)" in capsys.readouterr().err


# --------------------------------------------------------------------------- validation split

def test_validation_split_holds_out_whole_entities_of_every_benchmark(world):
    val = set(world.val_entities)
    seen = {e.name for e in world.entities if e.seen}
    assert len(val & seen) == 4 and len(val - seen) == 4          # a fifth of each group of 20
    names = {e.desc: e.name for e in world.entities}
    for bench in tinyworld.BENCHES:
        test, held = world.bench(bench), world.bench(bench, "val")
        assert len(test) + len(held) == len(getattr(world, bench)) == len(world.bench(bench, "all"))
        assert len(held) == len(getattr(world, bench)) * 8 // 40
        if bench == "language_bench":              # the context names the entity or describes it
            about = lambda it: next(n for d, n in names.items()
                                    if n in it["context"].split(" ") or d in it["context"])
        else:
            about = lambda it: names[it["desc"]]
        assert all(about(it) in val for it in held) and not any(about(it) in val for it in test)
        if bench != "vision_bench":                 # both splits keep seen and unseen entities
            assert {it["split"] for it in held} == {it["split"] for it in test} == {"seen",
                                                                                    "unseen"}
    with pytest.raises(ValueError, match="bench"):
        world.bench("language_bench", "train")


def test_validation_split_changes_no_training_example_and_no_benchmark_item(world):
    """The split draws from its own RNG stream: the world is the one the code before the split
    built (its items are all there, in order), and the split is the same on every build."""
    again = tinyworld.build_world(0)
    assert again.val_entities == world.val_entities and again.parts == world.parts
    assert tinyworld.build_world(1).val_entities != world.val_entities
    plain = {k: v for k, v in vars(world).items() if k not in ("parts", "kd_sources")}
    assert set(plain) == {"seed", "image_size", "entities", "corpus", "sources",
                          "language_bench", "vision_bench", "knowledge_bench"}
    small = tinyworld.build_world(0, n_entities=4)          # groups of two: one val entity each
    assert len(small.val_entities) == 2
    assert len(small.bench("language_bench")) == len(small.bench("language_bench", "val")) == 10


def test_kd_sources_change_the_gate_kinds_only(world):
    assert world.gate_kinds == world.source_kinds == tinyworld.SOURCE_KINDS
    only_text = tinyworld.build_world(0, kd_sources=["text_qa"])
    assert only_text.source_kinds == tinyworld.SOURCE_KINDS     # the stage mixtures' input
    assert only_text.gate_kinds == {s: "language" if s == "text_qa" else "vision"
                                    for s in tinyworld.SOURCE_KINDS}
    assert only_text.sources["knowledge_vqa"][0]["prompt"] == world.sources["knowledge_vqa"][0][
        "prompt"]
    with pytest.raises(ValueError, match=r"--kd_sources \['nope'\] are not tiny-world sources"):
        tinyworld.build_world(0, kd_sources=["nope"])
