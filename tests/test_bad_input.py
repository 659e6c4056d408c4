"""Bad input and faults: each case is one clear error naming the file, line, key or flag and
what was expected, exit status != 0 on the command line, and nothing lost or saved from a failed
stage. Tiny random configs; fast. (train.py flag errors: tests/test_train.py.)"""
import json
import re
import os
import runpy
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import data
from conftest import load_jsonl
from plumbing import files, loop
from scale import weights
from types import SimpleNamespace

import eval as evaluation
from kvshare import check_compatible, freeze, student_prefill, teacher_on_text
from model import LMConfig, VisionConfig, Decoder, VLM, VisionEncoder
from plumbing.files import atomic_write
from conftest import save_hf_siglip
from scale.weights import (load_hf_lm, load_hf_siglip, load_vlm, nanovlm_configs,
                     save_hf_lm, save_vlm)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = LMConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
              max_positions=16)
VIS = VisionConfig(image_size=16, patch_size=4, dim=16, n_layers=1, n_heads=2, mlp_dim=32)
IMG = 60


# --------------------------------------------------------------------------- weights.py: files

def test_atomic_write_mode_follows_umask_and_fsyncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)),
                                                 real_fsync(fd)))
    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "a.txt"), lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o640          # 0644 & ~0027
    assert synced == [False, True]                                              # file, then folder
    os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "b.txt"), lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]                   # no temp files left


# --------------------------------------------------------------------------- weights.py: configs

def saved(tmp_path, kind):
    folder = tmp_path / kind
    if kind == "lm":
        save_hf_lm(Decoder(LM), folder)
    elif kind == "siglip":
        save_hf_siglip(VisionEncoder(VIS), folder)
    else:
        save_vlm(VLM(LM, VIS, IMG), folder)
    return folder


