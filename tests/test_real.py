"""Real-weights helpers without real weights: a SmolLM2-like tokenizer (special tokens
<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2), lm-eval's MMLU file shape, multiple-choice
scoring and the real-photo demo, all on tiny synthetic models written to tmp_path."""
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import bigbench
import chat
import data
from scale import weights
import demo_photo
import eval as evaluation
import mmlu
from model import Decoder, LMConfig, grow_vocab
from scale.weights import save_hf_lm

SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-Instruct's chat template (tokenizer_config.json)
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != "
                 "'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                 "trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
                 "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor "
                 "%}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The following are multiple choice questions (with answers) about algebra.",
          "Question: what is two plus two?\nA. three\nB. four\nC. five\nD. six\nAnswer: B",
          "Answer: A", "Answer: B", "Answer: C", "Answer: D",
          "What is in this picture? This is a picture of a cat.",
          "the red circle eats apples . the blue square lives in the forest ."] * 20


def build_smol_like(folder, config=True, template=False):
    """tokenizer.json (+ tokenizer_config.json like SmolLM2-Instruct's) in folder; returns the raw
    Tokenizer."""
    tok = data.train_tokenizer(CORPUS, 420, SMOL_SPECIALS)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if config:
        cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|im_end|>"}
        if template:
            cfg["chat_template"] = SMOL_TEMPLATE
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
    return tok


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("smol"))
    build_smol_like(folder, template=True)
    return folder


@pytest.fixture(scope="module")
def tok(smol_dir):
    return data.load_tokenizer(os.path.join(smol_dir, "tokenizer.json"))


# --------------------------------------------------------------------------- tokenizer

def test_image_token_is_appended_and_no_id_moves(smol_dir, tok):
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(os.path.join(smol_dir, "tokenizer.json"))
    old = raw.get_vocab_size()
    assert [raw.token_to_id(t) for t in SMOL_SPECIALS] == [0, 1, 2]
    vocab = tok.get_vocab()
    assert all(vocab[t] == i for t, i in raw.get_vocab().items())          # every existing id kept
    assert tok.get_vocab_size() == old + 1 and tok.token_to_id(data.IMAGE_TOKEN) == old
    # <eos>/<pad> are the tokenizer's own <|im_end|> (tokenizer_config.json), not new tokens
    assert data.special_id(tok, data.EOS_TOKEN) == 2 and data.special_id(tok, data.PAD_TOKEN) == 2
    assert tok.token_to_id("<eos>") is None and tok.token_to_id("<pad>") is None


def test_roles_override_and_fallbacks(smol_dir, tmp_path):
    path = os.path.join(smol_dir, "tokenizer.json")
    # plain-text documents
    text = data.load_tokenizer(path, roles={data.EOS_TOKEN: "<|endoftext|>"})
    assert data.special_id(text, data.EOS_TOKEN) == 0 and data.special_id(text, data.PAD_TOKEN) == 2
    with pytest.raises(ValueError, match="no token '<\\|nope\\|>'"):
        data.load_tokenizer(path, roles={data.EOS_TOKEN: "<|nope|>"})
    with pytest.raises(ValueError, match="unknown role"):
        data.load_tokenizer(path, roles={"<bos>": "<|im_start|>"})
    # no tokenizer_config.json: the old behaviour
    raw = build_smol_like(str(tmp_path), config=False)
    bare = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    old = raw.get_vocab_size()
    assert [bare.token_to_id(t) for t in data.SPECIAL_TOKENS] == [old, old + 1, old + 2]
    assert all(bare.get_vocab()[t] == i for t, i in raw.get_vocab().items())


def test_special_tokens_encode_to_single_ids(tok):
    img = tok.token_to_id(data.IMAGE_TOKEN)
    ids = tok.encode("<|im_start|>user\nhi<image><|im_end|>\n<|endoftext|>").ids
    assert ids[0] == 1 and ids.count(2) == 1 and ids.count(img) == 1 and ids[-1] == 0
    assert tok.decode(ids,
                      skip_special_tokens=False).startswith("<|im_start|>user\nhi<image><|im_end|>")


