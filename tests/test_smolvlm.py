"""SmolVLM / Idefics3 students (transformers' layout): tiny random models built with transformers'
own config classes (no download) load with their logits on images + text (image splitting
included: the same pixels, the same token ids), export back to a folder transformers loads with
our logits, and the image layout follows the processor."""
import json
import os

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers",
                                   reason="transformers not installed (requirements-dev.txt)")

import data                                                   # noqa: E402
from scale import tiles                                                  # noqa: E402
from model import VLM, pixel_shuffle                          # noqa: E402
from scale.weights import load_model_folder, load_smolvlm, save_vlm, with_student_only_tail  # noqa: E402

BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["User: what is in the picture? Assistant: a red circle and a blue square .",
          "the cat sat on the mat . what colour is it ? it is red ."] * 20
LAYOUT = (["<fake_token_around_image>", "<image>", "<global-img>"]
          + [tiles.grid_token(r, c) for r in range(1, 7) for c in range(1, 7)]
          + ["<end_of_utterance>"])
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)                       # 4x4 patches
TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
            max_position_embeddings=512)
SCALE = 2                                                          # 4 image tokens per view


def tokenizer_folder(folder):
    """A byte-level BPE tokenizer (the teacher's, ids 0..base-1) with SmolVLM's image-layout
    tokens appended after it, saved as transformers saves a SmolVLM tokenizer. Returns
    (hf tokenizer, base vocabulary size)."""
    raw = data.train_tokenizer(CORPUS, 320, BASE_SPECIALS)
    base = raw.get_vocab_size()
    os.makedirs(folder, exist_ok=True)
    raw.save(os.path.join(folder, "teacher_tokenizer.json"))       # the LM's own: ids 0..base-1
    raw.add_special_tokens(LAYOUT)
    raw.save(os.path.join(folder, "tokenizer.json"))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(folder, "tokenizer.json"), eos_token="<end_of_utterance>",
        pad_token="<|im_end|>")
    return tok, base


def smolvlm_folder(folder, split=True, tied=False, model_type="smolvlm", longest_edge=64,
                   rope_theta=10000.0):
    """A tiny random SmolVLM (or Idefics3) checkpoint + its processor, written by transformers.
    Returns (model, processor, teacher vocabulary size)."""
    tok, base = tokenizer_folder(folder)
    n_vocab = len(tok) + 3                                  # a few unused rows, as real checkpoints
    Config, Model = {"smolvlm": (transformers.SmolVLMConfig,
                                 transformers.SmolVLMForConditionalGeneration),
                     "idefics3": (transformers.Idefics3Config,
                                  transformers.Idefics3ForConditionalGeneration)}[model_type]
    cfg = Config(vision_config=VISION, text_config={**TEXT, "vocab_size": n_vocab,
                                                    "tie_word_embeddings": tied,
                                                    "rope_theta": rope_theta},
                 scale_factor=SCALE, image_token_id=tok.convert_tokens_to_ids("<image>"),
                 tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():                               # every parameter random, norms included
        for p in model.parameters():
            p.normal_(std=0.3)
    model.save_pretrained(folder)
    image_processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": 32},
        do_image_splitting=split)
    processor = transformers.Idefics3Processor(image_processor, tok, image_seq_len=4)
    processor.save_pretrained(folder)
    return model, processor, base


def picture(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                         dtype=torch.uint8).numpy())


EXAMPLES = [  # (images, prompt, response)
    ([picture(50, 37)], "<image>what is in the picture?", " a red circle ."),       # 2x2 tiles
    ([picture(30, 70, 1)], "User: what colour is it?<image>", " it is red ."),      # 2x1 tiles
    ([picture(20, 20, 2), picture(64, 20, 3)], "<image><image>the cat", " sat on the mat ."),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("smolvlm"))
    model, processor, base = smolvlm_folder(path)
    return path, model, processor, base


