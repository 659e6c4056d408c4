"""nanoVLM's image splitting (tiles.split_size / tile_grid / image_views, tiles.view_tokens,
tiles.collate with a splitting), several images per example, student-only view tokens in the KV
handoff, and nanoVLM checkpoints that carry their splitting tokens. Hand-worked expectations follow
nanoVLM's data/custom_transforms.py (DynamicResize, GlobalAndSplitImages) and data/processors.py
(get_image_string)."""
import json
import os

import pytest
import torch
from PIL import Image

import data
from scale import tiles
from conftest import load_jsonl
from scale.pack import handoff
from scale.tiles import view_tokens
from scale.tiles import ImageSplitting, image_views, split_size, tile_grid
from kvshare import freeze
from plumbing.checks import check_handoff_batch as check_batch
from model import LMConfig, VisionConfig, Decoder, VLM, vlm_from_teacher
from export_nanovlm import save_nanovlm
from scale.weights import load_nanovlm, save_vlm, load_vlm, NANOVLM_EXTRA_TOKENS


# ---------------------------------------------------------------------------------------
# The rules, on hand-worked cases

def nanovlm_string(n_h, n_w, n):
    """get_image_string for one image, written out: image token <|image|>."""
    img = "<|image|>" * n
    if (n_h, n_w) == (1, 1):
        return "<|global_image|>" + img
    return "<|global_image|>" + img + "".join(f"<row_{r}_col_{c}>" + img for r in range(1, n_h + 1)
                                              for c in range(1, n_w + 1))


@pytest.mark.parametrize("n_h,n_w,expected", [
    (1, 1, "<|global_image|>II"),
    (1, 2, "<|global_image|>II<row_1_col_1>II<row_1_col_2>II"),
    (2, 1, "<|global_image|>II<row_1_col_1>II<row_2_col_1>II"),
    (2, 3, "<|global_image|>II<row_1_col_1>II<row_1_col_2>II<row_1_col_3>II"
           "<row_2_col_1>II<row_2_col_2>II<row_2_col_3>II"),
])
def test_view_tokens_hand_worked(n_h, n_w, expected):
    got = "".join("I" if t == data.IMAGE_TOKEN else t for t in view_tokens(n_h, n_w, 2))
    assert got == expected
    assert got.replace("I", "<|image|>") == nanovlm_string(n_h, n_w, 2)


def test_view_tokens_all_grids_match_nanovlm_and_limits():
    for n_h in range(1, 9):
        for n_w in range(1, 9):
            s = "".join("<|image|>" if t == data.IMAGE_TOKEN else t
                        for t in view_tokens(n_h, n_w, 3))
            assert s == nanovlm_string(n_h, n_w, 3)
    assert tiles.VIEW_TOKENS == tuple(list(NANOVLM_EXTRA_TOKENS.values())[1:])     # nanoVLM's order
    with pytest.raises(ValueError, match="9x1 split has no grid tokens"):
        view_tokens(9, 1, 2)


