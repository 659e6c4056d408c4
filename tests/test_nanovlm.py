"""nanoVLM checkpoints (the paper's student layout): a file written by hand in nanoVLM's key
layout loads exactly, save/load round trips are exact, the paper config parses, and bad files
give one clear error."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file, load_file

from dataclasses import replace

from bench import SMOLLM2_360M
from export_nanovlm import save_nanovlm
from model import LMConfig, VisionConfig, VLM, SIGLIP2_B16_512
from scale.weights import load_nanovlm, nanovlm_configs, nanovlm_key_map

LM = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
          rope_theta=10000.0)
VIS = dict(image_size=32, patch_size=4, dim=32, n_layers=2, n_heads=4, mlp_dim=64)
IMAGE_TOKEN = 100          # the first (and only) extra token after a base vocabulary of 100
SHUFFLE = 2                # 8x8 patches -> 16 image tokens


def random_vlm(tied=True):
    vlm = VLM(LMConfig(**LM, tie_embeddings=tied), VisionConfig(**VIS), IMAGE_TOKEN, SHUFFLE).eval()
    with torch.no_grad():                      # every parameter random, norms included
        for p in vlm.parameters():
            p.normal_(std=0.5)
    return vlm


def nanovlm_files_by_hand(vlm, folder, tied=True):
    """Write `vlm` in nanoVLM's layout without using weights.py: the key names below are
    nanoVLM's (models/vision_transformer.py, language_model.py, modality_projector.py)."""
    sd = vlm.state_dict()
    t = {"vision_encoder.patch_embedding.conv.weight": sd["vision.patch_embed.weight"],
         "vision_encoder.patch_embedding.conv.bias": sd["vision.patch_embed.bias"],
         "vision_encoder.patch_embedding.position_embedding": sd["vision.pos_embed"].unsqueeze(0),
         "vision_encoder.layer_norm.weight": sd["vision.post_ln.weight"],
         "vision_encoder.layer_norm.bias": sd["vision.post_ln.bias"],
         "MP.proj.weight": sd["projector.proj.weight"],
         "decoder.norm.weight": sd["decoder.norm.weight"],
         "decoder.rotary_embd.inv_freq": torch.rand(LM["dim"] // LM["n_heads"] // 2)}
    for i in range(VIS["n_layers"]):
        b, o = f"vision_encoder.blocks.{i}.", f"vision.blocks.{i}."
        for p in ("weight", "bias"):
            t[f"{b}ln1.{p}"], t[f"{b}ln2.{p}"] = sd[f"{o}ln1.{p}"], sd[f"{o}ln2.{p}"]
            t[f"{b}attn.qkv_proj.{p}"] = torch.cat([sd[f"{o}q_proj.{p}"], sd[f"{o}k_proj.{p}"],
                                                    sd[f"{o}v_proj.{p}"]])
            t[f"{b}attn.out_proj.{p}"] = sd[f"{o}out_proj.{p}"]
            t[f"{b}mlp.fc1.{p}"], t[f"{b}mlp.fc2.{p}"] = sd[f"{o}fc1.{p}"], sd[f"{o}fc2.{p}"]
    for i in range(LM["n_layers"]):
        b, o = f"decoder.blocks.{i}.", f"decoder.layers.{i}."
        t[b + "norm1.weight"], t[b + "norm2.weight"] = sd[o
                                                          + "attn_norm.weight"], sd[
                                                              o + "mlp_norm.weight"]
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                             ("o_proj", "out_proj")):
            t[f"{b}attn.{theirs}.weight"] = sd[f"{o}attn.{ours}.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            t[f"{b}mlp.{p}.weight"] = sd[f"{o}mlp.{p}.weight"]
    if tied:          # safetensors.save_model keeps one name of a shared tensor: the sorted-first
        t["decoder.head.weight"] = sd["decoder.embed.weight"]
    else:
        t["decoder.token_embedding.weight"] = sd["decoder.embed.weight"]
        t["decoder.head.weight"] = sd["decoder.lm_head.weight"]
    cfg = {**PAPER,                                 # the paper's config.json, shrunk
           "vit_hidden_dim": 32, "vit_inter_dim": 64, "vit_patch_size": 4, "vit_img_size": 32,
           "vit_n_heads": 4, "vit_n_blocks": 2, "vit_model_type": "google/siglip2-base-patch16-512",
           "lm_hidden_dim": 64, "lm_inter_dim": 96, "lm_re_base": 10000,
           "lm_max_position_embeddings": 1024, "lm_base_vocab_size": 100, "extra_token_amount": 1,
           "lm_vocab_size": 101, "lm_n_heads": 4, "lm_n_kv_heads": 2, "lm_n_blocks": 2,
           "lm_tie_weights": tied, "mp_pixel_shuffle_factor": 2, "mp_image_token_length": 16,
           "vlm_extra_tokens": {"image_token": "<|image|>"}}
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(folder, "model.safetensors"))
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    return t


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def inputs(vlm, batch=2):
    n = vlm.n_image_tokens
    ids = torch.randint(0, IMAGE_TOKEN, (batch, n + 7))
    ids[:, 2:2 + n] = IMAGE_TOKEN
    return ids, torch.randn(batch, 3, VIS["image_size"], VIS["image_size"])


@pytest.mark.parametrize("tied", [True, False])
def test_hand_written_nanovlm_file_loads_exactly(tmp_path, tied):
    vlm = random_vlm(tied)
    nanovlm_files_by_hand(vlm, tmp_path / "nv", tied)
    r = load_nanovlm(tmp_path / "nv")
    assert r.image_token_id == IMAGE_TOKEN and r.projector.factor == SHUFFLE
    assert r.decoder.cfg == vlm.decoder.cfg and r.vision.cfg == vlm.vision.cfg
    assert_same_params(vlm, r)
    if tied:
        assert r.decoder.lm_head.weight is r.decoder.embed.weight


def test_tied_embedding_stored_as_token_embedding_is_accepted(tmp_path):
    vlm = random_vlm()
    t = nanovlm_files_by_hand(vlm, tmp_path / "nv")
    t["decoder.token_embedding.weight"] = t.pop("decoder.head.weight")
    save_file({k: v.contiguous() for k, v in t.items()}, tmp_path / "nv" / "model.safetensors")
    assert_same_params(vlm, load_nanovlm(tmp_path / "nv"))


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_is_exact_and_logits_identical(tmp_path, tied):
    vlm = random_vlm(tied)
    save_nanovlm(vlm, tmp_path / "out")
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path / "out"))
    # save_nanovlm writes exactly the hand-written nanoVLM layout (keys, shapes, values)
    ref = nanovlm_files_by_hand(vlm, tmp_path / "ref", tied)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == ref.keys()
    for k in ref:
        if k != "decoder.rotary_embd.inv_freq":
            assert torch.equal(saved[k], ref[k]), k
    hd = LM["dim"] // LM["n_heads"]
    torch.testing.assert_close(saved["decoder.rotary_embd.inv_freq"],
                               1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    r = load_nanovlm(tmp_path / "out")
    assert_same_params(vlm, r)
    ids, images = inputs(vlm)
    with torch.no_grad():
        assert torch.equal(vlm(ids, images)[0], r(ids, images)[0])


def test_key_map_covers_every_parameter():
    for tied in (True, False):
        vlm = random_vlm(tied)
        m = nanovlm_key_map(vlm)
        skipped = {"decoder.lm_head.weight"} if tied else set()
        assert set(m) == set(vlm.state_dict()) - skipped
        assert len(set(m.values())) == len(m)


PAPER = {"vit_hidden_dim": 768, "vit_inter_dim": 3072, "vit_patch_size": 16, "vit_img_size": 512,
         "vit_n_heads": 12,
         "vit_dropout": 0.0, "vit_n_blocks": 12, "vit_ln_eps": 1e-6, "vit_cls_flag": False,
         "lm_hidden_dim": 960, "lm_inter_dim": 2560, "lm_rms_eps": 1e-5, "lm_re_base": 100000,
         "lm_max_position_embeddings": 8192, "lm_base_vocab_size": 49152, "extra_token_amount": 66,
         "lm_vocab_size": 49218, "lm_n_heads": 15, "lm_n_kv_heads": 5, "lm_dropout": 0.0,
         "lm_n_blocks": 32,
         "lm_attn_scaling": 1.0, "lm_max_length": 4096, "lm_use_tokens": False,
         "lm_tie_weights": True, "mp_pixel_shuffle_factor": 4, "mp_image_token_length": 64,
         "vlm_extra_tokens": {"image_token": "<|image|>", "global_image_token": "<|global_image|>",
                              **{f"r{i}c{j}": f"<row_{i}_col_{j}>" for i in range(1, 9)
                                 for j in range(1, 9)}}}


def test_paper_config_parses():
    lm, vis, s, image_token_id = nanovlm_configs(PAPER)
    assert lm == replace(SMOLLM2_360M, vocab_size=49218)
    assert (lm.dim, lm.ffn_dim, lm.n_heads, lm.n_kv_heads, lm.n_layers,
            lm.head_dim) == (960, 2560, 15, 5, 32, 64)
    assert (lm.tie_embeddings and lm.rope_theta == 100000.0 and lm.rms_eps == 1e-5
            and not lm.qkv_bias)
    assert vis == SIGLIP2_B16_512
    assert s == 4 and vis.n_patches // s ** 2 == 64
    assert image_token_id == 49152
    lm2, _, _, _ = nanovlm_configs({k: v for k, v in PAPER.items() if k != "lm_vocab_size"})
    assert lm2.vocab_size == 49218                    # base + extra_token_amount


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("lm_n_kv_heads"), r"missing nanoVLM field\(s\) \['lm_n_kv_heads'\]"),
    (lambda c: [c.pop("vit_inter_dim"), c.pop("mp_pixel_shuffle_factor")],
     r"missing nanoVLM field\(s\) \['vit_inter_dim', 'mp_pixel_shuffle_factor'\]"),
    (lambda c: c.__setitem__("mp_image_token_length", 81), "mp_image_token_length 81"),
    (lambda c: c.__setitem__("vit_cls_flag", True), "vit_cls_flag"),
    (lambda c: c.__setitem__("lm_attn_scaling", 0.5), "lm_attn_scaling"),
    (lambda c: c.__setitem__("lm_n_kv_heads", 4), "n_heads by n_kv_heads"),
])
def test_bad_config_is_a_clear_error(edit, message):
    cfg = json.loads(json.dumps(PAPER))
    edit(cfg)
    with pytest.raises(ValueError, match=message):
        nanovlm_configs(cfg, "nv/config.json")


