"""Streaming real data (stream.StreamDataset, StepBatchSampler, make_loader): a lazy index that
decodes no image, JSONL and Parquet giving the same examples, one example per assistant turn,
the max_len rule, a batch order that is a pure function of (seed, step) for any worker count,
resume, DDP slices, and bad data that names its file and line/row (also from a worker)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
from scale import stream
from conftest import load_jsonl

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200),
           (90, 90, 90)]
# (image index or None, [(user, assistant), ...], source)
CONVS = [
    (0, [("<image>\nWhat colour is it?", "Red."), ("Are you sure?", "Yes, red.")], "vqa"),
    (1, [("Describe the image.", "A green square.")], "caption"),
    (None, [("What is two plus two?", "Four.")], "text_qa"),
    (2, [("<image> colour?", "Blue."), ("and again?", "Blue."), ("last one?", "Still blue.")],
     "vqa"),
    (None, [("Hi", "Hello"), ("Bye", "Ciao")], "text_qa"),
    (3, [("What is shown?", "Yellow.")], "caption"),
    (4, [("<image>\nColour?", "Cyan.")], "vqa"),
    (5, [("Shade?", "Grey."), ("Dark or light?", "Mid.")], "caption"),
]
N_EXAMPLES = sum(len(turns) for _, turns, _ in CONVS)      # 13


@pytest.fixture(scope="module")
def tok():
    texts = [t for _, turns, _ in CONVS for pair in turns for t in pair]
    return data.train_tokenizer(texts * 5, vocab_size=300)


def png_bytes(colour, size=12):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def jsonl_line(image, turns, source):
    said = [{"from": r, "value": v} for pair in turns for r, v in zip(("human", "gpt"), pair)]
    line = {"conversations": said, "source": source}
    return json.dumps({**line, "image": f"img{image}.png"} if image is not None else line)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same conversations as JSONL (+ PNG files) and as Parquet (PNG bytes, 2-row groups)."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    d = tmp_path_factory.mktemp("stream")
    for i, c in enumerate(COLOURS):
        (d / f"img{i}.png").write_bytes(png_bytes(c))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "train.jsonl").write_text("\n".join(jsonl_line(*c) for c in CONVS) + "\n\n")
    table = pa.table({
        "images": [[{"bytes": png_bytes(COLOURS[im]), "path": None}] if im is not None else []
                   for im, _, _ in CONVS],
        "texts": [[{"user": u, "assistant": a} for u, a in turns] for _, turns, _ in CONVS],
        "source": [s for _, _, s in CONVS]})
    pq.write_table(table, d / "train.parquet", row_group_size=2)
    return d


def dataset(path, tok, **kw):
    return stream.StreamDataset(str(path), tok, **{"n_image_tokens": 4, "image_size": 16, **kw})


def test_index_decodes_no_image_and_holds_only_integers(files, tok, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    ds = dataset(files / "train.jsonl", tok)
    assert len(ds) == N_EXAMPLES and opened == []
    arrays = [v for v in vars(ds).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) == 5 * 8 * N_EXAMPLES          # 5 integers per example
    assert not any(isinstance(v, (Image.Image, torch.Tensor, bytes)) for v in vars(ds).values())
    item = ds[0]
    assert len(opened) == 1 and item["image"].shape == (1, 3, 16, 16)
    assert ds.source_counts() == {"vqa": 6, "caption": 4, "text_qa": 3}


def decoded(ds, tok, i):
    it = ds[i]
    image = None if it["image"] is None else it["image"].tolist()
    text = lambda ids: tok.decode(ids, skip_special_tokens=False)
    return text(it["context"]), text(it["response"]), it["source"], image


def test_jsonl_and_parquet_give_the_same_examples(files, tok):
    a, b = dataset(files / "train.jsonl", tok), dataset(files / "train.parquet", tok)
    assert len(a) == len(b) == N_EXAMPLES
    for i in range(N_EXAMPLES):
        x, y = a[i], b[i]
        for key in ("context", "response", "source"):
            assert x[key] == y[key]
        assert (x["image"] is None) == (y["image"] is None)
        assert x["image"] is None or torch.equal(x["image"], y["image"])


def test_every_assistant_turn_is_an_example_with_the_earlier_turns_as_context(files, tok):
    ds = dataset(files / "train.jsonl", tok)
    ctx = [decoded(ds, tok, i)[:2] for i in range(3)]
    image = "<image>" * 4
    assert ctx[0] == (f"{image}\nWhat colour is it?", "Red.<eos>")
    assert ctx[1] == (f"{image}\nWhat colour is it?\nRed.\nAre you sure?", "Yes, red.<eos>")
    assert ctx[2] == (f"{image}Describe the image.", "A green square.<eos>")   # no tag: image first
    last = dataset(files / "train.jsonl", tok, turns="last")
    assert len(last) == len(CONVS)
    # the last turn is exactly what load_jsonl makes of each line
    eager = load_jsonl(str(files / "train.jsonl"))
    for i, ex in enumerate(eager):
        context, response = data.encode_example(ex, tok, 4)
        it = last[i]
        assert (it["context"], it["response"], it["source"]) == (context, response, ex["source"])


def test_max_len_rule_cuts_the_response_tail_then_drops(files, tok):
    assert stream.fit_to_max_len(5, 3, None) == 3
    assert stream.fit_to_max_len(5, 3, 8) == 3
    assert stream.fit_to_max_len(5, 3, 7) == 2              # response tail cut, context whole
    assert stream.fit_to_max_len(5, 3, 6) == 1
    assert stream.fit_to_max_len(5, 3, 5) == 0              # no room for one response token: drop
    full = dataset(files / "train.jsonl", tok)
    n_ctx, n_resp = len(full[0]["context"]), len(full[0]["response"])
    cut = dataset(files / "train.jsonl", tok, max_len=n_ctx + 1)
    assert cut[0]["context"] == full[0]["context"] and cut[0]["response"] == full[0]["response"][:1]
    assert n_resp > 1 and cut[0]["dropped"] == 0
    # example 1 has a longer context than example 0: dropped, replaced by the next usable index
    assert len(full[1]["context"]) > n_ctx
    item = cut[1]
    assert item["dropped"] >= 1 and item["index"] > 1
    assert len(item["context"]) + len(item["response"]) <= n_ctx + 1
    batch = cut.collate([cut[0], cut[1]])
    assert batch["dropped"] == item["dropped"] and batch["input_ids"].shape[1] <= n_ctx + 1 + n_ctx


def test_order_is_a_pure_function_of_seed_and_step():
    order = lambda seed: [stream.StepBatchSampler(13, 4, seed).global_batch(k).tolist()
                          for k in range(7)]
    batches = order(3)
    assert batches == order(3) and batches != order(4)
    seq = [i for b in batches for i in b]
    assert sorted(seq[:13]) == sorted(seq[13:26]) == list(range(13))     # epoch = permutation
    assert seq[:13] != seq[13:26]
    in_order = stream.StepBatchSampler(13, 4, seed=3, shuffle=False)
    assert in_order.global_batch(3).tolist() == [12, 0, 1, 2]


def test_ddp_ranks_are_disjoint_and_make_up_the_global_batch():
    world = 3
    for step in (0, 5):
        glob = stream.StepBatchSampler(20, 2, seed=1, world_size=world).global_batch(step).tolist()
        parts = [next(iter(stream.StepBatchSampler(20, 2, 1, step, rank=r, world_size=world)))
                 for r in range(world)]
        assert sum(parts, []) == glob and len(set(glob)) == len(glob) == 2 * world


def batches(loader, n):
    out, it = [], iter(loader)
    for _ in range(n):
        b = next(it)
        out.append((b["index"].tolist(), b["input_ids"].tolist(), b["images"].tolist(),
                    b["source"]))
    return out


def test_loader_same_batches_for_0_and_2_workers_and_on_resume(files, tok):
    ds = dataset(files / "train.parquet", tok)
    plain = batches(stream.make_loader(ds, 3, seed=7), 8)
    assert batches(stream.make_loader(ds, 3, seed=7, num_workers=2, timeout=30), 8) == plain
    resumed = stream.make_loader(ds, 3, seed=7, start_step=5, num_workers=2, timeout=30)
    assert batches(resumed, 3) == plain[5:]
    sampler = stream.StepBatchSampler(len(ds), 3, seed=7)
    assert [b[0] for b in plain] == [sampler.global_batch(k).tolist() for k in range(8)]
    b = next(iter(stream.make_loader(ds, 4, seed=7, steps=1)))
    P = b["context_len"]
    assert (b["attention_mask"][:, P - 1] == 1).all() and (b["attention_mask"][:, P] == 1).all()
    assert b["images"].shape[0] == sum(len(g) for g in b["grids"]) and b["skipped"] == 0


def write_bad_jsonl(files, bad_line_3):
    lines = [jsonl_line(*CONVS[1]), jsonl_line(*CONVS[2]), bad_line_3, jsonl_line(*CONVS[5])]
    path = files / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_line_while_indexing_names_file_and_line(files, tok, capsys):
    path = write_bad_jsonl(files, '{"prompt": "hi"}')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: missing field"):
        dataset(path, tok)
    ds = dataset(path, tok, skip_bad=True)
    assert len(ds) == 3 and ds.n_bad_index == 1 and "skipped 1 bad" in capsys.readouterr().err


def test_corrupt_image_in_a_worker_names_file_and_line_and_stops(files, tok):
    bad = {"image": "corrupt.png", "prompt": "a", "response": "b"}
    path = write_bad_jsonl(files, json.dumps(bad))
    ds = dataset(path, tok)                       # the file exists: indexing accepts the line
    loader = stream.make_loader(ds, 2, seed=0, steps=4, num_workers=2, timeout=30)
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: cannot read image .*corrupt\.png"):
        for _ in loader:
            pass
    assert loader._iterator is None                # its workers were stopped at once, not at gc


def test_corrupt_parquet_image_names_the_row(files, tok):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    images = [[{"bytes": png_bytes(COLOURS[0]), "path": None}]] * 4
    images[2] = [{"bytes": b"garbage", "path": None}]
    path = files / "bad.parquet"
    texts = [[{"user": "q", "assistant": "a"}]] * 4
    pq.write_table(pa.table({"images": images, "texts": texts}), path, row_group_size=3)
    with pytest.raises(ValueError, match=r"bad\.parquet row 2: cannot read image its image"):
        dataset(path, tok)[2]
    ds = dataset(path, tok, skip_bad=True)
    item = ds[2]
    assert item["index"] == 3 and item["skipped"] == 1 and "row 2" in item["errors"][0]
    seen = 0
    for b in stream.make_loader(ds, 2, seed=0, steps=4, num_workers=2, timeout=30):
        assert 2 not in b["index"].tolist()
        seen += b["skipped"]
    sampler = stream.StepBatchSampler(4, 2, seed=0)
    order = [i for k in range(4) for i in sampler.global_batch(k).tolist()]
    assert seen == order.count(2) > 0          # every draw of the bad row was replaced and counted
