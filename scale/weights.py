"""
Weight loading and saving: Hugging Face Llama / SmolLM2 / Qwen2 decoders, HF SigLIP vision
towers, and our own VLM folders, with the tokenizer files beside the weights (save_tokenizer).

Every loader uses an explicit key map (our name -> file name) and checks, before copying
anything, that every expected key is in the file, every file key is used or explicitly
ignored, and every shape matches. All problems are reported in one error.
Weights are read with safetensors only (no pickle); files are written atomically.
"""
import json
import math
import os
from dataclasses import asdict, fields

import torch
from safetensors.torch import load_file, save_file

import data
from scale import tiles
from scale.tiles import MAX_GRID, ImageSplitting, Idefics3Splitting
from model import LMConfig, VisionConfig, Decoder, VisionEncoder, VLM
from plumbing.files import atomic_write, read_json, replace_folder, write_json




def _json_type(value):
    """The JSON name of a parsed value's type, for error messages."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


_KINDS = {  # kind -> (test, what was expected); bool is no number here although Python says so
    "size": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "index": (lambda v: type(v) is int and v >= 0, "a non-negative integer"),
    "number": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0,
               "a positive number"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "str": (lambda v: type(v) is str, "a string"),
    "object": (lambda v: type(v) is dict, "a JSON object"),
}
_REQUIRED = object()


class ConfigFields:
    """Typed reads from one JSON object of a config file. Every config loader below reads
    through this, so a config.json that is `[]`, or has `"hidden_size": "abc"`, or lacks a
    required field, is one ValueError naming the file, the key and what was expected, before
    any model is built. A JSON null counts as absent (Hugging Face writes null for unset
    optional fields)."""

    def __init__(self, obj, source, prefix=""):
        if not isinstance(obj, dict):
            where = f" at {prefix[:-1]!r}" if prefix else ""
            raise ValueError(f"{source}: expected a JSON object{where}, found {_json_type(obj)}")
        self.obj, self.source, self.prefix = obj, source, prefix

    def __contains__(self, key):
        return self.obj.get(key) is not None

    def get(self, key, kind, default=_REQUIRED):
        """obj[key] checked against `kind` (a key of _KINDS; "number" returns a float), or
        `default` when absent; absent without a default is an error."""
        test, expected = _KINDS[kind]
        value = self.obj.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.source}: missing field {self.prefix + key!r} (expected "
                                 f"{expected})")
            return default
        if not test(value):
            raise ValueError(f"{self.source}: field {self.prefix + key!r} is {_json_type(value)} "
                             f"({json.dumps(value)[:40]}), expected {expected}")
        return float(value) if kind == "number" else value

    def sub(self, key):
        """The nested object at `key` (required), as ConfigFields."""
        return ConfigFields(self.get(key, "object"), self.source, f"{self.prefix}{key}.")


def _build(cls, source, **kwargs):
    """cls(**kwargs) with the config's own consistency errors prefixed by the file."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_from_fields(cls, f: ConfigFields):
    """A config dataclass (LMConfig, VisionConfig) from an object holding exactly its fields,
    as our own folders store them (dataclasses.asdict): every field required and typed."""
    kinds = {"int": "size", "float": "number", "bool": "bool"}
    types = {fl.name: getattr(fl.type, "__name__", fl.type) for fl in fields(cls)}
    unknown = sorted(set(f.obj) - set(types))
    if unknown:
        raise ValueError(f"{f.source}: unknown field(s) {[f.prefix + k for k in unknown]}; "
                         f"expected the {cls.__name__} fields {sorted(types)}")
    return _build(cls, f.source, **{name: f.get(name, kinds[t]) for name, t in types.items()})


def read_safetensors_folder(folder, origin=None):
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.
    origin: an optional dict, filled with tensor name -> the file it came from (for errors)."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object of key -> shard file")
        files = [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{folder}: expected model.safetensors or "
                                "model.safetensors.index.json")
    tensors = {}
    for f in files:
        try:
            part = load_file(f)
        except Exception as e:
            raise ValueError(f"{f}: cannot read safetensors file ({e})") from None
        tensors.update(part)
        if origin is not None:
            origin.update(dict.fromkeys(part, f))
    return tensors


def save_safetensors(path, tensors):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def save_mapped(module, folder, key_map, config):
    """Write module's tensors under their file names (key_map: ours -> file) + config.json."""
    os.makedirs(folder, exist_ok=True)
    sd = module.state_dict()
    save_safetensors(os.path.join(folder, "model.safetensors"),
                     {fk: sd[ok] for ok, fk in key_map.items()})
    write_json(os.path.join(folder, "config.json"), config)