def edit_config(folder, edit):
    """edit: a function changing the config in place, or the whole new content."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if callable(edit):
        edit(cfg)
    else:
        cfg = edit
    path.write_text(json.dumps(cfg))
    return str(path)


LOADERS = {"lm": load_hf_lm, "siglip": load_hf_siglip, "vlm": load_vlm}


POS_INT = "expected a positive integer"


@pytest.mark.parametrize("kind,edit,expected", [
    ("lm", [], "expected a JSON object, found an array"),
    ("lm", lambda c: c.update(hidden_size="abc"),
     f"field 'hidden_size' is a string (\"abc\"), {POS_INT}"),
    ("lm", lambda c: c.update(num_hidden_layers=0),
     f"field 'num_hidden_layers' is a number (0), {POS_INT}"),
    ("lm", lambda c: c.pop("intermediate_size"), f"missing field 'intermediate_size' ({POS_INT})"),
    ("lm", lambda c: c.update(tie_word_embeddings="yes"),
     "field 'tie_word_embeddings' is a string (\"yes\"), expected true or false"),
    ("lm", lambda c: c.update(rope_theta=True),
     "field 'rope_theta' is true (true), expected a positive number"),
    ("siglip", lambda c: c.update(patch_size=4.5),
     f"field 'patch_size' is a number (4.5), {POS_INT}"),
    ("siglip", {"vision_config": "x"},
     "field 'vision_config' is a string (\"x\"), expected a JSON object"),
    ("vlm", lambda c: c["lm"].update(dim="abc"),
     f"field 'lm.dim' is a string (\"abc\"), {POS_INT}"),
    ("vlm", lambda c: c["lm"].pop("n_heads"), f"missing field 'lm.n_heads' ({POS_INT})"),
    ("vlm", lambda c: c.update(vision=[]),
     "field 'vision' is an array ([]), expected a JSON object"),
    ("vlm", lambda c: c.update(image_token_id=-1),
     "field 'image_token_id' is a number (-1), expected a non-negative integer"),
])
def test_bad_config_names_file_key_and_expectation(tmp_path, kind, edit, expected):
    path = edit_config(saved(tmp_path, kind), edit)
    with pytest.raises(ValueError) as e:
        LOADERS[kind](tmp_path / kind)
    assert str(e.value) == f"{path}: {expected}"


def test_bad_nanovlm_config_names_key():
    with pytest.raises(ValueError) as e:
        nanovlm_configs({"vit_hidden_dim": 16, "vit_inter_dim": 32, "vit_patch_size": 4,
                         "vit_img_size": 16,
                         "vit_n_heads": 2, "vit_n_blocks": 1, "lm_hidden_dim": 32,
                         "lm_inter_dim": 48,
                         "lm_n_heads": 4, "lm_n_kv_heads": 2, "lm_n_blocks": "two",
                         "lm_re_base": 1e4,
                         "mp_pixel_shuffle_factor": 2, "lm_vocab_size": 61}, "nv/config.json")
    assert str(e.value) == f"nv/config.json: field 'lm_n_blocks' is a string (\"two\"), {POS_INT}"


@pytest.mark.parametrize("kind,key", [("lm", "model.norm.weight"),
                                      ("siglip", "vision_model.post_layernorm.weight"),
                                      ("vlm", "decoder.layers.1.attn.q_proj.weight")])
def test_integer_tensor_where_a_float_weight_is_expected(tmp_path, kind, key):
    folder = saved(tmp_path, kind)
    tensors = load_file(folder / "model.safetensors")
    tensors[key] = tensors[key].long()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError) as e:
        LOADERS[kind](folder)
    assert (f"wrong dtype {folder / 'model.safetensors'}: tensor {key} is int64, expected floating "
            "point"
            in str(e.value))


# --------------------------------------------------------------------------- data.py

@pytest.fixture
def jsonl_dir(tmp_path):
    Image.new("RGB", (8, 8), (0, 128, 255)).save(tmp_path / "ok.png")
    return tmp_path


GOOD = b'{"prompt": "2+2=", "response": " 4"}'
IMAGE_LINE = b'{"image": "ok.png", "prompt": "<image>", "response": "b"}'


@pytest.mark.parametrize("bad_line,expected,max_pixels", [
    (b'{"prompt": "", "response": " 4"}', "empty prompt and no image", None),
    (b'{"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "x"}]}',
     "empty prompt and no image", None),
    (b'{"image": "ok.png", "prompt": "<image>", "response": "a <image> b"}',
     "the response has <image>; expected it only in the prompt", None),
    (b'{"prompt": "a", "response": "b", "source": 3}',
     "expected 'source' to be a non-empty string, found 3", None),
    (b'{"prompt": "caf\xe9", "response": "b"}',
     "not valid UTF-8 (byte 15: b'\\xe9'); expected UTF-8 text", None),
    (IMAGE_LINE, "decompression bomb", 10),         # 8 x 8 = 64 pixels > 2 x 10: PIL's error
    (IMAGE_LINE, "decompression bomb", 40),         # 64 > 40: PIL only warns
])
def test_bad_jsonl_line_is_an_error_naming_file_and_line_or_skipped(jsonl_dir, monkeypatch,
                                                                     capsys, bad_line, expected,
                                                                     max_pixels):
    if max_pixels is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", max_pixels)
    path = jsonl_dir / "bad.jsonl"
    path.write_bytes(b"\n".join([GOOD, bad_line, GOOD]) + b"\n")
    with pytest.raises(ValueError) as e:
        load_jsonl(str(path))
    assert str(e.value).startswith(f"{path} line 2: ") and expected in str(e.value)
    assert len(load_jsonl(str(path), skip_bad=True)) == 2
    assert f"skipped 1 bad line(s) of {path}, kept 2 (first: line 2: " in capsys.readouterr().err


def test_jsonl_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError) as e:
        load_jsonl(str(tmp_path), skip_bad=True)
    assert str(e.value) == f"{tmp_path}: is a directory; expected a JSONL file"


def test_save_tokenizer_writes_atomically(tmp_path, monkeypatch):
    tok = data.train_tokenizer(["a b c d"], vocab_size=262)
    tok.role_tokens = {data.EOS_TOKEN: data.EOS_TOKEN}
    written = []
    monkeypatch.setattr(weights, "atomic_write", lambda path,
                        fn: (written.append(os.path.basename(path)),
                                                                files.atomic_write(path, fn)))
    weights.save_tokenizer(tok, str(tmp_path))
    assert written == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"eos_token": "<eos>"}
    assert stat.S_IMODE(os.stat(tmp_path / "tokenizer.json").st_mode) == 0o644 & ~_umask()


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- model.py

def test_sequence_longer_than_max_positions():
    lm = Decoder(LM).eval()
    with pytest.raises(ValueError) as e:
        lm(torch.ones(1, 17, dtype=torch.long))
    assert str(e.value) == ("sequence of 17 positions (past 0 + new 17 columns) is longer than "
                            "max_positions 16")
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :4] = mask[1, 16:] = 0                        # 20 columns, 16 real tokens per row: fits
    lm(torch.ones(2, 20, dtype=torch.long), attention_mask=mask)
    with pytest.raises(ValueError, match="sequence of 17 positions .* max_positions 16"):
        lm.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)


# --------------------------------------------------------------------------- kvshare.py

def handoff(student_lm, teacher_lm):
    student = VLM(student_lm, VIS, IMG).eval()
    teacher = freeze(Decoder(teacher_lm))
    ids = torch.randint(1, IMG, (1, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "context_len": 4,
             "images": None,
             "labels": ids[:, 4:], "response_mask": torch.ones(1, 2, dtype=torch.bool)}
    return student, teacher, batch


@pytest.mark.parametrize("teacher_lm,expected", [
    (LMConfig(**{**LM.__dict__, "n_kv_heads": 4}), "n_kv_heads: teacher 4 vs student 2"),
    (LMConfig(**{**LM.__dict__, "dim": 64}), "head_dim: teacher 16 vs student 8"),
    (LMConfig(**{**LM.__dict__, "n_layers": 3}), "n_layers: teacher 3 vs student 2"),
])
def test_kv_shape_mismatches_are_refused_by_check_compatible(teacher_lm, expected):
    # the KV shapes (of scopes "full" and "image", which read the student's KV) are checked once,
    # at setup, by check_compatible; teacher_continue no longer checks its inputs
    student, teacher, batch = handoff(LM, teacher_lm)
    with pytest.raises(ValueError) as e:
        check_compatible(teacher.cfg, student.decoder.cfg)
    assert str(e.value).startswith("teacher and student decoders are incompatible for KV "
                                   "sharing")
    assert expected in str(e.value)
    _, kv = student_prefill(student, batch)
    teacher_on_text(teacher, kv, batch, IMG)                     # the text-only teacher reads no KV


def test_different_rope_theta_is_not_silent():
    # no tensor carries RoPE theta: the check runs once at setup, in train.py and eval.py
    student, teacher, batch = handoff(LM, LMConfig(**{**LM.__dict__, "rope_theta": 5e5}))
    with pytest.raises(ValueError, match="rope_theta: teacher 500000.0 vs student 10000.0"):
        check_compatible(teacher.cfg, student.decoder.cfg)
    with pytest.raises(ValueError, match="rope_theta: teacher 500000.0 vs student 10000.0"):
        evaluation.evaluate_models({"student": student}, SimpleNamespace(
            language_bench=[], vision_bench=[], knowledge_bench=[]), None, 32, teacher=teacher)


# --------------------------------------------------------------------------- convert_gguf.py

def tiny_gguf(path):
    gguf = pytest.importorskip("gguf", reason="convert_gguf.py needs the optional `gguf` package")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(monkeypatch, *args):
    """Run convert_gguf.py as __main__ in this process; returns what it passed to sys.exit."""
    monkeypatch.setattr(sys, "argv", ["convert_gguf.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "tools", "convert_gguf.py"), run_name="__main__")
    return e.value.code


def test_convert_gguf_cli_missing_file_is_one_line_and_exit_1(tmp_path):
    pytest.importorskip("gguf", reason="convert_gguf.py needs the optional `gguf` package")
    missing, out = tmp_path / "missing.gguf", tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_gguf.py"),
                        str(missing), str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == f"convert_gguf.py: {missing}: file not found; expected a GGUF file\n"
    assert not out.exists()


@pytest.mark.parametrize("content,expected", [
    (lambda p: p.write_bytes(b"not a gguf file at all"),
     "not a readable GGUF file (ValueError: GGUF magic invalid)"),
    (lambda p: p.write_bytes(tiny_gguf(p).read_bytes()[:-40]), "not a readable GGUF file ("),
    (lambda p: tiny_gguf(p), "GGUF metadata is missing 'llama.embedding_length'"),
])
def test_convert_gguf_cli_bad_file_is_one_line(tmp_path, monkeypatch, content, expected):
    pytest.importorskip("gguf", reason="convert_gguf.py needs the optional `gguf` package")
    path, out = tmp_path / "m.gguf", tmp_path / "out"
    content(path)
    message = run_cli(monkeypatch, path, out)
    assert isinstance(message, str) and "\n" not in message                # sys.exit(str): status 1
    assert message.startswith(f"convert_gguf.py: {path}: ") and expected in message
    assert not out.exists()


# --------------------------------------------------------------------------- train.py: flags and
# runs

import shutil  # noqa: E402

import train  # noqa: E402
from conftest import make_teacher_and_jsonl  # noqa: E402

SMOKE = ["--preset=smoke", "--eval=false"]


@pytest.mark.parametrize("content, message", [
    ('{"eval": "false"}', "'eval' is \"false\", expected a JSON true/false"),
    ('{"batch_size": "abc"}', "'batch_size' is \"abc\", expected a JSON integer"),
    ('{"alpha": true}', "'alpha' is true, expected a JSON number"),
    ('[1, 2]', "expected a JSON object of config keys, found list"),
])
def test_train_json_config_values_are_type_checked(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError,
                       match=re.escape(f"config file {path}: ") + ".*" + re.escape(message)):
        train.get_config([str(path)])


def test_train_out_dir_that_is_a_file_and_seq_len_past_the_corpus(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out_dir=.*/f is a file; expected a folder"):
        train.get_config([f"--out_dir={tmp_path / 'f'}"])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--seq_len=100000 is longer than the whole text corpus"):
        train.run(train.get_config(SMOKE + ["--seq_len=100000", f"--out_dir={out}"]))
    assert not (out / "ckpt").exists() and not (out / "teacher").exists()     # before any work


def test_train_fresh_run_in_a_used_out_dir_refuses_and_deletes_nothing(tmp_path):
    argv = SMOKE + ["--stage=pretrain", "--pretrain_steps=4", "--ckpt_every=2",
                    f"--out_dir={tmp_path}"]
    train.run(train.get_config(argv))
    before = sorted(os.listdir(tmp_path / "ckpt" / "pretrain"))
    assert before == ["step_0000002.pt", "step_0000004.pt"]
    with pytest.raises(ValueError,
                       match="already holds checkpoints of stage pretrain .*--resume=true"):
        train.run(train.get_config(SMOKE + ["--stage=pretrain", "--pretrain_steps=2",
                                            "--pretrain_lr=1e-3", f"--out_dir={tmp_path}"]))
    assert sorted(os.listdir(tmp_path / "ckpt" / "pretrain")) == before


def test_train_a_moved_run_folder_resumes(tmp_path):
    argv = SMOKE + ["--stage=pretrain", "--pretrain_steps=4", "--ckpt_every=2"]
    train.run(train.get_config(argv + [f"--out_dir={tmp_path / 'a'}"]))
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    os.remove(tmp_path / "b" / "ckpt" / "pretrain" / "step_0000004.pt")     # as if killed at step 3
    (tmp_path / "b" / "ckpt" / "pretrain" / ".tmp-step_0000004.ptx").write_bytes(b"half")  # orphan
    train.run(train.get_config(argv + [f"--out_dir={tmp_path / 'b'}", "--resume=true"]))
    assert sorted(os.listdir(tmp_path / "b" / "ckpt" / "pretrain")) == ["step_0000002.pt",
                                                                       "step_0000004.pt"]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]                     # steps 3-4 logged once, not twice


def test_train_no_model_is_saved_from_a_stage_without_a_good_step(tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.run(train.get_config(SMOKE + ["--stage=pretrain", f"--out_dir={out}"]))
    train.run(train.get_config(SMOKE + ["--stage=adapt", f"--out_dir={out}"]))
    real = train.distill.distill_loss

    def nan_loss(*args, **kw):
        r = real(*args, **kw)
        return {**r, "loss": r["loss"] * float("nan")}
    monkeypatch.setattr(train.distill, "distill_loss", nan_loss)
    with pytest.raises(loop.TrainingError, match="all 3 steps had a non-finite loss"):
        train.run(train.get_config(SMOKE + ["--stage=distill", f"--out_dir={out}"]))
    assert not (out / "distilled-selective-full").exists()
    with pytest.raises(loop.TrainingError,
                       match=r"3 steps with non-finite loss .*--max_bad_steps=2\); "
                                                  r"last good checkpoint: none was written"):
        train.run(train.get_config(SMOKE + ["--stage=distill", "--max_bad_steps=2", "--variant=v2",
                                            f"--out_dir={out}"]))
    assert not (out / "distilled-v2").exists()


def test_train_cli_stage_failure_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset=smoke",
                        "--pretrain_lr=nan", f"--out_dir={tmp_path}"], capture_output=True,
                       text=True)
    assert (r.returncode == 1
            and r.stderr == "train.py: --pretrain_lr must be a finite number > 0, got nan\n")


def test_train_model_folders_are_whole_and_readable(tmp_path):
    out = tmp_path / "out"
    train.run(train.get_config(SMOKE + ["--stage=pretrain", f"--out_dir={out}"]))
    umask = os.umask(0)
    os.umask(umask)
    names = sorted(os.listdir(out / "teacher"))
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "train_config.json"]
    assert all(os.stat(out / "teacher" / n).st_mode & 0o777 == 0o666 & ~umask for n in names)
    assert not [n for n in os.listdir(out) if n.startswith((".tmp", ".old"))]


def test_train_student_with_another_tokenizer_is_refused(tmp_path):
    from model import VLM, LMConfig, VisionConfig
    tok = data.train_tokenizer(["a b c d e f g"] * 3, vocab_size=270)
    other = data.train_tokenizer(["g f e d c b a"] * 3 + ["abc"], vocab_size=280)
    vlm = VLM(LMConfig(vocab_size=300, dim=32, n_heads=2, n_kv_heads=1, n_layers=1, ffn_dim=8),
              VisionConfig(), image_token_id=tok.token_to_id(data.IMAGE_TOKEN))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizers disagree on"):
        train.check_student_tokens(vlm, tok, str(tmp_path))
    small = VLM(LMConfig(vocab_size=260, dim=32, n_heads=2, n_kv_heads=1, n_layers=1, ffn_dim=8),
                VisionConfig(), image_token_id=tok.token_to_id(data.IMAGE_TOKEN))
    with pytest.raises(ValueError, match=rf"vocabulary \(260\) is smaller than the tokenizer's "
                                         rf"\({tok.get_vocab_size()}\)"):
        train.check_student_tokens(small, tok, str(tmp_path / "nowhere"))


def _losses(out_dir, stage):
    return [(r["step"], r["loss"])
            for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl")))
            if r["stage"] == stage]


def test_compiled_training_trains_what_eager_training_trains(tmp_path, monkeypatch):
    """--compile=true vs eager on the smoke preset (aot_eager backend: dynamo + AOTAutograd, the
    part that decides which parameters get gradients, without a C++ build): the same losses at
    every step of every stage, and the adapt stage moves the same decoder parameters. The distill
    stage compiles the frozen teacher too (its continuation over the student's KV)."""
    runs, compiled, real_compile = {}, [], torch.compile

    def compile_aot_eager(module):
        compiled.append(module)
        return real_compile(module, backend="aot_eager")
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            monkeypatch.setattr(train.torch, "compile", compile_aot_eager)
        out = str(tmp_path / mode)
        models, _, _ = train.run(train.get_config(SMOKE
                                                  + [f"--out_dir={out}",
                                                     f"--compile={mode == 'compiled'}"]))
        teacher = dict(models["teacher"].named_parameters())
        moved = {n for n, p in models["adapted"].decoder.named_parameters()
                 if p.shape == teacher[n].shape and not torch.equal(p, teacher[n])}
        runs[mode] = (out, moved)
    # the distill stage compiles the frozen teacher (at its setup), then the student it trains
    assert compiled[-2] is models["teacher"] and compiled[-1] is models["distilled-selective-full"]
    assert runs["eager"][1] == runs["compiled"][1] and len(runs["eager"][1]) > 10
    for stage in ("pretrain", "align", "adapt", "distill-selective-full"):
        a, b = _losses(runs["eager"][0], stage), _losses(runs["compiled"][0], stage)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) > 0
        assert np.allclose([l for _, l in a], [l for _, l in b], rtol=1e-4, atol=1e-5), stage


