"""Packed batches (scale/pack.py, --pack=true): several examples per row, positions restarting at 0,
block-diagonal attention in the student prefill and in the teacher continuation. Per example,
packed == padded: student logits, teacher logits, loss and gradients, for every scope, with
text-only, one-image and image-splitting (tiles) examples in one batch."""
import copy
import json
import os

import pytest
import torch

import data
import distill
from scale import pack
from scale import stream
from kvshare import freeze
from model import VLM, Decoder, LMConfig, VisionConfig

V, IMG, GLOBAL, T11, T12, PAD = 61, 60, 59, 58, 57, 0
LM = LMConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)


def models():
    teacher = freeze(Decoder(LM))
    student = VLM(LM, VisionConfig(), IMG, view_token_ids=(GLOBAL, T11, T12))
    student.decoder.load_state_dict(teacher.state_dict())
    with torch.no_grad():                                   # the student is not the teacher
        for p in student.decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return teacher, student


def text(n):
    return torch.randint(1, T12, (n,)).tolist()          # no student-only id


def examples(n_img):
    """(pairs, views, kd weights): text-only, one-view and tiled (global + 2 tiles) examples."""
    kinds = ["text", "image", "tiles", "text", "tiles", "image", "text"]
    pairs, views = [], []
    for k, kind in enumerate(kinds):
        if kind == "text":
            ctx, v = text(3 + 2 * k), []
        elif kind == "image":
            ctx, v = [IMG] * n_img + text(2 + k), [torch.randn(1, 3, 32, 32)]
        else:
            ctx = [GLOBAL] + [IMG] * n_img + [T11] + [IMG] * n_img + [T12] + [IMG] * n_img + text(k)
            v = [torch.randn(3, 3, 32, 32)]
        pairs.append((ctx, text(1 + (5 * k) % 7)))
        views.append(v)
    return pairs, views, torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0])


def per_example(x, batch):
    """Response rows of (B, R, ...) padded or (1, N, ...) packed outputs, example by example."""
    if "segment_ids" not in batch:                             # padded (B, R, ...)
        return x[batch["response_mask"]]
    return x[0][torch.argsort(batch["token_example"][0], stable=True)]


def forward_and_grads(student, teacher, batch, w, scope):
    student.zero_grad()
    s, t = pack.handoff(student, teacher, batch, student.student_only_ids, scope)
    kd_weight = w[batch["token_example"]]                           # per token, either layout
    out = distill.distill_loss(s, batch["labels"], batch["response_mask"], t, kd_weight=kd_weight)
    out["loss"].backward()
    # the normalisers distill_loss divides by (this batch's CE and gate-weighted KD tokens)
    out["n_ce_tokens"] = batch["response_mask"].sum()
    out["n_kd_tokens"] = (batch["response_mask"].float() * kd_weight).sum()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return per_example(s, batch), per_example(t, batch), out, grads


def test_pack_layout_positions_segments_and_real_fraction():
    pairs = [([5] * c, [6] * r) for c, r in [(7, 3), (2, 9), (4, 4), (12, 1), (3, 2)]]
    b = pack.pack(pairs, PAD, max_len=20)
    lengths = [c + r for c, r in [(7, 3), (2, 9), (4, 4), (12, 1), (3, 2)]]
    assert b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] <= 20      # ceil(47 / 20)
    assert int(b["attention_mask"].sum()) == sum(lengths)
    for i, n in enumerate(lengths):
        where = b["segment_ids"] == i
        assert int(where.sum()) == n
        assert b["position_ids"][where].tolist() == list(range(n))          # restarts at 0
        assert int((b["context_mask"] & where).sum()) == len(pairs[i][0])
    flat = b["input_ids"].reshape(-1)
    assert torch.equal(flat[b["logit_index"] + 1], b["labels"][0])           # next-token columns
    assert b["token_example"][0].tolist() == [i for i in b["order"] for _ in pairs[i][1]]
    with pytest.raises(ValueError, match=r"an example is 13 tokens, longer than the packed row "
                                         r"\(max_len 12\)"):
        pack.pack(pairs, PAD, max_len=12)