def load_mapped(module, tensors, key_map, ignore_prefixes=(), source="weights", origin=None):
    """Copy file tensors into module. key_map: our state-dict key -> file key.
    Fails with one error listing missing keys, unused keys, shape mismatches, non-float
    tensors where a float weight is expected (an int64 table is never cast silently) and
    tensors holding NaN or inf (a broken checkpoint would train to NaN or, as a frozen teacher,
    give NaN KD targets); `origin`, from read_safetensors_folder, names the file holding one."""
    ours = module.state_dict()
    missing = [fk for ok, fk in key_map.items() if fk not in tensors]
    used = set(key_map.values())
    unused = [k for k in tensors if k not in used and not k.startswith(tuple(ignore_prefixes))]
    shapes = [f"{fk}: file {tuple(tensors[fk].shape)} vs model {tuple(ours[ok].shape)}"
              for ok,
              fk in key_map.items() if fk in tensors and tensors[fk].shape != ours[ok].shape]
    dtypes = [f"{(origin or {}).get(fk, source)}: tensor {fk} is {str(tensors[fk].dtype)[6:]}, "
              f"expected floating point" for ok, fk in key_map.items()
              if fk in tensors and ours[ok].is_floating_point()
              and not tensors[fk].is_floating_point()]
    nonfinite = [f"{(origin or {}).get(fk, source)}: tensor {fk} has "
                 f"{int((~torch.isfinite(tensors[fk])).sum())} NaN/inf value(s), expected finite "
                 "weights" for fk in key_map.values()
                 if fk in tensors and tensors[fk].is_floating_point()
                 and not bool(torch.isfinite(tensors[fk]).all())]
    problems = ([f"missing key {k}" for k in missing]
                + [f"unexpected key {k}" for k in sorted(unused)]
                + [f"shape mismatch {s}" for s in shapes] + [f"wrong dtype {s}" for s in dtypes]
                + [f"non-finite {s}" for s in nonfinite])
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20
                                 else [])
        raise ValueError(f"{source}: {len(problems)} problem(s) loading weights:\n  "
                         + "\n  ".join(shown))
    with torch.no_grad():
        for ok, fk in key_map.items():
            ours[ok].copy_(tensors[fk])
    return module


# ----------------------------------------------------------------------------------------
# Hugging Face decoders (Llama / SmolLM2 / Qwen2)

def lm_config_from_hf(hf, source="config.json"):
    f = ConfigFields(hf, source)
    model_type = f.get("model_type", "str", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a Llama-style decoder "
                         "(llama, qwen2)")
    if f.get("attention_bias", "bool", False) or f.get("mlp_bias", "bool", False):
        raise ValueError(f"{source}: attention_bias/mlp_bias = true is not supported (only Qwen2's "
                         "q/k/v bias)")
    rope_params = ConfigFields(f.get("rope_parameters", "object", {}), source, "rope_parameters.")
    theta = f.get("rope_theta", "number", None) or rope_params.get("rope_theta", "number", None)
    if theta is None:
        raise ValueError(f"{source}: missing 'rope_theta' (or 'rope_parameters.rope_theta')")
    rope = rope_params if rope_params.obj else ConfigFields(f.get("rope_scaling", "object", {}),
                                                            source, "rope_scaling.")
    rope_type = rope.get("rope_type", "str", "default")
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
    n_heads = f.get("num_attention_heads", "size")
    cfg = _build(LMConfig, source, vocab_size=f.get("vocab_size", "size"),
                 dim=f.get("hidden_size", "size"),
                 n_layers=f.get("num_hidden_layers", "size"), n_heads=n_heads,
                 n_kv_heads=f.get("num_key_value_heads", "size", n_heads),
                 ffn_dim=f.get("intermediate_size", "size"), rope_theta=theta,
                 rms_eps=f.get("rms_norm_eps", "number", 1e-6),
                 max_positions=f.get("max_position_embeddings", "size", 2048),
                 tie_embeddings=f.get("tie_word_embeddings", "bool", False),
                 qkv_bias=model_type == "qwen2")
    if f.get("head_dim", "size", cfg.head_dim) != cfg.head_dim:
        raise ValueError(f"{source}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads "
                         f"{cfg.head_dim}")
    return cfg