def test_streamed_data_resume_with_workers_gives_identical_losses(tmp_path, monkeypatch):
    teacher_dir, _, jsonl = make_teacher_and_jsonl(tmp_path)
    argv = ["--preset=smoke", f"--teacher_path={teacher_dir}", f"--data_path={jsonl}",
            "--kd_sources=knowledge_vqa,text_qa", "--eval=false", "--num_workers=2",
            "--distill_steps=6", "--ckpt_every=2", "--stage=all"]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    train.run(train.get_config(argv + [f"--out_dir={straight}"]))
    real, calls = train.distill_step, []

    def crash_in_distill_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(train, "distill_step", crash_in_distill_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.run(train.get_config(argv + [f"--out_dir={crashed}"]))
    monkeypatch.setattr(train, "distill_step", real)
    train.run(train.get_config(argv + [f"--out_dir={crashed}", "--resume=true"]))
    for stage in ("align", "adapt", "distill-selective-full"):
        assert _losses(straight, stage) == _losses(crashed, stage) and _losses(straight, stage)


# --------------------------------------------------------------------------- model folders, tools

def test_missing_or_broken_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"tokenizer\.json: file not found; expected a tokenizer"):
        data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer\.json"):
        data.load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_a_checkpoint_without_the_train_keys_is_refused(tmp_path):
    path = tmp_path / "step_0000001.pt"
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(ValueError, match=r"step_0000001\.pt is not a train\.py checkpoint: missing "
                                         r"\['bad_steps', 'config', 'model'"):
        loop.Checkpoints(str(tmp_path), 2).load(str(path), train.TrainConfig())


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=0"], "--batch_size=0: expected a positive integer"),
    (["--batch_size=-1"], "--batch_size=-1: expected a positive integer"),
    (["--limit=abc"], "--limit=abc: expected a positive integer"),
])
def test_mmlu_tool_flags_and_non_utf8_files(tmp_path, flags, message):
    import mmlu
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match=re.escape(message)):
        mmlu.main([f"--mc={mc}", f"--ckpt={tmp_path}", *flags])
    mc.write_bytes(b'{"question": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match=r"mc\.jsonl: not UTF-8 text \(byte 17\)"):
        mmlu.load_mc_file(str(mc))


def test_a_later_stage_without_the_earlier_one_names_the_stage_to_run(tmp_path):
    out = tmp_path / "out"
    for stage, first in (("distill", "pretrain"), ("adapt", "pretrain")):
        with pytest.raises(ValueError, match=rf"--stage={stage} needs .*teacher, which stage "
                                             rf"{first} writes: run --stage={first} \(or "
                                             r"--stage=all\)"):
            train.run(train.get_config(SMOKE + [f"--stage={stage}", f"--out_dir={out}"]))
    assert not out.exists()                                   # nothing left behind
    train.run(train.get_config(SMOKE + ["--stage=pretrain", f"--out_dir={out}"]))
    with pytest.raises(ValueError, match=r"--stage=distill needs .*adapted, which stage adapt "
                                         r"writes: run --stage=adapt"):
        train.run(train.get_config(SMOKE + ["--stage=distill", f"--out_dir={out}"]))


def test_bad_data_leaves_no_out_dir_and_a_missing_file_is_named(tmp_path):
    teacher_dir, _, _ = make_teacher_and_jsonl(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        train.run(train.get_config(SMOKE + [f"--teacher_path={teacher_dir}",
                                            f"--data_path={bad}", f"--out_dir={out}"]))
    assert not out.exists()
    with pytest.raises(ValueError, match=r"--data_path: nothere\.jsonl: no such file"):
        train.get_config(SMOKE + [f"--teacher_path={teacher_dir}", "--data_path=nothere.jsonl"])


def test_used_out_dir_refusal_names_the_three_choices_and_a_longer_resume_says_so(tmp_path,
                                                                                   capsys):
    argv = SMOKE + ["--stage=pretrain", f"--out_dir={tmp_path}"]
    train.run(train.get_config(argv))
    with pytest.raises(ValueError) as e:
        train.run(train.get_config(argv))
    assert all(choice in str(e.value) for choice in ("--resume=true", "--variant=NAME",
                                                     "another --out_dir"))
    capsys.readouterr()
    train.run(train.get_config([f"--out_dir={tmp_path}", "--resume=true", "--pretrain_steps=8"]))
    assert ("pretrain: resuming at step 6 of a run planned for 6 steps; training on to 8 steps"
            in capsys.readouterr().out)


# --------------------------------------------------------------------------- one run per folder

def train_exit(argv):
    """train.main(argv) in this process -> what it passed to sys.exit (a str: exit status 1)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code


def test_a_second_run_on_a_folder_in_use_refuses_at_once_naming_the_process(tmp_path):
    out = tmp_path / "out"
    with files.FolderLock(str(out)):                    # this process holds the folder
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *SMOKE,
                            f"--out_dir={out}"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 1
        assert r.stderr == (f"train.py: --out_dir={out} is in use by another run (process "
                            f"{os.getpid()}, lock {out}/train.lock); wait for it to end or choose "
                            "another --out_dir\n")
        assert os.listdir(out) == ["train.lock"]          # the refused run wrote nothing
    assert not out.exists()                 # released: the lock file and the folder it made go


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_said(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.lock").write_text(f"{dead.pid}\n")      # as a killed run leaves it
    train.run(train.get_config(SMOKE + ["--stage=pretrain", f"--out_dir={out}"]))
    assert (f"train.py: --out_dir={out}: taking over the stale lock of process {dead.pid} (it "
            "ended without releasing it)") in capsys.readouterr().err
    assert "train.lock" not in os.listdir(out) and (out / "teacher").is_dir()


def test_out_dir_whose_parent_is_a_file_or_read_only(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    assert train_exit(SMOKE + [f"--out_dir={tmp_path / 'f' / 'out'}"]) == (
        f"train.py: --out_dir={tmp_path / 'f' / 'out'}: {tmp_path / 'f'} is a file; expected a "
        "folder")
    from plumbing import checks
    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)   # as on a read-only mount
    assert train_exit(SMOKE + [f"--out_dir={tmp_path / 'new'}"]) == (
        f"train.py: --out_dir={tmp_path / 'new'}: cannot write in {tmp_path} (read-only or no "
        "permission); expected a writable folder")
    monkeypatch.undo()
    import errno

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(files.os, "makedirs", read_only)    # what the lock meets there
    with pytest.raises(ValueError) as e:
        files.FolderLock(str(tmp_path / "ro")).__enter__()
    assert str(e.value) == (f"--out_dir={tmp_path / 'ro'}: cannot create the folder or its lock "
                            f"file (Read-only file system: {tmp_path / 'ro'}); expected a "
                            "writable folder")


def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_earlier_one(tmp_path,
                                                                                   monkeypatch):
    out, real, calls = tmp_path / "out", torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(loop.torch, "save", full_disk)
    message = train_exit(SMOKE + ["--stage=pretrain", "--pretrain_steps=4", "--ckpt_every=2",
                                  f"--out_dir={out}"])
    ckpt = out / "ckpt" / "pretrain"
    assert re.fullmatch(
        re.escape(f"train.py: cannot write checkpoint {ckpt / 'step_0000004.pt'}: the write failed "
                  "(RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 64 "
                  "vs 0); ") + r"\d+ MiB free there -- is the disk full\? The checkpoints written "
                               r"before are kept", message), message
    assert os.listdir(ckpt) == ["step_0000002.pt"]         # no temp file, the earlier one kept
    assert not (out / "teacher").exists() and not (out / "train.lock").exists()


def test_a_torn_last_log_line_is_dropped_on_resume_a_bad_earlier_line_is_named(tmp_path,
                                                                                capsys):
    argv = SMOKE + ["--stage=pretrain", "--pretrain_steps=4", "--ckpt_every=2",
                    f"--out_dir={tmp_path}"]
    train.run(train.get_config(argv))
    log = tmp_path / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"stage": "pretrain", "step": 5, "lo')       # a full disk mid-write
    capsys.readouterr()
    train.run(train.get_config([f"--out_dir={tmp_path}", "--resume=true", "--pretrain_steps=6"]))
    assert (f"{log}: dropping its torn last line 5 ('{{\"stage\": \"pretrain\", \"step\": 5, "
            "\"lo'...): an interrupted write") in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in open(log)] == [1, 2, 3, 4, 5, 6]
    log.write_text(good.replace('"step": 2', '"step": 2,,', 1))
    message = train_exit([f"--out_dir={tmp_path}", "--resume=true", "--pretrain_steps=8"])
    assert message.startswith(f"train.py: {log} line 2: not a JSON record (") \
        and message.endswith("; expected one record per line") and "\n" not in message


def test_ctrl_c_with_dataloader_workers_says_stopping_once(tmp_path):
    """Ctrl-C reaches the whole process group: the forked workers inherit the handler but stay
    silent; only the main process says it stops."""
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import torch
from plumbing import loop
from scale import stream
class Numbers(torch.utils.data.Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return torch.tensor(i)
loader = stream.make_loader(Numbers(), 2, seed=0, num_workers=2, collate_fn=torch.stack, timeout=30)
with loop.stop_requests() as stop:
    batches = iter(loader)
    next(batches)                                   # the workers are up
    os.killpg(os.getpgrp(), signal.SIGINT)
    time.sleep(1.0)
    next(batches)
    print("requested", stop.requested)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=tmp_path, start_new_session=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "requested True\n", r.stderr
    assert r.stderr.count("SIGINT: stopping after this step") == 1, r.stderr


# --------------------------------------------------------------------------- data: paths and images

def jsonl(tmp_path, *records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def index(path, **kw):
    from scale import stream
    return stream.StreamDataset(str(path), None, 0, 16, **kw)


@pytest.mark.parametrize("image", ["../red.png", "link.png", "/etc/passwd"])
def test_image_paths_must_stay_inside_the_image_root(tmp_path, image):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    os.symlink(tmp_path / "red.png", root / "link.png")          # a symlink that leaves the root
    path = jsonl(root, {"image": image, "prompt": "<image>", "response": "r"})
    with pytest.raises(ValueError) as e:
        index(path)
    real = os.path.realpath(root / image)
    assert str(e.value) == (f"{path} line 1: image path {image!r} resolves to {real}, outside the "
                            f"image root {root} (--image_root, default the data file's folder); "
                            "expected a path inside it")
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "sub" / "ok.png")
    ok = jsonl(root, {"image": "sub/../sub/ok.png", "prompt": "<image>", "response": "r"},
               name="ok.jsonl")
    assert len(index(ok)) == 1                                   # inside, however it is spelt


def test_train_refuses_a_data_file_reading_outside_its_image_root(tmp_path):
    teacher_dir, _, _ = make_teacher_and_jsonl(tmp_path)
    (tmp_path / "data").mkdir()
    bad = jsonl(tmp_path / "data", {"image": "../colour0.png", "prompt": "<image>",
                                    "response": "r", "source": "colour"})
    out = tmp_path / "out"
    message = train_exit(SMOKE + [f"--teacher_path={teacher_dir}", f"--data_path={bad}",
                                  f"--out_dir={out}"])
    assert message.startswith(f"train.py: {bad} line 1: image path '../colour0.png' resolves to ")
    assert "outside the image root" in message and not out.exists()       # before any work


def test_a_list_of_one_image_trains_a_list_of_three_is_refused_while_indexing(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    tok = data.train_tokenizer(["a b c"] * 3, vocab_size=270)
    path = jsonl(tmp_path, {"image": ["red.png"], "prompt": "<image> is", "response": " red"})
    ds = index(path)
    ds.bind(tok, 4)
    assert ds[0]["image"].shape == (1, 3, 16, 16)
    three = jsonl(tmp_path, {"image": ["red.png"] * 3, "prompt": "<image>" * 3, "response": "r"},
                  name="three.jsonl")
    with pytest.raises(ValueError) as e:
        index(three)
    assert str(e.value) == (f"{three} line 1: 3 images in one line; expected at most 1 "
                            "(StreamDataset reads one image per example)")


def test_empty_images_and_three_images_in_a_row_are_found_while_indexing(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    path = jsonl(tmp_path, {"image": "empty.png", "prompt": "<image>", "response": "r"})
    with pytest.raises(ValueError) as e:
        index(path)
    assert str(e.value) == (f"{path} line 1: image file {tmp_path / 'empty.png'} is empty (0 "
                            "bytes); expected an image file")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    png = (tmp_path / "red.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)
    one = [{"bytes": png.read_bytes(), "path": None}]
    cases = [(one * 3, "3 images in one row; expected at most 1 (one image per example)"),
             ([{"bytes": b"", "path": None}], "the image's bytes are empty (0 bytes); expected an "
                                              "encoded image (PNG, JPEG, ...)"),
             ([{"bytes": None, "path": "../x.png"}], "image path '../x.png' resolves to "
                                                     f"{tmp_path.parent / 'x.png'}, outside")]
    for bad, expected in cases:
        texts = [[{"user": "q", "assistant": "a"}]] * 2
        pq.write_table(pa.table({"images": [one, bad], "texts": texts}), tmp_path / "d.parquet")
        with pytest.raises(ValueError) as e:
            index(tmp_path / "d.parquet")                   # indexing: before any training step
        assert str(e.value).startswith(f"{tmp_path / 'd.parquet'} row 1: {expected}"), str(e.value)


def test_zero_byte_image_stops_train_before_any_work(tmp_path):
    teacher_dir, _, _ = make_teacher_and_jsonl(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    bad = jsonl(tmp_path, {"image": "empty.png", "prompt": "<image>", "response": "r"})
    out = tmp_path / "out"
    assert train_exit(SMOKE + [f"--teacher_path={teacher_dir}", f"--data_path={bad}",
                               f"--out_dir={out}"]) == (
        f"train.py: {bad} line 1: image file {tmp_path / 'empty.png'} is empty (0 bytes); "
        "expected an image file")
    assert not out.exists()


def test_data_path_with_a_stray_comma(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    assert train_exit([f"--teacher_path={tmp_path}", f"--data_path={tmp_path / 'good.jsonl'},"]) \
        == (f"train.py: --data_path={tmp_path / 'good.jsonl'},: an empty file name (a stray "
            "comma?); expected a comma list of .jsonl / .parquet files")


def test_tiny_world_pack_with_a_max_len_too_small_stops_before_pretraining(tmp_path):
    out = tmp_path / "out"
    message = train_exit(SMOKE + ["--pack=true", "--max_len=8", f"--out_dir={out}"])
    assert re.fullmatch(r"train\.py: --pack=true --max_len=8: the longest context is (\d+) tokens "
                        r"\(with 16 image tokens\); expected --max_len >= (\d+) \(room for one "
                        r"response token\)", message), message
    assert not out.exists()                                  # no stage ran


# --------------------------------------------------------------------------- tools: outputs, inputs

def tool_exit(monkeypatch, tool, *args):
    """Run tools/<tool> as __main__ in this process -> what it passed to sys.exit."""
    monkeypatch.setattr(sys, "argv", [tool, *map(str, args)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "tools", tool), run_name="__main__")
    return e.value.code


@pytest.fixture
def lm_folder(tmp_path):
    tok = data.train_tokenizer(["the red circle eats apples ."] * 5, vocab_size=300)
    folder = tmp_path / "lm"
    save_hf_lm(Decoder(LMConfig(**{**LM.__dict__, "vocab_size": tok.get_vocab_size()})), folder)
    weights.save_tokenizer(tok, folder)
    return folder


def test_exports_refuse_an_output_that_is_a_file_or_a_used_folder(tmp_path, monkeypatch,
                                                                  lm_folder):
    (tmp_path / "file").write_text("x")
    used = tmp_path / "used"
    used.mkdir()
    (used / "special_tokens_map.json").write_text("{}")               # an earlier conversion's
    for tool, name, args in (("export_hf.py", "OUT_FOLDER", [lm_folder]),
                             ("convert_gguf.py", "the output folder", [tmp_path / "m.gguf"]),
                             ("export_nanovlm.py", "the output folder", [lm_folder])):
        assert tool_exit(monkeypatch, tool, *args, tmp_path / "file") == (
            f"{tool}: {name} {tmp_path / 'file'} is a file; expected a new or empty folder")
        assert tool_exit(monkeypatch, tool, *args, used) == (
            f"{tool}: {name} {used} already holds files (special_tokens_map.json); expected "
            "a new or empty folder (remove it or choose another)")
    assert os.listdir(used) == ["special_tokens_map.json"]
    import export_hf
    export_hf.export(str(lm_folder), str(tmp_path / "new"))               # a new folder: whole
    assert sorted(os.listdir(tmp_path / "new")) == ["config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp", ".old"))]


def png_claiming(width, height):
    """A PNG file whose header claims width x height pixels (no real pixels behind it)."""
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0,
                                                               0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_generate_decompression_bomb_and_empty_prompt_are_one_line(tmp_path, capsys, lm_folder):
    import generate
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))
    assert generate.main([f"--model={lm_folder}", "--prompt=x",
                          f"--image={tmp_path / 'bomb.png'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"generate.py: --image: cannot read {tmp_path / 'bomb.png'} "
                          "(DecompressionBombError: Image size (400000000 pixels) exceeds limit")
    assert err.endswith(f"expected an image file of at most {Image.MAX_IMAGE_PIXELS} pixels\n")
    assert err.count("\n") == 1
    assert generate.main([f"--model={lm_folder}", "--prompt="]) == 2
    assert capsys.readouterr().err == ("generate.py: --prompt is empty and there is no --image: "
                                       "nothing to answer; expected --prompt=TEXT\n")
