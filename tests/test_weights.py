"""Weight loaders: exact round trips, one clear error for every kind of bad file, and parity
with Hugging Face transformers on tiny random configs (skipped without transformers)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file, load_file

from model import LMConfig, VisionConfig, Decoder, VisionEncoder, vlm_from_teacher
from conftest import save_hf_siglip
from scale.weights import (load_hf_lm, save_hf_lm, load_hf_siglip, save_vlm,
                     load_vlm, lm_config_to_hf)

LM = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
          rope_theta=10000.0)


def saved_lm(tmp_path, **kw):
    m = Decoder(LMConfig(**{**LM, **kw})).eval()
    save_hf_lm(m, tmp_path / "lm")
    return m, tmp_path / "lm"


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tied,qkv_bias", [(True, False), (False, False), (True, True)])
def test_lm_save_load_round_trip_is_exact(tmp_path, tied, qkv_bias):
    m, folder = saved_lm(tmp_path, tie_embeddings=tied, qkv_bias=qkv_bias)
    r = load_hf_lm(folder)
    assert r.cfg == m.cfg
    assert_same_params(m, r)
    if tied:
        assert r.lm_head.weight is r.embed.weight


def test_sharded_checkpoint_and_rope_parameters_config(tmp_path):
    m, folder = saved_lm(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    keys = sorted(tensors)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, folder / name)
    json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}},
              open(folder / "model.safetensors.index.json", "w"))
    cfg = json.load(open(folder / "config.json"))
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    json.dump(cfg, open(folder / "config.json", "w"))
    assert_same_params(m, load_hf_lm(folder))


def edit_weights(folder, fn):
    t = load_file(folder / "model.safetensors")
    fn(t)
    save_file(t, folder / "model.safetensors")


def test_missing_key_is_reported(tmp_path):
    _, folder = saved_lm(tmp_path)
    edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing key model.layers.1.mlp.up_proj.weight"):
        load_hf_lm(folder)


def test_extra_key_is_reported(tmp_path):
    _, folder = saved_lm(tmp_path)
    edit_weights(folder, lambda t: t.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected key model.layers.9.extra.weight"):
        load_hf_lm(folder)


def test_wrong_shape_is_reported(tmp_path):
    _, folder = saved_lm(tmp_path)
    edit_weights(folder, lambda t: t.__setitem__("model.norm.weight", torch.zeros(65)))
    with pytest.raises(ValueError,
                       match=r"shape mismatch model.norm.weight: file \(65,\) vs model \(64,\)"):
        load_hf_lm(folder)


@pytest.mark.parametrize("kind,key,value", [
    ("lm", "model.norm.weight", float("nan")),
    ("siglip", "vision_model.post_layernorm.weight", float("inf")),
    ("vlm", "decoder.layers.1.attn.q_proj.weight", float("-inf"))])
def test_non_finite_weights_are_refused_at_load_naming_folder_and_tensor(tmp_path, kind, key,
                                                                         value):
    lm, folder = saved_lm(tmp_path)
    if kind == "siglip":
        folder = tmp_path / "vis"
        save_hf_siglip(VisionEncoder(VisionConfig()), folder)
    if kind == "vlm":
        folder = tmp_path / "vlm"
        save_vlm(vlm_from_teacher(lm, VisionConfig(), image_token_id=100), folder)
    edit_weights(folder, lambda t: t[key].view(-1)[:2].fill_(value))
    load = {"lm": load_hf_lm, "siglip": load_hf_siglip, "vlm": load_vlm}[kind]
    with pytest.raises(ValueError) as e:
        load(folder)
    assert str(e.value).splitlines()[-1].strip() == (
        f"non-finite {folder / 'model.safetensors'}: tensor {key} has 2 NaN/inf value(s), "
        "expected finite weights")


def test_all_problems_in_one_error(tmp_path):
    _, folder = saved_lm(tmp_path)
    def break_it(t):
        t.pop("model.norm.weight")
        t["junk"] = torch.zeros(1)
    edit_weights(folder, break_it)
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as e:
        load_hf_lm(folder)
    assert "missing key model.norm.weight" in str(e.value) and "unexpected key junk" in str(e.value)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    (lambda c: c.pop("rope_theta"), "missing 'rope_theta'"),
    (lambda c: c.__setitem__("model_type", "gpt2"), "not a Llama-style decoder"),
    (lambda c: c.__setitem__("num_key_value_heads", 3), "n_heads by n_kv_heads"),
])
def test_bad_config_is_a_clear_error(tmp_path, edit, message):
    _, folder = saved_lm(tmp_path)
    cfg = json.load(open(folder / "config.json"))
    edit(cfg)
    json.dump(cfg, open(folder / "config.json", "w"))
    with pytest.raises(ValueError, match=message):
        load_hf_lm(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_hf_lm(folder)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    _, folder = saved_lm(tmp_path)
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="expected model.safetensors"):
        load_hf_lm(folder)


def test_siglip_round_trip_ignores_pooling_head(tmp_path):
    enc = VisionEncoder(VisionConfig()).eval()
    save_hf_siglip(enc, tmp_path / "vis")
    edit_weights(tmp_path / "vis",
                 lambda t: t.__setitem__("vision_model.head.probe", torch.zeros(1, 1, 64)))
    assert_same_params(enc, load_hf_siglip(tmp_path / "vis"))


def test_student_vlm_from_lm_and_vision_folders_and_vlm_round_trip(tmp_path):
    lm, lm_folder = saved_lm(tmp_path)
    enc = VisionEncoder(VisionConfig())
    save_hf_siglip(enc, tmp_path / "vis")
    vision = load_hf_siglip(tmp_path / "vis")                 # the student train.py builds
    vlm = vlm_from_teacher(load_hf_lm(lm_folder), vision.cfg, image_token_id=100)
    vlm.vision.load_state_dict(vision.state_dict())
    assert_same_params(vlm.decoder, lm)
    assert_same_params(vlm.vision, enc)
    save_vlm(vlm, tmp_path / "vlm")
    assert_same_params(vlm, load_vlm(tmp_path / "vlm"))
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path / "vlm"))


# ---------------------------------------------------------------------------------------
# Parity with transformers (optional dev dependency; CI installs it)

def transformers_or_skip():
    return pytest.importorskip("transformers",
                               reason="parity tests need the optional `transformers` "
                                                      "(pip install -r requirements-dev.txt)")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_logits_match_transformers(tmp_path, arch):
    transformers = transformers_or_skip()
    qwen = arch == "qwen2"
    m, folder = saved_lm(tmp_path, qkv_bias=qwen, tie_embeddings=not qwen)
    with torch.no_grad():          # make q/k/v biases non-zero so the test sees them
        for layer in m.layers:
            for p in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
                if p.bias is not None:
                    p.bias.normal_()
    save_hf_lm(m, folder)
    cls = transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.randint(0, 101, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0                                   # one left-padded row
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask,
                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ours = m(ids, attention_mask=mask)[0]
    torch.testing.assert_close(ours[0], ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1, 3:], ref[1, 3:], atol=1e-4, rtol=0)


def test_transformers_checkpoint_loads_into_our_decoder(tmp_path):
    transformers = transformers_or_skip()
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in lm_config_to_hf(LMConfig(**LM)).items()
                                         if k not in ("architectures", "model_type",
                                                      "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_lm(tmp_path / "hf")
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)


def test_siglip_features_match_transformers(tmp_path):
    transformers = transformers_or_skip()
    enc = VisionEncoder(VisionConfig(image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4,
                                     mlp_dim=128)).eval()
    save_hf_siglip(enc, tmp_path / "vis")
    hf = transformers.SiglipVisionModel.from_pretrained(tmp_path / "vis",
                                                        attn_implementation="eager").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=images).last_hidden_state
        torch.testing.assert_close(enc(images), ref, atol=1e-4, rtol=0)