def lm_config_to_hf(cfg: LMConfig):
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    return {"architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "intermediate_size": cfg.ffn_dim, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_eps,
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
    return ("model.rotary_emb.",
            "rotary_emb.") + (("lm_head.weight",) if cfg.tie_embeddings else ())


def load_hf_lm(folder):
    """A Decoder from a Hugging Face Llama / SmolLM2 / Qwen2 folder (config.json + safetensors)."""
    cfg_path = os.path.join(folder, "config.json")
    cfg = lm_config_from_hf(read_json(cfg_path), cfg_path)
    origin = {}
    tensors = read_safetensors_folder(folder, origin)
    ignore = hf_lm_ignored(cfg) + tuple(k for k in tensors if ".rotary_emb.inv_freq" in k)
    return load_mapped(Decoder(cfg), tensors, hf_lm_key_map(cfg), ignore, source=folder,
                       origin=origin)


def save_hf_lm(decoder: Decoder, folder):
    """Save a Decoder as a Hugging Face folder that transformers (and load_hf_lm) reloads."""
    save_mapped(decoder, folder, hf_lm_key_map(decoder.cfg), lm_config_to_hf(decoder.cfg))


# ----------------------------------------------------------------------------------------
# Hugging Face SigLIP vision towers

def vision_config_from_hf(hf, source="config.json"):
    f = ConfigFields(hf, source)
    if "vision_config" in f:                  # a full SiglipConfig nests the vision part
        f = f.sub("vision_config")
    missing = [k
               for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads",
                           "image_size", "patch_size") if k not in f]
    if missing:
        raise ValueError(f"{source}: missing vision field(s) {[f.prefix + k for k in missing]}")
    act = f.get("hidden_act", "str", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"{source}: hidden_act {act!r} unsupported (expected gelu_pytorch_tanh)")
    return _build(VisionConfig, source, image_size=f.get("image_size", "size"),
                  patch_size=f.get("patch_size", "size"), dim=f.get("hidden_size", "size"),
                  n_layers=f.get("num_hidden_layers", "size"),
                  n_heads=f.get("num_attention_heads", "size"),
                  mlp_dim=f.get("intermediate_size", "size"),
                  ln_eps=f.get("layer_norm_eps", "number", 1e-6))


def vision_config_to_hf(cfg: VisionConfig):
    return {"model_type": "siglip_vision_model", "hidden_size": cfg.dim,
            "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "layer_norm_eps": cfg.ln_eps,
            "hidden_act": "gelu_pytorch_tanh", "num_channels": 3}


def hf_vision_key_map(cfg: VisionConfig, prefix="vision_model."):
    """Our VisionEncoder key -> HF SiglipVisionModel key."""
    m = {"patch_embed.weight": prefix + "embeddings.patch_embedding.weight",
         "patch_embed.bias": prefix + "embeddings.patch_embedding.bias",
         "pos_embed": prefix + "embeddings.position_embedding.weight"}
    for i in range(cfg.n_layers):
        o, h = f"blocks.{i}.", f"{prefix}encoder.layers.{i}."
        pairs = {"ln1": "layer_norm1", "ln2": "layer_norm2", "q_proj": "self_attn.q_proj",
                 "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                 "out_proj": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
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
    origin = {}
    return load_mapped(VisionEncoder(cfg), read_safetensors_folder(folder, origin),
                       hf_vision_key_map(cfg), SIGLIP_IGNORED, source=folder, origin=origin)


# ----------------------------------------------------------------------------------------
# Our VLM folders: config.json {lm, vision, image_token_id, shuffle_factor} + model.safetensors

def vlm_key_map(vlm: VLM):
    keys = [k for k in vlm.state_dict()
            if not (vlm.decoder.cfg.tie_embeddings and k == "decoder.lm_head.weight")]
    return {k: k for k in keys}


def _splitting_to_json(split):
    """An image splitting as config.json stores it; an Idefics3 one is marked by its layout."""
    if split is None:
        return None
    return {"layout": "idefics3", **asdict(split)} if isinstance(split, Idefics3Splitting) \
        else asdict(split)


def _splitting_from_json(split, source):
    if split is None:
        return None
    split = dict(split)
    cls = Idefics3Splitting if split.pop("layout", "nanovlm") == "idefics3" else ImageSplitting
    return _build(cls, source, **split)


def save_vlm(vlm: VLM, folder):
    """config.json also records the view token ids and the image splitting (None: one view)."""
    save_mapped(vlm, folder, vlm_key_map(vlm),
                {"model_type": "lingudistill_vlm", "lm": asdict(vlm.decoder.cfg),
                 "vision": asdict(vlm.vision.cfg),
                 "image_token_id": vlm.image_token_id, "shuffle_factor": vlm.projector.factor,
                 "view_token_ids": list(vlm.view_token_ids),
                 "image_splitting": _splitting_to_json(vlm.image_splitting)})


def load_vlm(folder):
    cfg_path = os.path.join(folder, "config.json")
    c = ConfigFields(read_json(cfg_path), cfg_path)
    if c.obj.get("model_type") != "lingudistill_vlm":
        raise ValueError(f"{cfg_path}: model_type {c.obj.get('model_type')!r}, expected "
                         "'lingudistill_vlm'")
    lm, vision = config_from_fields(LMConfig,
                                    c.sub("lm")), config_from_fields(VisionConfig, c.sub("vision"))
    image_token_id, factor = c.get("image_token_id", "index"), c.get("shuffle_factor", "size")
    view_ids = c.obj.get("view_token_ids") or []                 # absent in older folders: one view
    if not (isinstance(view_ids, list) and all(type(i) is int and i >= 0 for i in view_ids)):
        raise ValueError(f"{cfg_path}: field 'view_token_ids' is {view_ids!r}, expected a list of "
                         "ids")
    split = _splitting_from_json(c.get("image_splitting", "object", None), cfg_path)
    vlm = _build(VLM, cfg_path, lm_cfg=lm, vision_cfg=vision, image_token_id=image_token_id,
                 shuffle_factor=factor, view_token_ids=tuple(view_ids), image_splitting=split)
    origin = {}
    return load_mapped(vlm, read_safetensors_folder(folder, origin), vlm_key_map(vlm),
                       source=folder, origin=origin)


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
                        **{f"r{i}c{j}": f"<row_{i}_col_{j}>" for i in range(1, 9)
                           for j in range(1, 9)}}