@pytest.mark.parametrize("hw,to_max,expected", [
    # resize_to_max_side_len = False: long side rounds UP to a tile multiple (cap 2048), short side
    # scaled by the same factor and rounded UP
    ((300, 400), False, (512, 512)),        # long 400 -> 512, short 300 * 1.28 = 384 -> 512
    ((600, 1000), False, (1024, 1024)),     # 1000 -> 1024, 600 * 1.024 = 614.4 -> 1024
    ((500, 1100), False, (1024, 1536)),     # 1100 -> 1536, 500 * 1.396 = 698.2 -> 1024
    ((1100, 500), False, (1536, 1024)),     # the same, portrait
    ((3000, 1000), False, (2048, 1024)),    # 3000 -> min(2048, 3072), 1000 * 0.683 = 682.7 -> 1024
    ((512, 512), False, (512, 512)),
    ((513, 512), False, (1024, 1024)),      # 513 -> 1024, 512 * 1.996 = 1022 -> 1024
    ((5, 1000), False, (512, 1024)),        # short side never below one tile
    # resize_to_max_side_len = True (nanoVLM's default): long side becomes 2048, small images
    # upscaled
    ((300, 400), True, (1536, 2048)),       # 300 * 5.12 = 1536
    ((100, 1000), True, (512, 2048)),       # 100 * 2.048 = 204.8 -> 512
    ((2048, 2048), True, (2048, 2048)),
    ((1000, 999), True, (2048, 2048)),      # 999 * 2.048 = 2045.95 -> 2048
    ((400, 1000), True, (1024, 2048)),      # 400 * 2.048 = 819.2 -> 1024
])
def test_split_size_hand_worked(hw, to_max, expected):
    assert split_size(*hw, tile=512, max_side=2048, resize_to_max_side=to_max) == expected
    assert tile_grid(*expected, 512) == (expected[0] // 512, expected[1] // 512)


def test_tile_grid_rejects_non_multiples_and_config_is_checked():
    with pytest.raises(ValueError, match="not a multiple of the tile 512"):
        tile_grid(512, 700, 512)
    with pytest.raises(ValueError, match="1..8 tiles of 512"):
        ImageSplitting(max_side=4608).check_tile(512)
    with pytest.raises(ValueError, match="pixels"):
        ImageSplitting(pixels="[0,255]")


def quadrant_image(tile, n_h, n_w):
    """An image of n_h x n_w solid tiles, tile (r, c) coloured (40 r, 40 c, 200)."""
    im = Image.new("RGB", (n_w * tile, n_h * tile))
    for r in range(n_h):
        for c in range(n_w):
            im.paste((40 * r, 40 * c, 200), (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
    return im


def test_image_views_global_first_then_tiles_row_major():
    split = ImageSplitting(max_side=96, resize_to_max_side=False)
    im = quadrant_image(32, 2, 3)                                   # already 64 x 96: no resize
    views, grid = image_views(im, 32, split)
    assert grid == (2, 3) and views.shape == (7, 3, 32, 32)
    for k, (r, c) in enumerate((r, c) for r in range(2) for c in range(3)):
        expected = tiles.image_to_tensor(Image.new("RGB", (32, 32), (40 * r, 40 * c, 200)), 32)
        torch.testing.assert_close(views[1 + k], expected)
    torch.testing.assert_close(views[0],
                               tiles.image_to_tensor(im.resize((32, 32), Image.BILINEAR), 32))
    # 1x1: only the global view
    one, grid = image_views(Image.new("RGB", (20, 10), (9, 9, 9)), 32, split)
    assert grid == (1, 1) and one.shape == (1, 3, 32, 32)
    unit, _ = image_views(im, 32,
                          ImageSplitting(max_side=96, resize_to_max_side=False, pixels="[0,1]"))
    torch.testing.assert_close(unit, (views + 1) / 2)
    plain, grid = image_views(im, 32, None)                        # splitting off: today's one view
    assert grid == (1, 1) and torch.equal(plain[0], tiles.image_to_tensor(im, 32))


# ---------------------------------------------------------------------------------------
# Encoding and batches

TILE, PATCH, SHUFFLE = 32, 8, 2                        # 4x4 patches -> 4 image tokens per view
VIS = VisionConfig(image_size=TILE, patch_size=PATCH, dim=32, n_layers=1, n_heads=4, mlp_dim=64)
SPLIT = ImageSplitting(max_side=96, resize_to_max_side=False)
CORPUS = ["the red circle eats apples .", "what differs between the two ?", "a b c d e f g h"] * 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    data.train_tokenizer(CORPUS, 300).save(path)
    return data.load_tokenizer(path, extra_tokens=tiles.VIEW_TOKENS)


def test_load_tokenizer_appends_view_tokens_in_nanovlm_order(tok):
    ids = [tok.token_to_id(t) for t in tiles.VIEW_TOKENS]
    assert ids == list(range(300, 365)) and tok.token_to_id(data.IMAGE_TOKEN) == 2


def test_several_images_expand_in_order_with_nanovlm_image_labels(tok):
    ex = {"image": [Image.new("RGB", (10, 10)), Image.new("RGB", (30, 60))], "source": "s",
          "prompt": "<image> and <image> what differs", "response": " a ."}
    ctx, _ = tiles.encode_example(ex, tok, 4, grids=[(1, 1), (1, 2)])
    ids = lambda t: tok.encode(t).ids
    name = {t: data.special_id(tok, t) for t in (data.IMAGE_TOKEN, *tiles.VIEW_TOKENS)}
    block = lambda g: [name[t] for t in view_tokens(*g, 4)]
    assert ctx == (ids("<image: 0>") + block((1, 1)) + ids(" and <image: 1>") + block((1, 2))
                   + ids(" what differs"))
    one = {**ex, "image": ex["image"][0], "prompt": "what differs"}  # no tag: image first, no label
    assert tiles.encode_example(one, tok, 4,
                                grids=[(2, 1)])[0] == block((2, 1)) + ids("what differs")
    assert data.encode_example(one, tok, 4)[0] == [name[data.IMAGE_TOKEN]] * 4 + ids("what differs")
    with pytest.raises(ValueError, match="has 1 <image> tags for 2 image"):
        tiles.encode_example({**ex, "prompt": "<image> x"}, tok, 4, grids=[(1, 1), (1, 1)])


def tiled_examples(several=True):
    images = [Image.new("RGB", (60, 30), (200, 10, 10)),
              quadrant_image(32, 2, 2)][:2 if several else 1]
    return [{"image": images, "source": "s", "prompt": "<image>" * len(images) + " what differs",
             "response": " a b ."},
            {"image": None, "prompt": "the red circle eats", "response": " apples ."},
            {"image": quadrant_image(16, 1, 3), "prompt": "the red circle", "response": " eats ."}]


def test_collate_views_follow_token_order(tok):
    exs = [dict(e, source="s") for e in tiled_examples()]
    b = tiles.collate(exs, tok, 4, TILE, splitting=SPLIT)
    assert b["grids"] == [[(1, 2), (2, 2)], [], [(1, 2)]]         # 60x30 -> 64x32; 48x16 -> 64x32
    assert b["images"].shape == (3 + 5 + 3, 3, TILE,
                                 TILE) and [len(g) > 0 for g in b["grids"]] == [True, False, True]
    n_slots = int((b["input_ids"] == data.special_id(tok, data.IMAGE_TOKEN)).sum())
    assert n_slots == b["images"].shape[0] * 4
    first = image_views(exs[0]["image"][0], TILE, SPLIT)[0]
    torch.testing.assert_close(b["images"][:3], first)
    torch.testing.assert_close(b["images"][8:], image_views(exs[2]["image"], TILE, SPLIT)[0])
    off = data.collate(exs, tok, 4, TILE)                        # splitting off: one view per image
    assert off["images"].shape[0] == 3 and off["grids"] == [[(1, 1), (1, 1)], [], [(1, 1)]]


# ---------------------------------------------------------------------------------------
# The handoff with tiled images: student := teacher copy => teacher's logits == student's

def student_copy(tok):
    torch.manual_seed(0)
    teacher = freeze(Decoder(LMConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                      ffn_dim=96)))
    view_ids = [data.special_id(tok, t) for t in tiles.VIEW_TOKENS]
    student = vlm_from_teacher(teacher, VIS, data.special_id(tok, data.IMAGE_TOKEN), SHUFFLE,
                               view_ids, SPLIT).eval()
    return teacher, student


@pytest.mark.parametrize("scope", ["full", "image", "none"])
def test_identity_handoff_with_tiled_images(tok, scope):
    teacher, student = student_copy(tok)
    # several images per example put nanoVLM's "<image: i>" text before each: scope "image" needs
    # every student-only column before the text, so it gets one (tiled) image per example
    exs = tiled_examples(several=scope != "image")
    b = tiles.collate([dict(e, source="s") for e in exs], tok, 4, TILE, splitting=SPLIT)
    assert student.decoder.cfg.vocab_size == 365 and max(student.student_only_ids) == 364
    with torch.no_grad():
        s_logits, t_logits = handoff(student, teacher, b, student.student_only_ids, scope)
    m = b["response_mask"].clone()
    if scope == "none":
        m[[0, 2]] = False        # without image KV the teacher differs where the student saw images
    torch.testing.assert_close(t_logits[m], s_logits[..., :300][m], atol=1e-5, rtol=1e-5)


def test_view_tokens_must_be_declared_student_only(tok):
    teacher, student = student_copy(tok)
    b = tiles.collate([dict(tiled_examples()[2], source="s")], tok, 4, TILE, splitting=SPLIT)
    with pytest.raises(ValueError, match="outside the teacher's vocabulary.*student_only_ids"):
        check_batch(b, student.image_token_id, teacher.cfg.vocab_size, "full")


def test_view_count_mismatch_is_a_clear_error(tok):
    _, student = student_copy(tok)
    b = tiles.collate([dict(tiled_examples()[2], source="s")], tok, 4, TILE, splitting=SPLIT)
    with pytest.raises(ValueError,
                       match="12 image placeholder tokens in input_ids but 8 image features"):
        student.check_image_slots(b["input_ids"], b["images"][:2])     # on the host


# ---------------------------------------------------------------------------------------
# Model folders carry their splitting

def nanovlm_splitting_folder(tmp_path, vlm):
    from test_nanovlm import nanovlm_files_by_hand
    folder = tmp_path / "nv"
    nanovlm_files_by_hand(vlm, folder)
    cfg = json.load(open(folder / "config.json"))
    cfg.update(lm_vocab_size=166, extra_token_amount=66, vlm_extra_tokens=NANOVLM_EXTRA_TOKENS,
               max_img_size=96, resize_to_max_side_len=False)
    json.dump(cfg, open(folder / "config.json", "w"))
    return folder


def test_nanovlm_checkpoint_with_image_splitting_loads_and_runs(tmp_path):
    from test_nanovlm import LM, VIS as NVIS
    vlm = VLM(LMConfig(**{**LM, "vocab_size": 166}), VisionConfig(**NVIS), 100, 2).eval()
    folder = nanovlm_splitting_folder(tmp_path, vlm)
    r = load_nanovlm(folder).eval()
    assert r.image_token_id == 100 and r.view_token_ids == tuple(range(101, 166))
    assert r.image_splitting == ImageSplitting(max_side=96, resize_to_max_side=False,
                                               pixels="[0,1]")
    # a tokenizer-free batch: nanoVLM ids, one 2x3 image then text
    names = {data.IMAGE_TOKEN: 100, **{t: 101 + i for i, t in enumerate(tiles.VIEW_TOKENS)}}
    views, grid = image_views(quadrant_image(32, 2, 3), 32, r.image_splitting)
    ids = torch.tensor([[names[t] for t in view_tokens(*grid, r.n_image_tokens)] + [5, 6, 7]])
    assert views.min() >= 0 and grid == (2, 3)
    with torch.no_grad():
        assert torch.equal(r(ids, views)[0], vlm(ids, views)[0])
    save_nanovlm(r, tmp_path / "again")                            # the splitting round-trips
    cfg = json.load(open(tmp_path / "again" / "config.json"))
    assert cfg["max_img_size"] == 96 and cfg["resize_to_max_side_len"] is False
    again = load_nanovlm(tmp_path / "again")
    assert again.view_token_ids == r.view_token_ids and again.image_splitting == r.image_splitting


def test_a_train_py_splitting_student_exports_to_nanovlm_pixels_with_the_same_outputs(tmp_path):
    """train.py builds image-splitting students that read [-1, 1] pixels; nanoVLM reads [0, 1].
    save_nanovlm folds the difference into the patch embedding: the nanoVLM folder, fed its own
    [0, 1] views, gives the student's outputs on the student's [-1, 1] views."""
    from test_nanovlm import LM, VIS as NVIS
    split = ImageSplitting(max_side=64, resize_to_max_side=False)          # pixels "[-1,1]"
    student = VLM(LMConfig(**{**LM, "vocab_size": 166}), VisionConfig(**NVIS), 100, 2,
                  view_token_ids=tuple(range(101, 166)), image_splitting=split).eval()
    save_nanovlm(student, tmp_path / "nv")
    nv = load_nanovlm(tmp_path / "nv").eval()
    assert nv.image_splitting == ImageSplitting(max_side=64, resize_to_max_side=False,
                                                pixels="[0,1]")
    names = {data.IMAGE_TOKEN: 100, **{t: 101 + i for i, t in enumerate(tiles.VIEW_TOKENS)}}
    image = quadrant_image(32, 1, 2)
    ours, grid = image_views(image, 32, student.image_splitting)
    theirs, _ = image_views(image, 32, nv.image_splitting)
    assert ours.min() < 0 <= theirs.min() and grid == (1, 2)
    ids = torch.tensor([[names[t] for t in view_tokens(*grid, nv.n_image_tokens)] + [5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(nv(ids, theirs)[0], student(ids, ours)[0], rtol=1e-4,
                                   atol=1e-5)


def test_nanovlm_without_view_tokens_keeps_one_view(tmp_path):
    from test_nanovlm import random_vlm, nanovlm_files_by_hand
    nanovlm_files_by_hand(random_vlm(), tmp_path / "nv")
    r = load_nanovlm(tmp_path / "nv")
    assert r.view_token_ids == () and r.image_splitting is None and r.student_only_ids == (100,)


def test_our_vlm_folder_keeps_view_tokens_and_splitting(tmp_path, tok):
    _, student = student_copy(tok)
    save_vlm(student, tmp_path / "m")
    r = load_vlm(tmp_path / "m")
    assert r.view_token_ids == student.view_token_ids and r.image_splitting == SPLIT


def test_jsonl_line_with_several_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 4)).save(tmp_path / "b.png")
    (tmp_path
     / "d.jsonl").write_text(json.dumps({"image": ["a.png", "b.png"], "prompt": "<image><image> x",
                                                  "response": " y"}) + "\n")
    [ex] = load_jsonl(str(tmp_path / "d.jsonl"))
    assert [im.size for im in ex["image"]] == [(8, 8), (8, 4)]


def test_eval_batches_follow_the_models_image_splitting(tok):
    """eval.py builds batches in the model's own layout: a student with image splitting is
    scored on its tiles + global view (else the image-token count would not match)."""
    import eval as evaluation
    vlm = VLM(LMConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8),
              VisionConfig(image_size=TILE, patch_size=4, dim=16, n_layers=1, n_heads=2),
              tok.token_to_id(data.IMAGE_TOKEN), 2, view_token_ids=tuple(range(300, 365)),
              image_splitting=ImageSplitting(max_side=2 * TILE)).eval()
    example = {"image": Image.new("RGB", (2 * TILE, TILE)), "prompt": "<image> is",
               "response": " x", "source": "s"}
    b = next(evaluation.batches([example], tok, vlm, TILE, 4, "cpu"))
    assert b["grids"] == [[(1, 2)]] and b["images"].shape[0] == 3        # global view + 2 tiles