def test_chat_prompt_formats(smol_dir, tok):
    assert chat.chat_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.chat_prompt("hi", system="be brief") == (
        "<|im_start|>system\nbe "
        "brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    template = chat.load_chat_template(smol_dir)
    assert template == SMOL_TEMPLATE
    pytest.importorskip("jinja2", reason="jinja2 renders Hugging Face chat templates")
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert chat.chat_prompt("hi", template) == chat.chat_prompt("hi", system=default_system)
    assert chat.chat_prompt("hi", template, system="S") == chat.chat_prompt("hi", system="S")


def test_chat_example_encodes_and_collates(tok):
    prompt = chat.chat_prompt(data.IMAGE_TOKEN + "\nWhat is in this picture?")
    ex = {"image": Image.new("RGB", (20, 10), (9, 99, 199)), "prompt": prompt, "response": " a cat",
          "source": "s"}
    context, response = data.encode_example(ex, tok, 4)
    img = tok.token_to_id(data.IMAGE_TOKEN)
    head = tok.encode("<|im_start|>user\n").ids
    assert context[:len(head)] == head and context[len(head):len(head) + 4] == [img] * 4
    assert context[-3:] == tok.encode("<|im_end|>\n<|im_start|>assistant\n").ids[-3:]
    assert response == tok.encode(" a cat").ids + [2]                         # ends with <|im_end|>
    text = {"image": None, "prompt": chat.chat_prompt("hi"), "response": " a long answer here",
            "source": "s"}
    b = data.collate([ex, text], tok, 4, 16)
    assert (b["input_ids"][b["attention_mask"] == 0] == 2).all()                  # pad = <|im_end|>
    assert b["labels"][0, b["response_mask"][0]].tolist()[-1] == 2


def test_save_tokenizer_keeps_the_role_mapping(tok, tmp_path):
    weights.save_tokenizer(tok, str(tmp_path))
    again = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.get_vocab() == tok.get_vocab()                                   # nothing appended
    assert data.special_id(again,
                           data.EOS_TOKEN) == 2 and data.special_id(again, data.PAD_TOKEN) == 2


# --------------------------------------------------------------------------- multiple-choice files

# two subjects in the exact shape of lm-eval's mmlu/flan_cot_fewshot/_cot_prompts.json (made-up
# questions):
# header, "Q: ...\n(A) .. (B) .." on one line or one option per line, "A: Let's think step by step.
# ... The
# answer is (X).", blocks separated by blank lines; a stray leading newline as some subjects have
MMLU_SHAPE = {
    "high_school_statistics": (
        "The following are multiple choice questions (with answers) about high school "
        "statistics.\n\nQ: If E(X) = 3 and E(Y) = 4, what is E(X + Y)?\n(A) 1 (B) 7 (C) 12 (D) It "
        "cannot be determined.\nA: Let's think step by step. Expectations add, so E(X + Y) = 7, "
        "not (A) or (C). The answer is (B).\n\nQ: A fair coin is tossed twice.\nWhat is the "
        "probability of two heads?\n(A) 1/2 (B) 1/3 (C) 1/4 (D) 1\nA: Let's think step by step. "
        "1/2 * 1/2 = 1/4. The answer is (C).\n\n"),
    "elementary_mathematics": (
        "\nThe following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\nQ: Which expression is equivalent to 2 x 3?\n(A) (2 x 2) + 3\n(B) 3 + "
        "3\n(C) 2 + 3\n(D) (3 x 3) - 2\nA: Let's think step by step. 2 x 3 = 6 = 3 + 3. The answer "
        "is (B).\n\nQ: How many sides has a pentagon?\n(A) 4 (B) 5 (C) 6 (D) 7 (E) 8\n"
        "A: Let's think step by step. A pentagon has five sides. The answer is (B)."),
}


def write(path, obj, jsonl=False):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(o) for o in obj) if jsonl else json.dumps(obj))
    return str(path)