@pytest.mark.parametrize("scope", ["full", "image", "none"])
def test_packed_equals_padded_per_example(scope):
    teacher, student = models()
    pairs, views, w = examples(student.n_image_tokens)
    padded = data.lay_out(pairs, views, PAD)
    packed = pack.lay_out(pairs, views, PAD, 80)
    rows, L = packed["input_ids"].shape
    assert rows >= 2 and (packed["segment_ids"] >= 0).sum(1).min() > 0
    assert len(set(packed["segment_ids"][0].tolist()) - {-1}) >= 2         # several per row
    ref = forward_and_grads(student, teacher, padded, w, scope)
    out = forward_and_grads(student, teacher, packed, w, scope)
    for a, b in zip(ref[:2], out[:2]):                       # student, teacher logits
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    for key in ("loss", "ce", "kd", "n_ce_tokens", "n_kd_tokens"):
        torch.testing.assert_close(torch.as_tensor(out[2][key]), torch.as_tensor(ref[2][key]),
                                   atol=1e-5, rtol=1e-5)
    assert ref[2]["kd"] > 0 and ref[3].keys() == out[3].keys()
    for name, g in ref[3].items():
        torch.testing.assert_close(out[3][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_train_stages_packed_train_like_padded(tmp_path):
    """The tiny world's adapt and distill stages with --pack=true (rows of --max_len=64 tokens)
    log the same losses and gradient norms as the padded layout: same examples, same source
    gate (kd_weight per token), same normalisers."""
    import train
    from plumbing.devices import Devices
    cfg = train.get_config(["--preset=smoke", "--eval=false", "--align_steps=0",
                            "--adapt_steps=1", "--distill_steps=2", "--max_len=64"])
    examples, tok = train.build_data_and_tokenizer(cfg)
    teacher = Decoder(train.lm_config(cfg, tok))
    logs = {}
    for packed in (False, True):
        out = tmp_path / f"pack{packed}"
        out.mkdir()
        setup = train.TrainingSetup(train.TrainConfig(**{**cfg.__dict__, "pack": packed,
                                                 "out_dir": str(out)}), Devices("cpu"),
                            examples, tok)
        torch.manual_seed(0)
        adapted = train.stage_adapt(setup, copy.deepcopy(teacher))
        train.stage_distill(setup, copy.deepcopy(teacher), adapted)
        logs[packed] = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(logs[False]) == len(logs[True]) == 3             # adapt 1 step, distill 2 steps
    for a, b in zip(logs[False], logs[True]):
        assert a["stage"] == b["stage"]
        for key in ("loss", "ce", "kd", "grad_norm", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["stage"], key)
    assert logs[True][-2]["kd"] > 0


def test_streamed_examples_pack_like_they_pad(tmp_path):
    """StreamDataset.collate(packed=True): the same examples, tokens and image views as the padded
    batch, rows of at most max_len tokens; pack without a max_len is refused."""
    from PIL import Image
    Image.new("RGB", (12, 12), (200, 30, 30)).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "prompt": "<image> what colour?", "response": "red red red"},
             {"prompt": "two plus two", "response": "four"},
             {"prompt": "hello there friend", "response": "hi"},
             {"image": "a.png", "prompt": "and this one", "response": "also red"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tok = data.train_tokenizer([x["prompt"] + " " + x["response"] for x in lines] * 3, 300)
    ds = stream.StreamDataset(str(tmp_path / "d.jsonl"), tok, 4, 16, max_len=40)
    items = [ds[i] for i in range(len(ds))]
    padded, packed = ds.collate(items), ds.collate(items, packed=True)
    assert packed["input_ids"].shape[1] <= 40 and packed["input_ids"].shape[0] < len(items)
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    for i, it in enumerate(items):
        assert packed["input_ids"][packed["segment_ids"] == i].tolist() == \
            it["context"] + it["response"]
    assert sorted(packed["labels"][0].tolist()) == sorted(padded["labels"][padded["response_mask"]]
                                                          .tolist())
    first = packed["segment_ids"].reshape(-1)[(packed["segment_ids"].reshape(-1) >= 0)]
    seen = list(dict.fromkeys(first.tolist()))                 # examples in row order
    with_image = [i for i in seen if items[i]["image"] is not None]
    torch.testing.assert_close(packed["images"], torch.cat([items[i]["image"] for i in with_image]))
    ds.max_len = None
    with pytest.raises(ValueError, match="pack=True needs max_len"):
        ds.collate(items, packed=True)


# --------------------------------------------------------------------------- bad inputs (issue 21)

def test_corrupt_image_in_a_loader_worker_is_one_line_naming_file_and_line(tmp_path):
    """train.py --data_path with --num_workers=2: a corrupt image ends the run with one stderr
    line naming the JSONL file and line, no worker traceback. (--skip_bad=true skips and counts
    such examples instead: tests/test_stream.py, test_corrupt_parquet_image_names_the_row.)"""
    import subprocess
    import sys
    from conftest import make_teacher_and_jsonl
    teacher_dir, _, jsonl = make_teacher_and_jsonl(tmp_path)
    for png in tmp_path.glob("*.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "train.py", "--preset=smoke", f"--teacher_path={teacher_dir}",
            f"--data_path={jsonl}", "--kd_sources=text_qa", "--stage=distill", "--eval=false",
            "--num_workers=2", "--distill_steps=2", "--pack=true", "--max_len=128"]
    r = subprocess.run(argv + [f"--out_dir={tmp_path / 'out'}"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("train.py: ") and "train.jsonl line " in last \
        and "cannot read image" in last and "worker" not in last, last


def _ddp_worker(rank, port, ddp_argv, single_argv):
    """Ranks 0 and 1: one DDP run (gloo); rank 2, at the same time: the single-process run."""
    import train
    torch.set_num_threads(1)
    if rank == 2:
        train.run(train.get_config(single_argv))
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        train.run(train.get_config(ddp_argv))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_packed_two_ranks_match_one_padded_process(tmp_path):
    """Streamed data, stage 3: 2 gloo ranks x 2 examples, packed, train like 1 process x 4
    examples, padded: the CE / KD normalisers (real tokens, per-token source gate) are summed
    over ranks and micro-batches."""
    import socket
    from conftest import make_teacher_and_jsonl
    teacher_dir, _, jsonl = make_teacher_and_jsonl(tmp_path)
    argv = ["--preset=smoke", f"--teacher_path={teacher_dir}", f"--data_path={jsonl}",
            "--kd_sources=knowledge_vqa,text_qa", "--stage=distill", "--eval=false",
            "--num_workers=0", "--distill_steps=2", "--grad_accum=2", "--max_len=96"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    import torch._dynamo     # noqa: F401  (AdamW imports it, ~5 s): once, before forking
    torch.multiprocessing.start_processes(_ddp_worker, nprocs=3, start_method="fork", args=(
        port, argv + ["--batch_size=2", "--pack=true", f"--out_dir={ddp}"],
        argv + ["--batch_size=4", f"--out_dir={single}"]))
    a, b = ([json.loads(line) for line in open(d / "log.jsonl")] for d in (ddp, single))
    assert len(a) == len(b) == 2 and b[-1]["kd"] > 0       # the student starts as the teacher
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "grad_norm", "tokens"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-7), (ra["step"], key)

