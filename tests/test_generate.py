"""tools/generate.py on tiny model folders: streams an answer, the teacher via the KV handoff, bad
input."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
from scale import tiles
from scale import weights
from model import LMConfig, VisionConfig, Decoder, vlm_from_teacher
from scale.weights import save_vlm, save_hf_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import generate  # noqa: E402

CORPUS = ["the red circle eats apples .", "kabol lives in the forest .",
          "what is it ? it is red ."] * 5
VIS = VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=4, mlp_dim=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A teacher (HF LM folder) and a student VLM whose decoder is the teacher's copy, image
    splitting on (tiles of 16 px, up to 2x2)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok_path = str(root / "tokenizer.json")
    data.train_tokenizer(CORPUS, 300).save(tok_path)
    tok = data.load_tokenizer(tok_path, extra_tokens=tiles.VIEW_TOKENS)
    teacher = Decoder(LMConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=64))
    view_ids = [tok.token_to_id(t) for t in tiles.VIEW_TOKENS]
    student = vlm_from_teacher(teacher, VIS, tok.token_to_id(data.IMAGE_TOKEN), 2, view_ids,
                               tiles.ImageSplitting(max_side=32, resize_to_max_side=True))
    save_vlm(student, root / "student")
    weights.save_tokenizer(tok, root / "student")
    save_hf_lm(teacher, root / "teacher")
    weights.save_tokenizer(data.load_tokenizer(tok_path), root / "teacher")
    save_hf_lm(Decoder(LMConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, n_kv_heads=1,
                                ffn_dim=64)),
               root / "bad_teacher")                        # 1 layer, 1 KV head: cannot read the KV
    Image.new("RGB", (40, 20), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (10, 10), (30, 30, 200)).save(root / "b.png")
    return root


def run(capsys, *args):
    rc = generate.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_student_answer_and_teacher_via_handoff(folders, capsys):
    rc, out, err = run(capsys, f"--model={folders / 'student'}",
                       f"--image={folders / 'a.png'},{folders / 'b.png'}",
                       "--prompt=<image> and <image> : the red circle", "--max_new_tokens=6",
                       f"--teacher={folders / 'teacher'}")
    assert rc == 0, err
    # resize_to_max_side: the long side becomes 32 = 2 tiles; 40x20 -> 32x16 (1x2), 10x10 -> 32x32
    # (2x2)
    assert "8 image view(s), grids [(1, 2), (2, 2)]" in err
    student_answer, label, teacher_answer = out.split("\n")[:3]
    assert label == "[teacher via the KV handoff]"          # labelled on stdout, with the answers
    assert student_answer.strip()
    # the student's decoder IS the teacher: reading the student's KV, the teacher says the same
    assert teacher_answer == student_answer


def test_sampling_is_seeded_and_text_models_work(folders, capsys):
    args = [f"--model={folders / 'teacher'}", "--prompt=the red", "--max_new_tokens=5",
            "--temperature=1.0", "--top_k=5"]
    a, b = run(capsys, *args, "--seed=1"), run(capsys, *args, "--seed=1")
    assert a[0] == 0 and a[1] == b[1]


@pytest.mark.parametrize("args,message", [
    (["--model=/nope", "--prompt=x"], "model folder not found: /nope"),
    (["--model={t}", "--prompt=x", "--image={a}"], "is a text-only model; it cannot take --image"),
    (["--model={s}", "--prompt=x", "--image=/nope.png"], "image file not found: /nope.png"),
    (["--model={s}", "--prompt=<image> <image> x", "--image={a}"],
     "2 <image> tag(s) for 1 image(s)"),
    (["--model={s}", "--prompt=x", "--teacher=/nope"], "teacher folder not found"),
])
def test_bad_input_is_one_line_and_nonzero(folders, capsys, args, message):
    fmt = dict(t=folders / "teacher", s=folders / "student", a=folders / "a.png")
    rc, _, err = run(capsys, *[a.format(**fmt) for a in args])
    assert rc == 2 and message in err and err.strip().count("\n") <= 1 + ("teacher" in message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_and_nonzero(folders, capsys):
    rc, out, err = run(capsys, f"--model={folders / 'teacher'}", "--prompt=the red",
                       "--device=cuda")
    assert rc == 2 and "--device=cuda but no CUDA device is available" in err and out == ""


@pytest.mark.parametrize("teacher,prompt,message", [
    ("teacher", "the red <image>", "the prompt must end with a text token"),
    ("bad_teacher", "<image> the red",
     "incompatible for KV sharing: n_layers: teacher 1 vs student 2 n_kv_heads: teacher 1 vs "
     "student 2"),
])
def test_bad_teacher_is_refused_before_the_student_answers(folders, capsys, teacher, prompt,
                                                           message):
    rc, out, err = run(capsys, f"--model={folders / 'student'}", f"--image={folders / 'a.png'}",
                       f"--prompt={prompt}", "--max_new_tokens=3", f"--teacher={folders / teacher}")
    # the whole message (every difference) on one line, and no student answer printed first
    assert rc == 2 and message in err and err.strip().count("\n") == 0 and out == ""


def test_runs_as_a_script(folders):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"),
                        f"--model={folders / 'student'}",
                        f"--image={folders / 'a.png'}", "--prompt=the red circle",
                        "--max_new_tokens=3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[vlm " in r.stderr