NANOVLM_QKV_PARTS = ("q", "k", "v")
# File keys that are present and not loaded: RoPE's inverse frequencies (recomputed from
# lm_re_base).
NANOVLM_IGNORED = ("decoder.rotary_embd.inv_freq",)

_NANOVLM_REQUIRED = ("vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size",
                     "vit_n_heads",
                     "vit_n_blocks", "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads",
                     "lm_n_blocks", "lm_re_base", "mp_pixel_shuffle_factor")


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
    f = ConfigFields(cfg_dict, source)
    missing = [k for k in _NANOVLM_REQUIRED if k not in f]
    if "lm_vocab_size" in f:
        vocab = f.get("lm_vocab_size", "size")
    elif "lm_base_vocab_size" in f and "extra_token_amount" in f:
        vocab = f.get("lm_base_vocab_size", "size") + f.get("extra_token_amount", "index")
    else:
        missing.append("lm_vocab_size")
    if missing:
        raise ValueError(f"{source}: missing nanoVLM field(s) {missing}")
    if f.get("vit_cls_flag", "bool", False):
        raise ValueError(f"{source}: vit_cls_flag = true (a ViT CLS token) is not supported")
    if f.get("lm_attn_scaling", "number", 1.0) != 1.0:
        raise ValueError(f"{source}: lm_attn_scaling {cfg_dict['lm_attn_scaling']} is not "
                         "supported (only 1.0)")
    lm = _build(LMConfig, source, vocab_size=vocab, dim=f.get("lm_hidden_dim", "size"),
                n_layers=f.get("lm_n_blocks", "size"), n_heads=f.get("lm_n_heads", "size"),
                n_kv_heads=f.get("lm_n_kv_heads", "size"), ffn_dim=f.get("lm_inter_dim", "size"),
                rope_theta=f.get("lm_re_base", "number"),
                rms_eps=f.get("lm_rms_eps", "number", 1e-5),
                max_positions=f.get("lm_max_position_embeddings", "size", 8192),
                tie_embeddings=f.get("lm_tie_weights", "bool", True), qkv_bias=False)
    vision = _build(VisionConfig, source, image_size=f.get("vit_img_size", "size"),
                    patch_size=f.get("vit_patch_size", "size"), dim=f.get("vit_hidden_dim", "size"),
                    n_layers=f.get("vit_n_blocks", "size"), n_heads=f.get("vit_n_heads", "size"),
                    mlp_dim=f.get("vit_inter_dim", "size"),
                    ln_eps=f.get("vit_ln_eps", "number", 1e-6))
    s = f.get("mp_pixel_shuffle_factor", "size")
    grid = vision.image_size // vision.patch_size
    if grid % s:
        raise ValueError(f"{source}: mp_pixel_shuffle_factor {s} does not divide the {grid}x{grid} "
                         "patch grid")
    n_tokens = (grid // s) ** 2
    if f.get("mp_image_token_length", "size", n_tokens) != n_tokens:
        raise ValueError(f"{source}: mp_image_token_length {cfg_dict['mp_image_token_length']} != "
                         "(vit_img_size / vit_patch_size / mp_pixel_shuffle_factor)^2 = "
                         f"{n_tokens}")
    extra, base = f.get("vlm_extra_tokens", "object",
                        None), f.get("lm_base_vocab_size", "size", None)
    image_token_id = None
    if extra is not None and "image_token" in extra and base is not None:
        if base + len(extra) > lm.vocab_size:
            raise ValueError(f"{source}: lm_base_vocab_size {base} + {len(extra)} vlm_extra_tokens "
                             f"exceeds lm_vocab_size {lm.vocab_size}")
        image_token_id = base + list(extra).index("image_token")
    return lm, vision, s, image_token_id


def nanovlm_image_splitting(cfg_dict, source="config.json"):
    """(view_token_ids, ImageSplitting or None) from a nanoVLM config.json.

    The ids are lm_base_vocab_size + the index of each token in vlm_extra_tokens (how nanoVLM's
    tokenizer numbers its added tokens): "global_image_token" then "r1c1".."r8c8", in
    tiles.VIEW_TOKENS order (49153, 49154, ..., 49217 for nanoVLM-460M-8k). A config whose extra
    tokens lack any of them (older nanoVLM, or only "image_token") gets ((), None): one view per
    image. The splitting takes max_img_size (default 2048) and resize_to_max_side_len (default
    True: nanoVLM builds VLMConfig(**config.json), so a missing key takes its dataclass default)
    and nanoVLM's [0, 1] pixels."""
    extra, base = cfg_dict.get("vlm_extra_tokens"), cfg_dict.get("lm_base_vocab_size")
    keys = ["global_image_token"] + [f"r{r}c{c}" for r in range(1, MAX_GRID + 1)
                                     for c in range(1, MAX_GRID + 1)]
    if not isinstance(extra, dict) or base is None or not all(k in extra for k in keys):
        return (), None
    wrong = [f"{k}: {extra[k]!r} (expected {NANOVLM_EXTRA_TOKENS[k]!r})" for k in keys
             if extra[k] != NANOVLM_EXTRA_TOKENS[k]]
    if wrong:
        raise ValueError(f"{source}: unexpected image-splitting token strings: "
                         f"{', '.join(wrong[:3])}")
    names = list(extra)
    ids = tuple(base + names.index(k) for k in keys)
    try:
        to_max = bool(cfg_dict.get("resize_to_max_side_len", True))
        split = ImageSplitting(max_side=int(cfg_dict.get("max_img_size", 2048)),
                               resize_to_max_side=to_max, pixels="[0,1]")
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
            out.pop(emb)  # both copies stored and identical: fine; different ones stay "unexpected"
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
    pixels, for tiles.collate(..., vlm.image_splitting) with a tokenizer from
    data.load_tokenizer(..., extra_tokens=tiles.VIEW_TOKENS)."""
    cfg_path = os.path.join(folder, "config.json")
    lm, vision, s, inferred = nanovlm_configs(read_json(cfg_path), cfg_path)
    image_token_id = inferred if image_token_id is None else image_token_id
    if image_token_id is None:
        raise ValueError(f"{cfg_path}: cannot infer the image token id (needs lm_base_vocab_size "
                         f"and vlm_extra_tokens with 'image_token'); pass image_token_id=")
    view_ids, splitting = nanovlm_image_splitting(read_json(cfg_path), cfg_path)
    origin = {}
    tensors = read_safetensors_folder(folder, origin)
    vlm = _build(VLM, cfg_path, lm_cfg=lm, vision_cfg=vision, image_token_id=image_token_id,
                 shuffle_factor=s, view_token_ids=view_ids, image_splitting=splitting)
    key_map = nanovlm_key_map(vlm)
    origin.update({name: origin[key] for name in key_map.values()         # q/k/v thirds: their file
                   for key in [_nanovlm_qkv_part(name)[0]] if key in origin})
    return load_mapped(vlm, _nanovlm_tensors_for_map(tensors, key_map, lm.tie_embeddings), key_map,
                       NANOVLM_IGNORED, source=folder, origin=origin)


# ----------------------------------------------------------------------------------------
# SmolVLM / Idefics3 folders (transformers' SmolVLMForConditionalGeneration and
# Idefics3ForConditionalGeneration; SmolVLM-256M/500M = SigLIP-B/16-512 + SmolLM2-135M/360M)
#
# Layout facts (transformers models/idefics3, models/smolvlm; the parity tests check them):
# - config.json: model_type "smolvlm" or "idefics3", vision_config (SigLIP fields), text_config
#   (a Llama config), scale_factor (the pixel shuffle), image_token_id, tie_word_embeddings (the
#   top-level value decides the tying).
# - Keys: model.vision_model.* (SigLIP's names), model.connector.modality_projection.proj.weight
#   (Linear(D_vit * s^2, D_lm, bias=False)), model.text_model.* (Llama's names), lm_head.weight.
# - The connector's pixel shuffle puts the features of each s x s neighbourhood in the order
#   (row offset, column offset, channel), row-major over the output grid: model.pixel_shuffle's
#   order, so the projector is reused as is.
# - The vision tower's position ids (bucketised fractional coordinates, for images of any size)
#   are 0..N-1 for a full tile, which is all the processor ever gives it.
# - Image splitting and the image-token layout come from the processor's settings
#   (preprocessor_config.json, or processor_config.json's "image_processor"):
#   tiles.Idefics3Splitting and tiles.idefics3_image_prompt.

SMOLVLM_MODEL_TYPES = ("smolvlm", "idefics3")


def is_smolvlm_folder(folder):
    """True if folder/config.json names a SmolVLM / Idefics3 model (False for anything else,
    including no folder or an unreadable config: the loaders report those)."""
    path = os.path.join(folder, "config.json") if folder else ""
    try:
        c = read_json(path) if os.path.isfile(path) else None
    except ValueError:
        return False
    return isinstance(c, dict) and c.get("model_type") in SMOLVLM_MODEL_TYPES


def smolvlm_configs(cfg_dict, source="config.json"):
    """(LMConfig, VisionConfig, scale_factor, image_token_id) from a SmolVLM / Idefics3
    config.json. The text part is read as a Hugging Face Llama config (lm_config_from_hf), the
    vision part as SigLIP's (vision_config_from_hf); the tying is the top-level
    tie_word_embeddings (transformers' rule; default false)."""
    f = ConfigFields(cfg_dict, source)
    model_type = f.get("model_type", "str")
    if model_type not in SMOLVLM_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r}, expected one of "
                         f"{SMOLVLM_MODEL_TYPES}")
    text = f.get("text_config", "object")
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: text_config.model_type {text.get('model_type')!r}; only a "
                         "Llama decoder is supported")
    lm = lm_config_from_hf(text, f"{source} (text_config)")
    tied = f.get("tie_word_embeddings", "bool", text.get("tie_word_embeddings") is True)
    lm = _build(LMConfig, source, **{**asdict(lm), "tie_embeddings": tied})
    vision = vision_config_from_hf(f.get("vision_config", "object"), f"{source} (vision_config)")
    s = f.get("scale_factor", "size", 2)
    grid = vision.image_size // vision.patch_size
    if grid % s:
        raise ValueError(f"{source}: scale_factor {s} does not divide the {grid}x{grid} patch grid")
    image_token_id = f.get("image_token_id", "index")
    if image_token_id >= lm.vocab_size:
        raise ValueError(f"{source}: image_token_id {image_token_id} is outside the text "
                         f"vocabulary ({lm.vocab_size})")
    return lm, vision, s, image_token_id