def test_image_token_id_needs_the_extra_tokens_or_an_argument(tmp_path):
    vlm = random_vlm()
    nanovlm_files_by_hand(vlm, tmp_path / "nv")
    cfg = json.load(open(tmp_path / "nv" / "config.json"))
    del cfg["vlm_extra_tokens"]
    json.dump(cfg, open(tmp_path / "nv" / "config.json", "w"))
    with pytest.raises(ValueError, match="cannot infer the image token id"):
        load_nanovlm(tmp_path / "nv")
    assert load_nanovlm(tmp_path / "nv", image_token_id=7).image_token_id == 7


def rewrite(folder, fn):
    t = load_file(folder / "model.safetensors")
    fn(t)
    save_file(t, folder / "model.safetensors")


def test_missing_key_is_reported(tmp_path):
    nanovlm_files_by_hand(random_vlm(), tmp_path / "nv")
    rewrite(tmp_path / "nv", lambda t: t.pop("vision_encoder.blocks.1.attn.qkv_proj.weight"))
    with pytest.raises(ValueError,
                       match=r"missing key vision_encoder\.blocks\.1\.attn\.qkv_proj\.weight\[q\]"):
        load_nanovlm(tmp_path / "nv")


@pytest.mark.parametrize("key,shape,message", [
    ("MP.proj.weight", (64, 100),
     r"shape mismatch MP\.proj\.weight: file \(64, 100\) vs model \(64, 128\)"),
    ("vision_encoder.blocks.0.attn.qkv_proj.weight", (97, 32),
     r"shape mismatch vision_encoder\.blocks\.0\.attn\.qkv_proj\.weight\[q\]: file \(97, 32\) vs "
     r"model \(32, 32\)"),
    ("vision_encoder.patch_embedding.position_embedding", (1, 65, 32),
     r"shape mismatch vision_encoder\.patch_embedding\.position_embedding: file \(65, 32\) vs "
     r"model \(64, 32\)"),
])
def test_wrong_shape_is_reported(tmp_path, key, shape, message):
    nanovlm_files_by_hand(random_vlm(), tmp_path / "nv")
    rewrite(tmp_path / "nv", lambda t: t.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(ValueError, match=message):
        load_nanovlm(tmp_path / "nv")


def test_all_problems_in_one_error(tmp_path):
    nanovlm_files_by_hand(random_vlm(), tmp_path / "nv")
    def break_it(t):
        t.pop("decoder.blocks.0.mlp.up_proj.weight")
        t["decoder.blocks.9.extra.weight"] = torch.zeros(2)
        t["decoder.norm.weight"] = torch.zeros(65)
    rewrite(tmp_path / "nv", break_it)
    with pytest.raises(ValueError, match=r"3 problem\(s\)") as e:
        load_nanovlm(tmp_path / "nv")
    msg = str(e.value)
    assert "missing key decoder.blocks.0.mlp.up_proj.weight" in msg
    assert "unexpected key decoder.blocks.9.extra.weight" in msg
    assert "shape mismatch decoder.norm.weight: file (65,) vs model (64,)" in msg


def test_save_refuses_what_nanovlm_cannot_represent(tmp_path):
    vlm = VLM(LMConfig(**LM, qkv_bias=True), VisionConfig(**VIS), IMAGE_TOKEN, SHUFFLE)
    with pytest.raises(ValueError, match="no q/k/v biases"):
        save_nanovlm(vlm, tmp_path / "a")
    vlm = VLM(LMConfig(**LM), VisionConfig(**VIS), 3, SHUFFLE)     # 98 tokens after the image token
    with pytest.raises(ValueError, match="more than nanoVLM's 66"):
        save_nanovlm(vlm, tmp_path / "b")
