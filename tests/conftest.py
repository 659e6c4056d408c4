import os
import sys

import pytest
import torch

# Tests import the flat top-level modules (model.py, kvshare.py, ...) from the repo root and
# the research tools (tools/experiment.py, tools/mmlu.py, ...) from tools/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tools"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_teacher_and_jsonl(tmp_path):
    """A tiny HF-layout teacher folder whose tokenizer has no <image> (like SmolLM2's) and a
    LLaVA-style JSONL file of tiny-world examples with PNG images, for --teacher_path /
    --data_path runs. Returns (teacher folder, teacher Decoder, jsonl path)."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    import data
    from model import Decoder, LMConfig
    from weights import save_hf_lm
    world = data.build_world(0, n_entities=8, image_size=32, examples_per_source=20)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(
        add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(world.corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    teacher_dir = tmp_path / "teacher"
    teacher = Decoder(LMConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=2, n_heads=2,
                               n_kv_heads=1, ffn_dim=64))
    save_hf_lm(teacher, teacher_dir)
    tok.save(str(teacher_dir / "tokenizer.json"))
    lines = []
    for source in ("colour", "knowledge_vqa", "text_qa"):
        for i, ex in enumerate(world.sources[source][:6]):
            line = {"prompt": ex["prompt"].replace("<image>", "<image>\n"),
                    "response": ex["response"], "source": source}
            if ex["image"] is not None:
                ex["image"].save(tmp_path / f"{source}{i}.png")
                line["image"] = f"{source}{i}.png"
            lines.append(json.dumps(line))
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    return teacher_dir, teacher, tmp_path / "train.jsonl"