def smolvlm_image_splitting(folder, vision: VisionConfig, n_image_tokens):
    """tiles.Idefics3Splitting from the processor's settings in `folder`: preprocessor_config.json
    (or processor_config.json holding "image_processor"). Checked: views of the vision tower's
    size, pixels normalised to [-1, 1] (mean = std = 0.5, rescale 1/255), and, when the
    processor names it, image_seq_len = the model's image tokens per view."""
    pre, proc = (os.path.join(folder, n) for n in ("preprocessor_config.json",
                                                   "processor_config.json"))
    proc_cfg = read_json(proc) if os.path.isfile(proc) else {}
    if os.path.isfile(pre):
        source, settings = pre, read_json(pre)
    elif isinstance(proc_cfg, dict) and isinstance(proc_cfg.get("image_processor"), dict):
        source, settings = proc, proc_cfg["image_processor"]
    else:
        raise FileNotFoundError(f"{folder}: no image processor settings (expected "
                                "preprocessor_config.json, as SmolVLM folders have)")
    f = ConfigFields(settings, source)
    longest = ConfigFields(f.get("size", "object", {"longest_edge": 4 * vision.image_size}),
                           source, "size.").get("longest_edge", "size")
    tile = ConfigFields(f.get("max_image_size", "object", {"longest_edge": vision.image_size}),
                        source, "max_image_size.").get("longest_edge", "size")
    mean, std = settings.get("image_mean", [0.5] * 3), settings.get("image_std", [0.5] * 3)
    rescale = f.get("rescale_factor", "number", 1 / 255)
    problems = ([f"max_image_size.longest_edge {tile} != the vision tower's image_size "
                 f"{vision.image_size}"] * (tile != vision.image_size)
                + [f"image_mean {mean} / image_std {std} (only 0.5: pixels in [-1, 1])"]
                * (mean != [0.5] * 3 or std != [0.5] * 3)
                + [f"rescale_factor {rescale} (only 1/255)"] * (abs(rescale * 255 - 1) > 1e-6)
                + [f"{k} = false (only true)" for k in ("do_resize", "do_rescale", "do_normalize",
                                                        "do_convert_rgb")
                   if f.get(k, "bool", True) is False])
    seq = proc_cfg.get("image_seq_len") if isinstance(proc_cfg, dict) else None
    if seq is not None and seq != n_image_tokens:
        problems.append(f"{proc}: image_seq_len {seq} != (image_size / patch_size)^2 / "
                        f"scale_factor^2 = {n_image_tokens}")
    if problems:
        raise ValueError(f"{source}: unsupported image processing: " + "; ".join(problems))
    resample = f.get("resample", "index", 1)
    return _build(Idefics3Splitting, source, longest_edge=longest, tile=tile,
                  split=f.get("do_image_splitting", "bool", True), resample=resample)


