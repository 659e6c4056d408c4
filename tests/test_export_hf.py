"""tools/export_hf.py: a student VLM whose <image> id was appended to a SmolLM2-like tokenizer
exports as a Hugging Face folder that transformers loads with our logits; --drop_image_row
gives the teacher's shape and tokenizer file."""
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers",
                                   reason="transformers not installed (requirements-dev.txt)")

sys.path.insert(0,
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import export_hf               # noqa: E402

import data                    # noqa: E402
from scale import weights  # noqa: E402
from model import LMConfig, VLM, VisionConfig   # noqa: E402
from scale.weights import save_vlm, save_hf_lm         # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "Question: what does the red circle eat? Answer: apples ."


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    folder = str(tmp_path_factory.mktemp("student"))
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|im_end|>", "chat_template": "{{ x }}"}, f)
    raw_path = os.path.join(folder, "raw_tokenizer.json")
    raw.save(raw_path)
    tok = data.load_tokenizer(os.path.join(folder, "tokenizer.json"))          # appends <image>
    base = raw.get_vocab_size()
    assert tok.token_to_id(data.IMAGE_TOKEN) == base
    torch.manual_seed(0)
    vlm = VLM(LMConfig(vocab_size=base + 1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       max_positions=64, tie_embeddings=False),
              VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
              base)
    save_vlm(vlm, folder)
    weights.save_tokenizer(tok, folder)
    return folder, vlm.decoder.eval(), tok, base, raw_path


def hf_logits(folder, text):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf_tok(text)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0], ids, hf_tok


def test_export_keeps_the_image_row(student, tmp_path):
    folder, decoder, tok, base, _ = student
    info = export_hf.export(folder, str(tmp_path))
    assert info["kind"] == "vlm" and info["vocab_size"] == base + 1
    logits, ids, hf_tok = hf_logits(str(tmp_path), TEXT)
    assert ids == tok.encode(TEXT).ids                         # no BOS, same tokens
    ours, _ = decoder(torch.tensor([ids]))
    torch.testing.assert_close(logits, ours[0], atol=1e-5, rtol=1e-5)
    assert hf_tok.convert_tokens_to_ids(
        data.IMAGE_TOKEN) == base and hf_tok.eos_token == "<|im_end|>"
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg[
        "eos_token_id"] == cfg[
            "pad_token_id"] == tok.token_to_id("<|im_end|>") and cfg["bos_token_id"] == 1
    assert json.load(open(tmp_path / "tokenizer_config.json"))["chat_template"] == "{{ x }}"
    again = data.load_tokenizer(str(tmp_path / "tokenizer.json"))  # our loader maps the roles again
    assert again.get_vocab_size() == tok.get_vocab_size() and data.special_id(
        again, data.EOS_TOKEN) == 2


def test_export_drop_image_row_has_the_teacher_shape(student, tmp_path):
    folder, decoder, tok, base, raw_path = student
    info = export_hf.export(folder, str(tmp_path), drop_image_row=True)
    assert info["vocab_size"] == base and info["dropped_rows"] == [base]
    from tokenizers import Tokenizer
    written, raw = Tokenizer.from_file(str(tmp_path
                                           / "tokenizer.json")), Tokenizer.from_file(raw_path)
    assert written.get_vocab() == raw.get_vocab() and written.token_to_id(data.IMAGE_TOKEN) is None
    logits, ids, _ = hf_logits(str(tmp_path), TEXT)
    ours, _ = decoder(torch.tensor([ids]))
    # same logits, one row fewer
    torch.testing.assert_close(logits, ours[0, :, :base], atol=1e-5, rtol=1e-5)


def test_export_an_hf_lm_folder_and_refusals(student, tmp_path):
    folder, decoder, tok, base, _ = student
    save_hf_lm(decoder, str(tmp_path / "lm"))
    weights.save_tokenizer(tok, str(tmp_path / "lm"))
    assert export_hf.export(str(tmp_path / "lm"), str(tmp_path / "out"))["kind"] == "hf"
    with pytest.raises(ValueError, match="differ"):
        export_hf.export(folder, folder)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_hf.export(str(tmp_path / "out2"), str(tmp_path / "x"))
