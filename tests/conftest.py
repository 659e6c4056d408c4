import os
import shutil
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


@pytest.fixture(autouse=True)
def _cpu_unless_a_cuda_test(request, monkeypatch):
    """The suite asserts CPU numerics (bit-exact resume, fp32 parity): on a GPU machine every
    test but tests/test_cuda.py runs on the CPU, in this process (device "auto" finds no GPU) and
    in the processes it starts (CUDA_VISIBLE_DEVICES="")."""
    if os.path.basename(str(request.node.fspath)) != "test_cuda.py":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def _tree(root):
    """(path, size, mtime) of every file under the repository root but caches: a test that
    wrote into the working tree (out/, a stray file) changes it."""
    skip = {"__pycache__", ".pytest_cache", ".git"}
    return {(os.path.relpath(os.path.join(d, f), root), st.st_size, st.st_mtime_ns)
            for d, dirs, files in os.walk(root) if not dirs.__setitem__(slice(None), [
                x for x in dirs if x not in skip]) for f in files
            for st in [os.stat(os.path.join(d, f))]}


@pytest.fixture(scope="session", autouse=True)
def _outside_the_working_tree(tmp_path_factory):
    """Tests never read or write the working tree: they run from a temporary folder (so a
    relative path such as train.py's default --out_dir=out lands there, whatever the repository
    holds, e.g. the out/ of an earlier `python train.py`), the tree is unchanged at the end, and
    the temporary folders are removed."""
    before, cwd = _tree(ROOT), os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)
    changed = sorted({p for p, _, _ in before ^ _tree(ROOT)})
    shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)
    assert not changed, f"tests changed the working tree: {changed[:10]}"


def make_teacher_and_jsonl(tmp_path):
    """A tiny HF-layout teacher folder whose tokenizer has no <image> (like SmolLM2's) and a
    LLaVA-style JSONL file of tiny-world examples with PNG images, for --teacher_path /
    --data_path runs. Returns (teacher folder, teacher Decoder, jsonl path)."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    import world
    from model import Decoder, LMConfig
    from scale.weights import save_hf_lm
    world = world.build_world(0, n_entities=8, image_size=32, examples_per_source=20)
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


# ----------------------------------------------------------------------------------------
# Test-only helpers: an eager JSONL reader (the reference the streaming loader is checked
# against) and a SigLIP folder writer (for loader round trips).

def _parse_line(raw, image_root):
    """One JSONL line (bytes) -> the example of its last turn, its image decoded."""
    from scale.stream import _decode_utf8, _open_image, _parse_record, conversation_examples
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


def save_hf_siglip(encoder, folder):
    from scale.weights import hf_vision_key_map, save_mapped, vision_config_to_hf
    save_mapped(encoder, folder, hf_vision_key_map(encoder.cfg), vision_config_to_hf(encoder.cfg))