def smolvlm_view_token_ids(tokenizer_path, splitting: Idefics3Splitting):
    """The ids of the layout tokens around the image tokens (<fake_token_around_image>,
    <global-img>, and <row_r_col_c> up to the largest grid the splitting can give), from the
    folder's tokenizer.json; every one must be a token of it."""
    from tokenizers import Tokenizer
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{tokenizer_path}: a SmolVLM student needs its tokenizer.json")
    tok = Tokenizer.from_file(tokenizer_path)
    n = math.ceil(min(splitting.longest_edge, tiles.IDEFICS3_MAX_SIDE) / splitting.tile)
    names = [tiles.FAKE_IMAGE_TOKEN, tiles.IDEFICS3_GLOBAL_TOKEN] + (
        [tiles.grid_token(r, c) for r in range(1, n + 1) for c in range(1, n + 1)]
        if splitting.split else [])
    missing = [t for t in names if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{tokenizer_path}: no token(s) {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''} for the image layout")
    return tok, tuple(tok.token_to_id(t) for t in names)


def smolvlm_key_map(vlm: VLM):
    """Our VLM key -> SmolVLM / Idefics3 key (SigLIP's and Llama's names under model.)."""
    m = {"vision." + k: v for k, v in hf_vision_key_map(vlm.vision.cfg,
                                                         "model.vision_model.").items()}
    m["projector.proj.weight"] = "model.connector.modality_projection.proj.weight"
    m.update({"decoder." + k: v for k, v in hf_lm_key_map(vlm.decoder.cfg,
                                                          "model.text_model.").items()})
    return m


def load_smolvlm(folder):
    """A VLM from a SmolVLM / Idefics3 folder (config.json, model.safetensors or shards,
    tokenizer.json, the processor's settings). vlm.image_splitting is the processor's
    (tiles.Idefics3Splitting), vlm.view_token_ids the image-layout tokens; train.py adds every
    other id past the teacher's vocabulary to the student-only ids."""
    cfg_path = os.path.join(folder, "config.json")
    lm, vision, s, image_token_id = smolvlm_configs(read_json(cfg_path), cfg_path)
    n_image_tokens = vision.n_patches // s ** 2
    splitting = smolvlm_image_splitting(folder, vision, n_image_tokens)
    tok_path = os.path.join(folder, "tokenizer.json")
    tok, view_ids = smolvlm_view_token_ids(tok_path, splitting)
    if tok.token_to_id(data.IMAGE_TOKEN) != image_token_id:
        raise ValueError(f"{folder}: config.json's image_token_id {image_token_id} is not the "
                         f"tokenizer's {data.IMAGE_TOKEN} ({tok.token_to_id(data.IMAGE_TOKEN)})")
    origin = {}
    tensors = read_safetensors_folder(folder, origin)
    vlm = _build(VLM, cfg_path, lm_cfg=lm, vision_cfg=vision, image_token_id=image_token_id,
                 shuffle_factor=s, view_token_ids=view_ids, image_splitting=splitting)
    ignore = ("model.text_model.rotary_emb.",) + (("lm_head.weight",) if lm.tie_embeddings
                                                  else ())
    return load_mapped(vlm, tensors, smolvlm_key_map(vlm), ignore, source=folder, origin=origin)


def with_student_only_tail(vlm: VLM, teacher_vocab_size):
    """The VLM with every id >= teacher_vocab_size (the ids the teacher has no row for: a
    SmolVLM vocabulary extended past SmolLM2's 49,152) among its student-only ids, so the
    teacher reads their KV and never embeds them. Returns vlm (changed in place)."""
    tail = [i for i in range(teacher_vocab_size, vlm.decoder.cfg.vocab_size)
            if i != vlm.image_token_id and i not in vlm.view_token_ids]
    vlm.view_token_ids = tuple(vlm.view_token_ids) + tuple(tail)
    return vlm


# ----------------------------------------------------------------------------------------
# Tokenizers beside the weights

def save_model_folder(folder, save_weights, tokenizer, train_config):
    """A model folder, written whole or not at all (replace_folder): save_weights(tmp) (weights +
    config, HF layout or ours), the tokenizer and train_config.json (train.py's config)."""
    def fill(tmp):
        save_weights(tmp)
        save_tokenizer(tokenizer, tmp)
        write_json(os.path.join(tmp, "train_config.json"), train_config)
    replace_folder(folder, fill)


def save_tokenizer(tokenizer, folder):
    """tokenizer.json + (if data.load_tokenizer mapped roles to the tokenizer's own tokens) a
    tokenizer_config.json naming them, so data.load_tokenizer(folder/tokenizer.json) maps them again
    instead of appending new <pad>/<eos> ids. Keys of an existing tokenizer_config.json (a chat
    template, ...) are kept."""
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "tokenizer.json"), tokenizer.save)
    roles = getattr(tokenizer, "role_tokens", {})
    if roles:
        path = os.path.join(folder, "tokenizer_config.json")
        cfg = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        cfg.update({key: roles[role] for role,
                    key in ((data.EOS_TOKEN, "eos_token"), (data.PAD_TOKEN, "pad_token")) if role in roles})
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
        atomic_write(path, write)