def test_load_mc_file_reads_lm_eval_mmlu_shape(tmp_path):
    items = mmlu.load_mc_file(write(tmp_path / "cot.json", MMLU_SHAPE))
    assert len(items) == 4 and [it["answer"] for it in items] == [1, 2, 1, 1]
    assert items[0]["context"] == (
        "The following are multiple choice questions (with answers) about high school "
        "statistics.\n\nIf E(X) = 3 and E(Y) = 4, what is E(X + Y)?\nA. 1\nB. 7\nC. 12\nD. It "
        "cannot be determined.\nAnswer:")
    assert items[0]["options"] == [" A", " B", " C",
                                   " D"] and items[0]["subject"] == "high school statistics"
    assert "A fair coin is tossed twice.\nWhat is the probability of two heads?\nA. 1/2\n" in items[
        1]["context"]
    assert items[2]["context"].endswith("2 x 3?\nA. (2 x 2) + 3\nB. 3 + 3\nC. 2 + 3\nD. (3 x 3) - "
                                        "2\nAnswer:")
    assert items[3]["options"] == [" A", " B", " C", " D", " E"]


def test_load_mc_file_generic_json_and_jsonl(tmp_path):
    rows = [{"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": 1},
            {"question": "Sky?", "choices": ["green", "blue", "red"], "answer": "B",
             "subject": "world_facts"}]
    for path in (write(tmp_path / "a.json", rows), write(tmp_path / "a.jsonl", rows, jsonl=True)):
        items = mmlu.load_mc_file(path)
        assert items[0] == {"context": "2 + 2 = ?\nA. 3\nB. 4\nAnswer:", "options": [" A", " B"],
                            "answer": 1}
        assert items[1]["answer"] == 1 and items[1]["context"].startswith("The following are "
                                                                          "multiple choice "
                                                                          "questions (with "
                                                                          "answers) about world "
                                                                          "facts.")


def test_load_mc_file_bad_entries_name_file_and_item(tmp_path):
    bad = dict(MMLU_SHAPE)
    bad[
        "elementary_mathematics"] = bad[
            "elementary_mathematics"].replace("\n(A) 4 (B) 5", " 4 or 5")
    with pytest.raises(ValueError,
                       match=r"bad\.json: subject 'elementary_mathematics' question 2: no line "
                                         r"starting with '\(A\) '"):
        mmlu.load_mc_file(write(tmp_path / "bad.json", bad))
    bad["elementary_mathematics"] = MMLU_SHAPE["elementary_mathematics"].replace("The answer is "
                                                                                 "(B).", "(F)")
    with pytest.raises(ValueError, match="question 1: .* no answer"):
        mmlu.load_mc_file(write(tmp_path / "bad.json", bad))
    rows = [{"question": "q", "choices": ["a", "b"], "answer": 0},
            {"question": "q", "choices": ["a", "b"], "answer": 2}]
    with pytest.raises(ValueError,
                       match=r"bad\.jsonl line 2: 'answer' must be a choice index 0\.\.1"):
        mmlu.load_mc_file(write(tmp_path / "bad.jsonl", rows, jsonl=True))
    with pytest.raises(ValueError, match=r"bad2\.json: item 0: expected 'question'"):
        mmlu.load_mc_file(write(tmp_path / "bad2.json", [{"question": "q", "options": ["a", "b"]}]))
    with pytest.raises(ValueError, match="subject -> prompt text"):
        mmlu.load_mc_file(write(tmp_path / "bad3.json", {"x": 1}))


# --------------------------------------------------------------------------- scoring

def tiny_lm(tok, seed=0):
    torch.manual_seed(seed)
    return Decoder(LMConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=2, n_heads=4,
                            n_kv_heads=2, ffn_dim=64, tie_embeddings=False)).eval()