def ours_and_theirs(vlm, tok, model, processor, images, prompt, response):
    """(our input ids, our views, our logits), (their ids, pixel values, logits) for one
    example: ours through tiles.collate with the student's splitting, theirs through the
    transformers processor on the same text."""
    ex = {"image": images, "prompt": prompt, "response": response, "source": "s"}
    batch = tiles.collate([ex], tok, vlm.n_image_tokens, vlm.vision.cfg.image_size,
                          splitting=vlm.image_splitting)
    with torch.no_grad():
        ours = vlm(batch["input_ids"], images=batch["images"],
                   attention_mask=batch["attention_mask"])[0]
    enc = processor(text=[prompt + response + "<end_of_utterance>"], images=[images],
                    return_tensors="pt")
    with torch.no_grad():
        theirs = model(**enc).logits
    return (batch["input_ids"], batch["images"], ours), (enc["input_ids"],
                                                         enc["pixel_values"][0], theirs)


@pytest.mark.parametrize("i", range(len(EXAMPLES)))
def test_loader_reproduces_transformers_logits_with_image_splitting(folder, i):
    path, model, processor, _ = folder
    vlm = load_smolvlm(path)
    tok = data.load_tokenizer(os.path.join(path, "tokenizer.json"))
    (ids, views, ours), (their_ids, pixels, theirs) = ours_and_theirs(vlm, tok, model, processor,
                                                                      *EXAMPLES[i])
    assert ids.tolist() == their_ids.tolist()             # the processor's image-token layout
    torch.testing.assert_close(views, pixels[:views.shape[0]], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_load_reads_the_folder(folder):
    path, model, _, base = folder
    vlm = load_model_folder(path)                          # dispatch on model_type "smolvlm"
    assert isinstance(vlm, VLM) and vlm.n_image_tokens == 4
    assert vlm.image_splitting == tiles.Idefics3Splitting(longest_edge=64, tile=32, split=True,
                                                          resample=1)
    tok = data.load_tokenizer(os.path.join(path, "tokenizer.json"))
    assert vlm.image_token_id == tok.token_to_id("<image>") == model.config.image_token_id
    layout = {tok.token_to_id(t) for t in ("<fake_token_around_image>", "<global-img>",
                                           "<row_1_col_1>", "<row_2_col_2>")}
    assert layout <= set(vlm.student_only_ids)
    # every id past the teacher's vocabulary is student-only once the teacher is known
    with_student_only_tail(vlm, base)
    assert set(vlm.student_only_ids) == set(range(base, vlm.decoder.cfg.vocab_size))


@pytest.mark.parametrize("model_type,tied,split", [("idefics3", True, False),
                                                   ("smolvlm", True, True)])
def test_idefics3_tied_and_unsplit_variants_load_with_their_logits(tmp_path, model_type, tied,
                                                                   split):
    model, processor, _ = smolvlm_folder(str(tmp_path), split=split, tied=tied,
                                         model_type=model_type)
    vlm = load_smolvlm(str(tmp_path))
    assert vlm.decoder.cfg.tie_embeddings == tied
    tok = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    (ids, _, ours), (their_ids, _, theirs) = ours_and_theirs(vlm, tok, model, processor,
                                                             *EXAMPLES[0])
    assert ids.tolist() == their_ids.tolist()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_like_the_single_file(folder, tmp_path):
    import shutil
    path, model, _, _ = folder
    shutil.copytree(path, tmp_path / "sharded", ignore=shutil.ignore_patterns("model.safetensors"))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    one, many = load_smolvlm(path), load_smolvlm(str(tmp_path / "sharded"))
    for k, v in one.state_dict().items():
        assert torch.equal(many.state_dict()[k], v), k


def test_connector_pixel_shuffle_is_model_pixel_shuffle():
    """Idefics3's connector ordering equals model.pixel_shuffle's (so the projector is reused)."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    cfg = transformers.Idefics3Config(vision_config=VISION, text_config={**TEXT, "vocab_size": 10},
                                      scale_factor=SCALE)
    x = torch.randn(3, 64, 5)                                           # 8x8 patches
    for s in (2, 4):
        torch.testing.assert_close(Idefics3Connector(cfg).pixel_shuffle(x, s), pixel_shuffle(x, s),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("hw", [(37, 50), (70, 30), (20, 20), (20, 64), (500, 20), (33, 97)])
def test_splitting_geometry_matches_the_processor(hw):
    """Rows, columns and views (tiles first, the global view last) for sizes around the tile."""
    h, w = hw
    proc = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 64},
                                                  max_image_size={"longest_edge": 32})
    image = picture(w, h)
    out = proc([[image]], return_row_col_info=True, return_tensors="pt")
    views, grid = tiles.image_views(image, 32, tiles.Idefics3Splitting(longest_edge=64, tile=32))
    assert (grid.rows, grid.cols) == (out["rows"][0][0], out["cols"][0][0])
    torch.testing.assert_close(views, out["pixel_values"][0][:views.shape[0]], atol=1e-6, rtol=0)


def test_image_prompt_is_the_processors_text():
    n = 2
    img = "<image>" * n
    fake, glob = "<fake_token_around_image>", "<global-img>"
    assert tiles.idefics3_image_prompt(tiles.Idefics3Grid(0, 0), n) == f"{fake}{glob}{img}{fake}"
    assert tiles.idefics3_image_prompt(tiles.Idefics3Grid(1, 2), n) == (
        f"{fake}<row_1_col_1>{img}{fake}<row_1_col_2>{img}\n\n{fake}{glob}{img}{fake}")


def test_our_vlm_folder_keeps_the_idefics3_splitting(folder, tmp_path):
    vlm = load_smolvlm(folder[0])
    save_vlm(vlm, tmp_path / "ours")
    again = load_model_folder(tmp_path / "ours")
    assert again.image_splitting == vlm.image_splitting
    assert again.view_token_ids == vlm.view_token_ids


def test_bad_processor_settings_are_one_clear_error(folder, tmp_path):
    import shutil
    path = tmp_path / "bad"
    shutil.copytree(folder[0], path)
    pre = path / "preprocessor_config.json"
    settings = json.loads(pre.read_text()) if pre.exists() else None
    if settings is None:                                   # transformers nests it in processor_config
        pre = path / "processor_config.json"
        full = json.loads(pre.read_text())
        full["image_processor"]["image_mean"] = [0.48, 0.45, 0.4]
        pre.write_text(json.dumps(full))
    else:
        settings["image_mean"] = [0.48, 0.45, 0.4]
        pre.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"image_mean \[0.48, 0.45, 0.4\]"):
        load_smolvlm(str(path))


# ---------------------------------------------------------------------------------------
# Export: tools/export_smolvlm.py writes a folder transformers loads with its own classes

@pytest.mark.parametrize("model_type,tied", [("smolvlm", False), ("idefics3", True)])
def test_export_round_trip_transformers_gives_our_logits(tmp_path, model_type, tied):
    import export_smolvlm
    src = str(tmp_path / "src")
    smolvlm_folder(src, tied=tied, model_type=model_type)
    vlm = load_smolvlm(src)
    with torch.no_grad():                                  # a "trained" student: new weights
        for p in vlm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_vlm(vlm, tmp_path / "student")                    # train.py's distilled-* folder
    assert export_smolvlm.export(str(tmp_path / "student"), str(tmp_path / "out"),
                                 like=src) == model_type
    Model = {"smolvlm": transformers.SmolVLMForConditionalGeneration,
             "idefics3": transformers.Idefics3ForConditionalGeneration}[model_type]
    hf = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out")).eval()
    assert type(hf) is Model                         # transformers' own class, as lmms-eval loads it
    processor = transformers.Idefics3Processor(
        transformers.Idefics3ImageProcessorPil.from_pretrained(str(tmp_path / "out")),
        transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")),
        **{k: v for k, v in json.load(open(tmp_path / "out" / "processor_config.json")).items()
           if k == "image_seq_len"})
    tok = data.load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    for ex in EXAMPLES[:2]:
        (ids, _, ours), (their_ids, _, theirs) = ours_and_theirs(vlm, tok, hf, processor, *ex)
        assert ids.tolist() == their_ids.tolist()
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    again = load_smolvlm(str(tmp_path / "out"))             # and our loader reads it back exactly
    for k, v in vlm.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_export_refuses_a_student_without_the_idefics3_layout(tmp_path):
    import export_smolvlm
    from model import LMConfig, VisionConfig
    vlm = VLM(LMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
              VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2,
                           mlp_dim=64), 2)
    with pytest.raises(ValueError, match="no Idefics3 image layout"):
        export_smolvlm.save_smolvlm(vlm, tmp_path / "out")



# ---------------------------------------------------------------------------------------
# The smoke run: train.py distills a SmolVLM student, the export loads in transformers

def test_smoke_distill_from_a_smolvlm_folder_ends_in_an_export_with_our_logits(tmp_path):
    """A tiny random SmolVLM (RoPE base 100000) distilled from a teacher LM with SmolVLM's text
    shapes (RoPE base 10000, the vocabulary below the image-layout tokens) on JSONL data:
    refused without --rebase_rope, trained with it, exported, and transformers' own class gives
    the distilled folder's logits."""
    import shutil
    import train
    import export_smolvlm
    from model import Decoder, LMConfig
    from scale.weights import save_hf_lm
    src = tmp_path / "smolvlm"
    _, processor, base = smolvlm_folder(str(src), rope_theta=100000.0)
    teacher = Decoder(LMConfig(vocab_size=base, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=96, rope_theta=10000.0, rms_eps=1e-5, max_positions=512,
                               tie_embeddings=False))
    save_hf_lm(teacher, tmp_path / "teacher")
    shutil.copy(src / "teacher_tokenizer.json", tmp_path / "teacher" / "tokenizer.json")
    lines = []
    for i in range(4):
        picture(40 + 10 * i, 30, i).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "source": "vqa", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture?"},
            {"from": "gpt", "value": "a red circle ."}]})
        lines.append({"source": "text_qa", "conversations": [
            {"from": "human", "value": "what colour is it ?"}, {"from": "gpt", "value": "red ."}]})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    argv = ["--preset=smoke", f"--teacher_path={tmp_path / 'teacher'}", f"--student_path={src}",
            "--stage=distill", f"--data_path={tmp_path / 'train.jsonl'}", "--kd_sources=text_qa",
            "--image_size=32", "--distill_steps=2", "--batch_size=2", "--num_workers=0",
            "--max_len=256", "--eval=false", f"--out_dir={out}"]
    with pytest.raises(SystemExit, match=r"rope_theta: teacher 10000.0 vs student 100000.0 "
                                         r"\(--rebase_rope=true"):
        train.main(argv)
    train.main(argv + ["--rebase_rope=true", "--variant=rebased"])
    distilled = out / "distilled-rebased"
    export_smolvlm.export(str(distilled), str(tmp_path / "export"), like=str(src))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "export")).eval()
    assert type(hf) is transformers.SmolVLMForConditionalGeneration
    ours = load_model_folder(str(distilled))
    assert set(ours.student_only_ids) == set(range(base, ours.decoder.cfg.vocab_size))
    tok = data.load_tokenizer(str(distilled / "tokenizer.json"))
    (ids, _, our_logits), (their_ids, _, theirs) = ours_and_theirs(ours, tok, hf, processor,
                                                                    *EXAMPLES[0])
    assert ids.tolist() == their_ids.tolist()
    torch.testing.assert_close(our_logits, theirs, atol=1e-4, rtol=0)
    start = load_smolvlm(str(src))                          # and training did change the student
    assert not torch.equal(start.decoder.embed.weight, ours.decoder.embed.weight)
