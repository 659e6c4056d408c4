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


def save_mapped(module, folder, key_map, config):
    """Write module's tensors under their file names (key_map: ours -> file) + config.json."""
    os.makedirs(folder, exist_ok=True)
    sd = module.state_dict()
    save_safetensors(os.path.join(folder, "model.safetensors"), {fk: sd[ok] for ok, fk in key_map.items()})
    write_json(os.path.join(folder, "config.json"), config)


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
    save_mapped(decoder, folder, hf_lm_key_map(decoder.cfg), lm_config_to_hf(decoder.cfg))


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
    save_mapped(encoder, folder, hf_vision_key_map(encoder.cfg), vision_config_to_hf(encoder.cfg))


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
    """config.json also records the view token ids and the image splitting (None: one view)."""
    from dataclasses import asdict
    split = vlm.image_splitting
    save_mapped(vlm, folder, vlm_key_map(vlm),
                {"model_type": "lingudistill_vlm", "lm": asdict(vlm.decoder.cfg), "vision": asdict(vlm.vision.cfg),
                 "image_token_id": vlm.image_token_id, "shuffle_factor": vlm.projector.factor,
                 "view_token_ids": list(vlm.view_token_ids), "image_splitting": None if split is None else asdict(split)})


def load_vlm(folder):
    from data import ImageSplitting
    cfg_path = os.path.join(folder, "config.json")
    c = read_json(cfg_path)
    if c.get("model_type") != "lingudistill_vlm":
        raise ValueError(f"{cfg_path}: model_type {c.get('model_type')!r}, expected 'lingudistill_vlm'")
    try:
        split = c.get("image_splitting")
        vlm = VLM(LMConfig(**c["lm"]), VisionConfig(**c["vision"]), c["image_token_id"], c["shuffle_factor"],
                  c.get("view_token_ids", ()), None if split is None else ImageSplitting(**split))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: bad VLM config ({e})") from None
    return load_mapped(vlm, read_safetensors_folder(folder), vlm_key_map(vlm), source=folder)


# ----------------------------------------------------------------------------------------
# nanoVLM checkpoints (github.com/huggingface/nanoVLM; the paper's student nanoVLM-460M-8k)
#
# A nanoVLM folder is config.json (a flat dict of VLMConfig fields: vit_*, lm_*, mp_*, ...)
# plus model.safetensors written by safetensors.torch.save_model(VisionLanguageModel).
# Layout facts (models/config.py, vision_transformer.py, language_model.py,
# modality_projector.py, vision_language_model.py):
# - ViT: attn.qkv_proj is one Linear(D, 3D) whose output rows are q, k, v in that order
#   (forward does qkv.split(D)); patch_embedding.position_embedding is a (1, N, D) parameter.
# - LM: same Llama math and the same RoPE convention as model.py (cos/sin of cat(freqs, freqs),
#   rotate_half on the two halves, not interleaved); o_proj is called out_proj, the norms norm1/
#   norm2, the head `head`. The rotary inv_freq is a persistent buffer, so it is in the file.
# - Tied head: save_model keeps one name per shared tensor (the alphabetically first), so a
#   tied checkpoint holds `decoder.head.weight` and no `decoder.token_embedding.weight`.
# - Projector: MP.proj, Linear(D_vit * s^2, D_lm, bias=False) after a pixel shuffle with the
#   same element order as model.pixel_shuffle.
# - Vocabulary: lm_vocab_size = lm_base_vocab_size + extra_token_amount; the tokenizer appends
#   vlm_extra_tokens in dict order after the base vocabulary, so <|image|> (the first) gets id
#   lm_base_vocab_size (49152), <|global_image|> 49153, <row_1_col_1>..<row_8_col_8> 49154..49217.

NANOVLM_EXTRA_TOKENS = {"image_token": "<|image|>", "global_image_token": "<|global_image|>",
                        **{f"r{i}c{j}": f"<row_{i}_col_{j}>" for i in range(1, 9) for j in range(1, 9)}}
NANOVLM_QKV_PARTS = ("q", "k", "v")
# File keys that are present and not loaded: RoPE's inverse frequencies (recomputed from lm_re_base).
NANOVLM_IGNORED = ("decoder.rotary_embd.inv_freq",)