def mc_items(tmp_path):
    rows = [{"question": f"Question {k}: what is two plus {k}?",
             "choices": ["three", "four", "five", "six"], "answer": k % 4} for k in range(6)]
    return mmlu.load_mc_file(write(tmp_path / "mc.json", rows))


@torch.no_grad()
def direct_score(model, tok, context, option):
    """Mean log-prob of the option's tokens after the context: one unpadded row."""
    c, o = tok.encode(context).ids, tok.encode(option).ids
    logits, _ = model(torch.tensor([c + o]))
    logp = torch.log_softmax(logits[0, len(c) - 1:-1].float(), -1)
    return float(logp[torch.arange(len(o)), torch.tensor(o)].mean())


def test_scores_match_a_direct_computation(tok, tmp_path):
    model, items = tiny_lm(tok), mc_items(tmp_path)
    assert all(len(tok.encode(o).ids) == 1 for o in items[0]["options"])      # single-token options
    # multi-token path
    words = [{**it, "options": [" three", " four", " five", " six plus"]} for it in items]
    assert any(len(tok.encode(o).ids) > 1 for o in words[0]["options"])
    for its in (items, words, items[:3] + words[3:]):
        r = evaluation.multiple_choice(model, tok, its, batch_size=4)
        want = [[direct_score(model, tok, it["context"], o) for o in it["options"]] for it in its]
        assert np.allclose(r["scores"], want, atol=1e-4)
        assert r["pred"] == [int(np.argmax(w)) for w in want]


def test_share_context_matches_the_plain_path(tok):
    """bigbench.shared_context_scores (each context prefilled once, options continued from its K/V) gives the
    plain path's scores, picks and accuracy: contexts of different lengths (one of a single token,
    so its prefix is all padding), 2-5 options of different token lengths (an empty one too), and
    batch sizes below, at and above the number of items / rows."""
    model = tiny_lm(tok)
    items = [
        {"context": "Question: what is two plus two?\nA. three\nB. four\nC. five\nD. six\n"
                    "Answer:", "options": [" A", " B", " C", " D"], "answer": 1, "split": "x"},
        {"context": "Answer", "options": [":", " cat", " picture of a cat."], "answer": 0},
        {"context": "The following are multiple choice questions (with answers) about",
         "options": [" algebra.", " the red circle eats apples", "", " four", " B"], "answer": 0,
         "split": "y"},
        {"context": "What is in this picture? This is a", "options": [" picture of a cat.", " dog"],
         "answer": 1},
        {"context": "the blue square lives in the", "options": [" forest .", " apples", " five"],
         "answer": 0, "split": "x"},
    ]
    lengths = {len(tok.encode(o).ids) for it in items for o in it["options"]}
    assert {0, 1}.issubset(lengths) and max(lengths) >= 4
    assert len({len(tok.encode(it["context"]).ids) for it in items}) == len(items)
    assert len(tok.encode("Answer").ids) == 1
    want = evaluation.multiple_choice(model, tok, items, batch_size=64)
    for batch_size in (1, 2, 3, 64):
        got = evaluation.multiple_choice(model, tok, items, batch_size=batch_size,
                                         scorer=bigbench.shared_context_scores)
        assert {k for k in got} == {k for k in want}
        for a, b in zip(got["scores"], want["scores"]):
            assert np.allclose(a, b, atol=1e-5)
        assert got["pred"] == want["pred"]
        assert {k: v for k, v in got.items() if k != "scores"} == \
            {k: v for k, v in want.items() if k != "scores"}
    # every context a single token: no prefix at all (past_kv None)
    short = [{"context": "Answer", "options": [" A", " B plus", ":"], "answer": 2},
             {"context": "Question", "options": [":", " what is two"], "answer": 0}]
    assert all(len(tok.encode(it["context"]).ids) == 1 for it in short)
    want = evaluation.multiple_choice(model, tok, short)
    got = evaluation.multiple_choice(model, tok, short, batch_size=2,
                                     scorer=bigbench.shared_context_scores)
    assert np.allclose(sum(got["scores"], []), sum(want["scores"], []), atol=1e-5)
    assert got["pred"] == want["pred"] and not model.training