# ----------------------------------------------------------------------------------------
# Any model folder

def image_layout(folder):
    """(image tokens per view, ImageSplitting or None) of the VLM in `folder` from its config.json
    alone (our VLM or a nanoVLM folder; no weights read); None for a SmolVLM / Idefics3 folder
    (its processor's layout) or anything else."""
    cfg_path = os.path.join(folder, "config.json")
    c = read_json(cfg_path)
    if isinstance(c, dict) and c.get("model_type") == "lingudistill_vlm":
        f = ConfigFields(c, cfg_path)
        vision = config_from_fields(VisionConfig, f.sub("vision"))
        split = _splitting_from_json(f.get("image_splitting", "object", None), cfg_path)
        return None if isinstance(split, Idefics3Splitting) else \
            (vision.n_patches // f.get("shuffle_factor", "size") ** 2, split)
    if isinstance(c, dict) and "vit_hidden_dim" in c:
        _, vision, factor, _ = nanovlm_configs(c, cfg_path)
        return vision.n_patches // factor ** 2, nanovlm_image_splitting(c, cfg_path)[1]
    return None


def load_model_folder(folder, image_token_id=None):
    """The model in `folder`, by its config.json: our VLM (model_type "lingudistill_vlm"), a
    SmolVLM / Idefics3 folder (model_type "smolvlm" / "idefics3"), a nanoVLM checkpoint (vit_* /
    lm_* fields; image_token_id as for load_nanovlm) or a
    Hugging Face decoder LM (load_hf_lm)."""
    cfg_path = os.path.join(folder, "config.json")
    c = read_json(cfg_path)
    if not isinstance(c, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, found {type(c).__name__}")
    if c.get("model_type") == "lingudistill_vlm":
        return load_vlm(folder)
    if c.get("model_type") in SMOLVLM_MODEL_TYPES:
        return load_smolvlm(folder)
    if "vit_hidden_dim" in c:
        return load_nanovlm(folder, image_token_id=image_token_id)
    return load_hf_lm(folder)