_NANOVLM_REQUIRED = ("vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads",
                     "vit_n_blocks", "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks",
                     "lm_re_base", "mp_pixel_shuffle_factor")


def nanovlm_configs(cfg_dict, source="config.json"):
    """(LMConfig, VisionConfig, shuffle_factor, image_token_id or None) from a nanoVLM config.json.

    Structural fields are required (all missing ones are named in one error); lm_vocab_size may
    instead come from lm_base_vocab_size + extra_token_amount. Optional fields take nanoVLM's
    defaults: vit_ln_eps 1e-6, lm_rms_eps 1e-5, lm_max_position_embeddings 8192, lm_tie_weights
    true. image_token_id = lm_base_vocab_size + index of "image_token" in vlm_extra_tokens (how
    the tokenizer numbers the added tokens), or None when the config does not say.

    Not representable (clear errors): vit_cls_flag true (a CLS token), lm_attn_scaling != 1.
    Not modelled: nanoVLM rescales RoPE frequencies for positions beyond
    lm_max_position_embeddings (we never do), and it numbers positions 0..T-1 regardless of
    padding (we count real tokens, which agrees unless a prompt is left-padded)."""
    c = cfg_dict
    if not isinstance(c, dict):
        raise ValueError(f"{source}: expected a JSON object of nanoVLM config fields")
    missing = [k for k in _NANOVLM_REQUIRED if k not in c]
    vocab = c.get("lm_vocab_size")
    if vocab is None:
        if "lm_base_vocab_size" in c and "extra_token_amount" in c:
            vocab = c["lm_base_vocab_size"] + c["extra_token_amount"]
        else:
            missing.append("lm_vocab_size")
    if missing:
        raise ValueError(f"{source}: missing nanoVLM field(s) {missing}")
    if c.get("vit_cls_flag", False):
        raise ValueError(f"{source}: vit_cls_flag = true (a ViT CLS token) is not supported")
    if float(c.get("lm_attn_scaling", 1.0)) != 1.0:
        raise ValueError(f"{source}: lm_attn_scaling {c['lm_attn_scaling']} is not supported (only 1.0)")
    try:
        lm = LMConfig(vocab_size=int(vocab), dim=c["lm_hidden_dim"], n_layers=c["lm_n_blocks"],
                      n_heads=c["lm_n_heads"], n_kv_heads=c["lm_n_kv_heads"], ffn_dim=c["lm_inter_dim"],
                      rope_theta=float(c["lm_re_base"]), rms_eps=float(c.get("lm_rms_eps", 1e-5)),
                      max_positions=int(c.get("lm_max_position_embeddings", 8192)),
                      tie_embeddings=bool(c.get("lm_tie_weights", True)), qkv_bias=False)
        vision = VisionConfig(image_size=c["vit_img_size"], patch_size=c["vit_patch_size"], dim=c["vit_hidden_dim"],
                              n_layers=c["vit_n_blocks"], n_heads=c["vit_n_heads"], mlp_dim=c["vit_inter_dim"],
                              ln_eps=float(c.get("vit_ln_eps", 1e-6)))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    s = int(c["mp_pixel_shuffle_factor"])
    grid = vision.image_size // vision.patch_size
    if s < 1 or grid % s:
        raise ValueError(f"{source}: mp_pixel_shuffle_factor {s} does not divide the {grid}x{grid} patch grid")
    n_tokens = (grid // s) ** 2
    if c.get("mp_image_token_length", n_tokens) != n_tokens:
        raise ValueError(f"{source}: mp_image_token_length {c['mp_image_token_length']} != (vit_img_size / "
                         f"vit_patch_size / mp_pixel_shuffle_factor)^2 = {n_tokens}")
    extra, base = c.get("vlm_extra_tokens"), c.get("lm_base_vocab_size")
    image_token_id = None
    if isinstance(extra, dict) and "image_token" in extra and base is not None:
        if base + len(extra) > lm.vocab_size:
            raise ValueError(f"{source}: lm_base_vocab_size {base} + {len(extra)} vlm_extra_tokens exceeds "
                             f"lm_vocab_size {lm.vocab_size}")
        image_token_id = base + list(extra).index("image_token")
    return lm, vision, s, image_token_id


def nanovlm_image_splitting(cfg_dict, source="config.json"):
    """(view_token_ids, ImageSplitting or None) from a nanoVLM config.json.

    The ids are lm_base_vocab_size + the index of each token in vlm_extra_tokens (how nanoVLM's
    tokenizer numbers its added tokens): "global_image_token" then "r1c1".."r8c8", in
    data.VIEW_TOKENS order (49153, 49154, ..., 49217 for nanoVLM-460M-8k). A config whose extra
    tokens lack any of them (older nanoVLM, or only "image_token") gets ((), None): one view per
    image. The splitting takes max_img_size (default 2048) and resize_to_max_side_len (default
    True: nanoVLM builds VLMConfig(**config.json), so a missing key takes its dataclass default)
    and nanoVLM's [0, 1] pixels."""
    from data import ImageSplitting, VIEW_TOKENS, MAX_GRID, GLOBAL_IMAGE_TOKEN, grid_token
    extra, base = cfg_dict.get("vlm_extra_tokens"), cfg_dict.get("lm_base_vocab_size")
    keys = ["global_image_token"] + [f"r{r}c{c}" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    if not isinstance(extra, dict) or base is None or not all(k in extra for k in keys):
        return (), None
    wrong = [f"{k}: {extra[k]!r} (expected {t!r})" for k, t in zip(keys, VIEW_TOKENS) if extra[k] != t]
    if wrong:
        raise ValueError(f"{source}: unexpected image-splitting token strings: {', '.join(wrong[:3])}")
    names = list(extra)
    ids = tuple(base + names.index(k) for k in keys)
    try:
        split = ImageSplitting(max_side=int(cfg_dict.get("max_img_size", 2048)),
                               resize_to_max_side=bool(cfg_dict.get("resize_to_max_side_len", True)), pixels="[0,1]")
        split.check_tile(int(cfg_dict["vit_img_size"]))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: image splitting: {e}") from None
    return ids, split


def nanovlm_key_map(vlm: VLM):
    """Our VLM key -> nanoVLM key. A value ending in [q], [k] or [v] is that third of the rows of
    the concatenated ViT `qkv_proj` tensor (q, k, v order). `vision.pos_embed` (N, D) maps to
    `patch_embedding.position_embedding`, stored as (1, N, D). With tied embeddings the shared
    matrix is `decoder.head.weight`, the name nanoVLM's save_model keeps."""
    lm, vis = vlm.decoder.cfg, vlm.vision.cfg
    if lm.qkv_bias:
        raise ValueError("nanoVLM's language model has no q/k/v biases (qkv_bias must be False)")
    v, d = "vision_encoder.", "decoder."
    m = {"vision.patch_embed.weight": v + "patch_embedding.conv.weight",
         "vision.patch_embed.bias": v + "patch_embedding.conv.bias",
         "vision.pos_embed": v + "patch_embedding.position_embedding"}
    for i in range(vis.n_layers):
        o, h = f"vision.blocks.{i}.", f"{v}blocks.{i}."
        for p in ("weight", "bias"):
            for ours, theirs in (("ln1", "ln1"), ("ln2", "ln2"), ("out_proj", "attn.out_proj"),
                                 ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                m[f"{o}{ours}.{p}"] = f"{h}{theirs}.{p}"
            for part in NANOVLM_QKV_PARTS:
                m[f"{o}{part}_proj.{p}"] = f"{h}attn.qkv_proj.{p}[{part}]"
    for p in ("weight", "bias"):
        m[f"vision.post_ln.{p}"] = f"{v}layer_norm.{p}"
    m["projector.proj.weight"] = "MP.proj.weight"
    if lm.tie_embeddings:
        m["decoder.embed.weight"] = d + "head.weight"
    else:
        m["decoder.embed.weight"] = d + "token_embedding.weight"
        m["decoder.lm_head.weight"] = d + "head.weight"
    m["decoder.norm.weight"] = d + "norm.weight"
    for i in range(lm.n_layers):
        o, h = f"decoder.layers.{i}.", f"{d}blocks.{i}."
        m[o + "attn_norm.weight"] = h + "norm1.weight"
        m[o + "mlp_norm.weight"] = h + "norm2.weight"
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                             ("o_proj", "out_proj")):
            m[f"{o}attn.{ours}.weight"] = f"{h}attn.{theirs}.weight"
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[f"{o}mlp.{p}.weight"] = f"{h}mlp.{p}.weight"
    return m


def _nanovlm_qkv_part(name):
    """'x.qkv_proj.weight[k]' -> ('x.qkv_proj.weight', 1); other names -> (name, None)."""
    if name.endswith("]") and "[" in name:
        key, part = name[:-1].rsplit("[", 1)
        return key, NANOVLM_QKV_PARTS.index(part)
    return name, None


def _nanovlm_tensors_for_map(tensors, key_map, tied):
    """File tensors renamed/reshaped so each key_map value names one tensor: qkv tensors split
    into their [q]/[k]/[v] thirds, the (1, N, D) position embedding squeezed (a plain (N, D)
    table, as HF SigLIP stores it, is taken as is), a tied embedding
    stored as token_embedding accepted as head. A tensor whose shape does not fit is passed on
    unchanged, so load_mapped reports it (with the file's shape) among all other problems."""
    out = dict(tensors)
    split = set()
    for name in key_map.values():
        key, part = _nanovlm_qkv_part(name)
        if part is not None and key in tensors:
            t = tensors[key]
            out[name] = t.chunk(3, dim=0)[part] if t.dim() >= 1 and t.shape[0] % 3 == 0 else t
            split.add(key)
    for key in split:
        del out[key]
    pos = "vision_encoder.patch_embedding.position_embedding"
    if pos in out and out[pos].dim() == 3 and out[pos].shape[0] == 1:
        out[pos] = out[pos][0]
    head, emb = "decoder.head.weight", "decoder.token_embedding.weight"
    if tied and emb in out:
        if head not in out:
            out[head] = out.pop(emb)
        elif out[head].shape == out[emb].shape and torch.equal(out[head], out[emb]):
            out.pop(emb)           # both copies stored and identical: fine; different ones stay "unexpected"
    return out


def load_nanovlm(folder, image_token_id=None):
    """A VLM from a nanoVLM folder (config.json + model.safetensors or shards).

    image_token_id: the <|image|> id; by default inferred from the config (nanovlm_configs),
    which for nanoVLM-460M-8k gives 49152. Every file key must be used (apart from the RoPE
    inv_freq buffer) and every shape must match; all problems are reported in one error.

    Features of images[k] (every view of every image, in token order) replace, in order, the
    image-token positions, exactly as nanoVLM's model computes it. The checkpoint's image
    splitting comes with it (nanovlm_image_splitting): vlm.view_token_ids = the <|global_image|>
    and <row_r_col_c> ids, vlm.image_splitting = max_img_size, resize_to_max_side_len and [0, 1]
    pixels, for data.collate(image_splitting=vlm.image_splitting) with a tokenizer from
    data.load_tokenizer(..., image_splitting=True)."""
    cfg_path = os.path.join(folder, "config.json")
    lm, vision, s, inferred = nanovlm_configs(read_json(cfg_path), cfg_path)
    image_token_id = inferred if image_token_id is None else image_token_id
    if image_token_id is None:
        raise ValueError(f"{cfg_path}: cannot infer the image token id (needs lm_base_vocab_size and "
                         f"vlm_extra_tokens with 'image_token'); pass image_token_id=")
    view_ids, splitting = nanovlm_image_splitting(read_json(cfg_path), cfg_path)
    tensors = read_safetensors_folder(folder)
    try:
        vlm = VLM(lm, vision, image_token_id, s, view_ids, splitting)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    key_map = nanovlm_key_map(vlm)
    return load_mapped(vlm, _nanovlm_tensors_for_map(tensors, key_map, lm.tie_embeddings), key_map,
                       NANOVLM_IGNORED, source=folder)


def nanovlm_config_dict(vlm: VLM):
    """The nanoVLM config.json fields for our VLM (names as in nanoVLM's VLMConfig)."""
    lm, vis = vlm.decoder.cfg, vlm.vision.cfg
    n_extra = lm.vocab_size - vlm.image_token_id
    if n_extra > len(NANOVLM_EXTRA_TOKENS):
        raise ValueError(f"nanoVLM numbers <|image|> lm_base_vocab_size (the first extra token); with "
                         f"image_token_id {vlm.image_token_id} and vocab_size {lm.vocab_size} that needs "
                         f"{n_extra} extra tokens, more than nanoVLM's {len(NANOVLM_EXTRA_TOKENS)}")
    n_views = len(NANOVLM_EXTRA_TOKENS) - 1
    if vlm.view_token_ids and vlm.view_token_ids != tuple(range(vlm.image_token_id + 1, vlm.image_token_id + 1 + n_views)):
        raise ValueError("nanoVLM numbers the global-image and grid tokens right after <|image|>; "
                         "view_token_ids must be image_token_id + 1 .. image_token_id + 65")
    split = vlm.image_splitting
    if split is not None and split.pixels != "[0,1]":
        raise ValueError("nanoVLM feeds [0, 1] pixels; image_splitting.pixels must be '[0,1]' to save as nanoVLM")
    extra = {} if split is None else {"max_img_size": split.max_side, "resize_to_max_side_len": split.resize_to_max_side}
    theta = int(lm.rope_theta) if float(lm.rope_theta).is_integer() else lm.rope_theta
    return {**extra, "vit_hidden_dim": vis.dim, "vit_inter_dim": vis.mlp_dim, "vit_patch_size": vis.patch_size,
            "vit_img_size": vis.image_size, "vit_n_heads": vis.n_heads, "vit_dropout": 0.0,
            "vit_n_blocks": vis.n_layers, "vit_ln_eps": vis.ln_eps, "vit_cls_flag": False,
            "lm_hidden_dim": lm.dim, "lm_inter_dim": lm.ffn_dim, "lm_rms_eps": lm.rms_eps, "lm_re_base": theta,
            "lm_max_position_embeddings": lm.max_positions, "lm_base_vocab_size": vlm.image_token_id,
            "extra_token_amount": n_extra, "lm_vocab_size": lm.vocab_size, "lm_n_heads": lm.n_heads,
            "lm_n_kv_heads": lm.n_kv_heads, "lm_dropout": 0.0, "lm_n_blocks": lm.n_layers, "lm_attn_scaling": 1.0,
            "lm_use_tokens": False, "lm_tie_weights": lm.tie_embeddings,
            "mp_pixel_shuffle_factor": vlm.projector.factor, "mp_image_token_length": vlm.n_image_tokens,
            "vlm_extra_tokens": dict(list(NANOVLM_EXTRA_TOKENS.items())[:n_extra])}


def save_nanovlm(vlm: VLM, folder):
    """Write our VLM as a nanoVLM folder (config.json + model.safetensors, both atomic), with the
    keys nanoVLM's save_model writes: concatenated qkv_proj, (1, N, D) position embedding, the
    RoPE inv_freq buffer, and for tied embeddings only decoder.head.weight. The image token
    must be the first extra token (image_token_id = lm_base_vocab_size), as in nanoVLM."""
    config = nanovlm_config_dict(vlm)
    sd = vlm.state_dict()
    tensors, qkv = {}, {}
    for ours, name in nanovlm_key_map(vlm).items():
        key, part = _nanovlm_qkv_part(name)
        if part is not None:
            qkv.setdefault(key, [None] * 3)[part] = sd[ours]
        elif ours == "vision.pos_embed":
            tensors[key] = sd[ours][None]
        else:
            tensors[key] = sd[ours]
    for key, parts in qkv.items():
        tensors[key] = torch.cat(parts, dim=0)
    hd = vlm.decoder.cfg.head_dim
    tensors["decoder.rotary_embd.inv_freq"] = 1.0 / (vlm.decoder.cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    write_json(os.path.join(folder, "config.json"), config)