def test_multiple_choice_picks_the_option_the_model_is_forced_to_prefer(tok, tmp_path):
    """Zero every attention/MLP output: the residual stream is the token's embedding, so the
    next-token
    logits depend on the last token only; a head row aligned with ":"'s normalised embedding forces
    " C"."""
    model, items = tiny_lm(tok), mc_items(tmp_path)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        last = tok.encode(items[0]["context"]).ids[-1]
        assert all(tok.encode(it["context"]).ids[-1] == last for it in items)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.encode(" C").ids[0]] = 5 * model.norm(model.embed.weight[last])
    r = evaluation.multiple_choice(model, tok, items, batch_size=4)
    assert r["pred"] == [2] * len(items) and r["correct"] == sum(it["answer"] == 2 for it in items)
    assert r["n"] == len(items) and r["chance"] == 0.25 and not model.training


def hf_folder(tmp_path, tok_dir):
    """A tiny HF-layout model folder with the SmolLM2-like tokenizer (vocabulary WITHOUT
    <image>)."""
    from tokenizers import Tokenizer
    folder = str(tmp_path / "lm")
    vocab = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    save_hf_lm(Decoder(LMConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=64)), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok_dir, name)) as src, open(os.path.join(folder, name), "w") as dst:
            dst.write(src.read())
    return folder


def test_mc_command_line(tmp_path, smol_dir, capsys):
    folder = hf_folder(tmp_path, smol_dir)
    mmlu.main([f"--mc={write(tmp_path / 'cot.json', MMLU_SHAPE)}", f"--ckpt={folder}",
               "--batch_size=2"])
    out = capsys.readouterr().out
    assert "accuracy" in out and "n 4," in out
    with pytest.raises(ValueError, match="expected --mc=FILE and --ckpt"):
        mmlu.main([f"--mc={tmp_path / 'cot.json'}"])


# --------------------------------------------------------------------------- real-photo demo path

def test_grow_vocab_keeps_rows_and_appends_the_mean(tok):
    dec = tiny_lm(tok)
    grown = grow_vocab(dec, dec.cfg.vocab_size + 1)
    assert torch.equal(grown.embed.weight[:-1], dec.embed.weight)
    assert torch.allclose(grown.embed.weight[-1], dec.embed.weight.mean(0))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(grown(ids)[0][..., :-1], dec(ids)[0], atol=1e-5)


def test_demo_real_photo_runs_on_a_tiny_teacher(tmp_path, smol_dir, capsys):
    folder = hf_folder(tmp_path, smol_dir)
    rng = np.random.default_rng(0)
    wheel = tmp_path / "scikit_image-0-py3-none-any.whl"   # photos come from a wheel's skimage/data
    with zipfile.ZipFile(wheel, "w") as z:
        for name, size in (("chelsea.png", (45, 30)), ("coffee.png", (40, 40))):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3),
                                         dtype=np.uint8)).save(buf, "PNG")
            z.writestr(f"skimage/data/{name}", buf.getvalue())
    paths = demo_photo.skimage_photos(wheel=str(wheel), out_dir=str(tmp_path / "photos"))
    assert [os.path.basename(p) for p in paths] == ["chelsea.png",
                                                    "coffee.png"] and all(
                                                        map(os.path.isfile, paths))
    out = demo_photo.demo_real_photo(folder, paths, image_size=32)
    text = capsys.readouterr().out
    assert out[
        "image_token_id"] == out[
            "teacher_vocab"] and out["student_vocab"] == out["teacher_vocab"] + 1
    assert out["image_tokens"] == 16 and out["max_abs_student_vs_teacher_full"] < 1e-4
    assert "teacher via student KV" in text and "peak RSS" in text
