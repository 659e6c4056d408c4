"""
Weight loading and saving: Hugging Face Llama / SmolLM2 / Qwen2 decoders, HF SigLIP vision
towers, and our own VLM folders. Split out of model.py to keep that file about the models.

Every loader uses an explicit key map (our name -> file name) and checks, before copying
anything, that every expected key is in the file, every file key is used or explicitly
ignored, and every shape matches. All problems are reported in one error.
Weights are read with safetensors only (no pickle); files are written atomically.
"""
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from model import LMConfig, VisionConfig, Decoder, VisionEncoder, VLM


# ----------------------------------------------------------------------------------------
# Files

def atomic_write(path, write_fn):
    """Write via a temp file in the same folder, fsync, then rename over `path`: a crash
    never leaves a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_safetensors_folder(folder):
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object of key -> shard file")
        files = [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{folder}: expected model.safetensors or model.safetensors.index.json")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:
            raise ValueError(f"{f}: cannot read safetensors file ({e})") from None
    return tensors


def save_safetensors(path, tensors):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_mapped(module, tensors, key_map, ignore_prefixes=(), source="weights"):
    """Copy file tensors into module. key_map: our state-dict key -> file key.
    Fails with one error listing missing keys, unused keys and shape mismatches."""
    ours = module.state_dict()
    missing = [fk for ok, fk in key_map.items() if fk not in tensors]
    used = set(key_map.values())
    unused = [k for k in tensors if k not in used and not k.startswith(tuple(ignore_prefixes))]
    shapes = [f"{fk}: file {tuple(tensors[fk].shape)} vs model {tuple(ours[ok].shape)}"
              for ok, fk in key_map.items() if fk in tensors and tensors[fk].shape != ours[ok].shape]
    problems = ([f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in sorted(unused)]
                + [f"shape mismatch {s}" for s in shapes])
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"{source}: {len(problems)} problem(s) loading weights:\n  " + "\n  ".join(shown))
    with torch.no_grad():
        for ok, fk in key_map.items():
            ours[ok].copy_(tensors[fk])
    return module


# ----------------------------------------------------------------------------------------
# Hugging Face decoders (Llama / SmolLM2 / Qwen2)

def lm_config_from_hf(hf, source="config.json"):
    def need(key):
        if key not in hf:
            raise ValueError(f"{source}: missing field {key!r}")
        return hf[key]
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a Llama-style decoder (llama, qwen2)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{source}: attention_bias/mlp_bias = true is not supported (only Qwen2's q/k/v bias)")
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    if theta is None:
        raise ValueError(f"{source}: missing 'rope_theta' (or 'rope_parameters.rope_theta')")
    rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
    cfg = LMConfig(vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
                   n_heads=need("num_attention_heads"),
                   n_kv_heads=hf.get("num_key_value_heads") or need("num_attention_heads"),
                   ffn_dim=need("intermediate_size"), rope_theta=float(theta), rms_eps=hf.get("rms_norm_eps", 1e-6),
                   max_positions=hf.get("max_position_embeddings", 2048),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2")
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"{source}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads {cfg.head_dim}")
    return cfg


def lm_config_to_hf(cfg: LMConfig):
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    return {"architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"], "model_type": model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "intermediate_size": cfg.ffn_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
            "max_position_embeddings": cfg.max_positions, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu", "torch_dtype": "float32"}


def hf_lm_key_map(cfg: LMConfig, prefix="model."):
    """Our Decoder key -> HF LlamaForCausalLM key."""
    m = {"embed.weight": prefix + "embed_tokens.weight", "norm.weight": prefix + "norm.weight"}
    for i in range(cfg.n_layers):
        o, h = f"layers.{i}.", f"{prefix}layers.{i}."
        m[o + "attn_norm.weight"] = h + "input_layernorm.weight"
        m[o + "mlp_norm.weight"] = h + "post_attention_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[f"{o}attn.{p}.weight"] = f"{h}self_attn.{p}.weight"
        if cfg.qkv_bias:
            for p in ("q_proj", "k_proj", "v_proj"):
                m[f"{o}attn.{p}.bias"] = f"{h}self_attn.{p}.bias"
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[f"{o}mlp.{p}.weight"] = f"{h}mlp.{p}.weight"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def hf_lm_ignored(cfg: LMConfig):
    """File keys that may be present and are not used: RoPE buffers, and a stored copy of
    the tied head."""
    return ("model.rotary_emb.", "rotary_emb.") + (("lm_head.weight",) if cfg.tie_embeddings else ())


def load_hf_lm(folder):
    """A Decoder from a Hugging Face Llama / SmolLM2 / Qwen2 folder (config.json + safetensors)."""
    cfg_path = os.path.join(folder, "config.json")
    cfg = lm_config_from_hf(read_json(cfg_path), cfg_path)
    tensors = read_safetensors_folder(folder)
    ignore = hf_lm_ignored(cfg) + tuple(k for k in tensors if ".rotary_emb.inv_freq" in k)
    return load_mapped(Decoder(cfg), tensors, hf_lm_key_map(cfg), ignore, source=folder)


def save_hf_lm(decoder: Decoder, folder):
    """Save a Decoder as a Hugging Face folder that transformers (and load_hf_lm) reloads."""
    os.makedirs(folder, exist_ok=True)
    sd = decoder.state_dict()
    save_safetensors(os.path.join(folder, "model.safetensors"),
                     {fk: sd[ok] for ok, fk in hf_lm_key_map(decoder.cfg).items()})
    write_json(os.path.join(folder, "config.json"), lm_config_to_hf(decoder.cfg))


# ----------------------------------------------------------------------------------------
# Hugging Face SigLIP vision towers

def vision_config_from_hf(hf, source="config.json"):
    hf = hf.get("vision_config", hf)          # a full SiglipConfig nests the vision part
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "image_size", "patch_size") if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing vision field(s) {missing}")
    if hf.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported (expected gelu_pytorch_tanh)")
    return VisionConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], dim=hf["hidden_size"],
                        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                        mlp_dim=hf["intermediate_size"], ln_eps=hf.get("layer_norm_eps", 1e-6))


def vision_config_to_hf(cfg: VisionConfig):
    return {"model_type": "siglip_vision_model", "hidden_size": cfg.dim, "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "layer_norm_eps": cfg.ln_eps, "hidden_act": "gelu_pytorch_tanh",
            "num_channels": 3}


def hf_vision_key_map(cfg: VisionConfig, prefix="vision_model."):
    """Our VisionEncoder key -> HF SiglipVisionModel key."""
    m = {"patch_embed.weight": prefix + "embeddings.patch_embedding.weight",
         "patch_embed.bias": prefix + "embeddings.patch_embedding.bias",
         "pos_embed": prefix + "embeddings.position_embedding.weight"}
    for i in range(cfg.n_layers):
        o, h = f"blocks.{i}.", f"{prefix}encoder.layers.{i}."
        pairs = {"ln1": "layer_norm1", "ln2": "layer_norm2", "q_proj": "self_attn.q_proj",
                 "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "out_proj": "self_attn.out_proj",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        for ours, theirs in pairs.items():
            for p in ("weight", "bias"):
                m[f"{o}{ours}.{p}"] = f"{h}{theirs}.{p}"
    for p in ("weight", "bias"):
        m[f"post_ln.{p}"] = f"{prefix}post_layernorm.{p}"
    return m


# Parts of a SigLIP checkpoint a VLM does not use: the pooling head and the text tower.
SIGLIP_IGNORED = ("vision_model.head.", "text_model.", "logit_scale", "logit_bias")


def load_hf_siglip(folder):
    """A VisionEncoder from a Hugging Face SigLIP (vision or full) folder."""
    cfg_path = os.path.join(folder, "config.json")
    cfg = vision_config_from_hf(read_json(cfg_path), cfg_path)
    return load_mapped(VisionEncoder(cfg), read_safetensors_folder(folder), hf_vision_key_map(cfg),
                       SIGLIP_IGNORED, source=folder)


def save_hf_siglip(encoder: VisionEncoder, folder):
    os.makedirs(folder, exist_ok=True)
    sd = encoder.state_dict()
    save_safetensors(os.path.join(folder, "model.safetensors"),
                     {fk: sd[ok] for ok, fk in hf_vision_key_map(encoder.cfg).items()})
    write_json(os.path.join(folder, "config.json"), vision_config_to_hf(encoder.cfg))


def build_student_vlm(lm_folder, vision_folder, image_token_id, shuffle_factor=2):
    """The paper's student before training: pretrained decoder + pretrained vision tower +
    a fresh projector."""
    decoder, vision = load_hf_lm(lm_folder), load_hf_siglip(vision_folder)
    vlm = VLM(decoder.cfg, vision.cfg, image_token_id, shuffle_factor)
    vlm.decoder.load_state_dict(decoder.state_dict())
    vlm.vision.load_state_dict(vision.state_dict())
    return vlm


# ----------------------------------------------------------------------------------------
# Our VLM folders: config.json {lm, vision, image_token_id, shuffle_factor} + model.safetensors

def vlm_key_map(vlm: VLM):
    keys = [k for k in vlm.state_dict() if not (vlm.decoder.cfg.tie_embeddings and k == "decoder.lm_head.weight")]
    return {k: k for k in keys}


def save_vlm(vlm: VLM, folder):
    from dataclasses import asdict
    os.makedirs(folder, exist_ok=True)
    sd = vlm.state_dict()
    save_safetensors(os.path.join(folder, "model.safetensors"), {k: sd[k] for k in vlm_key_map(vlm)})
    write_json(os.path.join(folder, "config.json"),
               {"model_type": "lingudistill_vlm", "lm": asdict(vlm.decoder.cfg), "vision": asdict(vlm.vision.cfg),
                "image_token_id": vlm.image_token_id, "shuffle_factor": vlm.projector.factor})


def load_vlm(folder):
    cfg_path = os.path.join(folder, "config.json")
    c = read_json(cfg_path)
    if c.get("model_type") != "lingudistill_vlm":
        raise ValueError(f"{cfg_path}: model_type {c.get('model_type')!r}, expected 'lingudistill_vlm'")
    try:
        vlm = VLM(LMConfig(**c["lm"]), VisionConfig(**c["vision"]), c["image_token_id"], c["shuffle_factor"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: bad VLM config ({e})") from None
    return load_mapped(vlm, read_safetensors_folder(folder), vlm_key_map(vlm), source=folder)
