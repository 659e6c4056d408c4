"""
Convert a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face Llama folder.

    python tools/convert_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf .weights/smollm2-135m

Writes config.json (LlamaForCausalLM layout), model.safetensors (float32, HF key names),
and, when the GGUF carries tokenizer metadata, tokenizer.json, tokenizer_config.json and
special_tokens_map.json. The result loads with LlamaForCausalLM.from_pretrained(out_dir)
or with weights.py.

Three things differ between GGUF and HF and are undone here:
  * names: an explicit key map (GGUF name -> HF name); unknown or missing tensors are an error;
  * storage: any quant type (Q4_1, Q8_0, F16, ...) is dequantized with gguf.quants.dequantize;
    GGUF lists dims fastest-first (ne order), i.e. reversed w.r.t. numpy/torch shapes;
  * q/k rows: llama.cpp's converter permutes the rows of q_proj and k_proj so that its RoPE
    rotates adjacent pairs (x0, x1) instead of HF's halves (x_i, x_{i+d/2}); see unpermute().
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plumbing.files import atomic_write, check_new_folder, replace_folder, write_json

log = logging.getLogger(__name__)

LAYER_MAP = {  # GGUF per-layer name -> HF per-layer name
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp token_type values


def permute(w, n_heads):
    """llama.cpp's HF -> GGUF q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute).
    Within each head, rows [first half | second half] become interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2,
                     *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_heads):
    """Inverse of permute(): GGUF q/k rows -> HF rows. View each head's rows as
    (head_dim/2, 2) pairs, swap back to (2, head_dim/2) halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2,
                     *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    """Metadata value (scalar, string or list) or `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    # stored as float32: 1e-5 -> 9.9999997e-06; keep the short form
    if isinstance(v, (np.floating, float)):
        v = float(str(np.float32(v)))
    return v.item() if isinstance(v, np.generic) else v


def read_config(reader):
    """HF LlamaConfig dict from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only the 'llama' GGUF architecture is supported, got {arch!r}")

    def need(key):
        value = _field(reader, key)
        if value is None:
            raise ValueError(f"GGUF metadata is missing {key!r}")
        return value

    hidden, n_heads = need("llama.embedding_length"), need("llama.attention.head_count")
    vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:  # fall back to the embedding's row count
        vocab = int([t for t in reader.tensors if t.name == "token_embd.weight"][0].shape[1])
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": need("llama.feed_forward_length"),
        "num_hidden_layers": need("llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", n_heads),
        "head_dim": _field(reader, "llama.attention.key_length", hidden // n_heads),
        "rms_norm_eps": need("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, "llama.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def key_map(cfg):
    """GGUF tensor name -> (HF name, expected torch shape)."""
    h, hd, f, v = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"attn_norm": (h,), "ffn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h),
              "attn_v": (kv, h),
              "attn_output": (h, q), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    m = {"token_embd.weight": ("model.embed_tokens.weight", (v, h)),
         "output_norm.weight": ("model.norm.weight", (h,))}
    if not cfg["tie_word_embeddings"]:
        m["output.weight"] = ("lm_head.weight", (v, h))
    for i in range(cfg["num_hidden_layers"]):
        for g, name in LAYER_MAP.items():
            m[f"blk.{i}.{g}.weight"] = (f"model.layers.{i}.{name}.weight", shapes[g])
    return m


def read_tensors(reader, cfg):
    """All GGUF tensors as float32 torch tensors with HF names and HF row order."""
    from gguf.quants import dequantize
    kmap, have = key_map(cfg), {t.name: t for t in reader.tensors}
    missing, unknown = sorted(set(kmap) - set(have)), sorted(set(have) - set(kmap))
    if missing or unknown:
        raise ValueError(f"GGUF tensors do not match the llama layout: missing {missing}, "
                         f"unknown/unused {unknown}")
    out, bad = {}, []
    for name, (hf_name, shape) in kmap.items():
        t = have[name]
        np_shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne order -> numpy order
        if np_shape != shape:
            bad.append(f"{name}: {np_shape} != {shape}")
            continue
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(np_shape)
        except ValueError as e:                  # e.g. a truncated file: fewer bytes than the shape
            raise ValueError(f"tensor {name}: cannot read its {np_shape} data ({e}); is the file "
                             "truncated?") from None
        if name.endswith("attn_q.weight"):
            w = unpermute(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, cfg["num_key_value_heads"])
        out[hf_name] = torch.from_numpy(w.copy())  # copy: F32 data is a read-only view of the mmap
    if bad:
        raise ValueError("GGUF tensor shapes do not match the config: " + "; ".join(bad))
    return out


def build_tokenizer(reader):
    """(tokenizers.Tokenizer, tokenizer_config dict) from tokenizer.ggml.*, or None if absent."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tokens, merges = _field(reader,
                            "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.merges")
    kind = _field(reader, "tokenizer.ggml.model")
    if not tokens or not merges or kind != "gpt2":
        log.warning("GGUF has no byte-level BPE tokenizer (tokenizer.ggml.model=%r); skipping "
                    "tokenizer files", kind)
        return None
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm": digits split one by one
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t,
                    ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
           "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
    special = {role: tokens[_field(reader, f"tokenizer.ggml.{key}")] for role, key in ids.items()
               if _field(reader, f"tokenizer.ggml.{key}") is not None}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            "model_max_length": _field(reader, "llama.context_length", 2048), **special}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = template
    return tok, tcfg


def open_gguf(gguf_path):
    """A GGUFReader; a missing file is a FileNotFoundError and anything the gguf library raises
    on a file it cannot parse (not GGUF, truncated) is a ValueError, both naming the file."""
    from gguf import GGUFReader
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: file not found; expected a GGUF file")
    try:
        return GGUFReader(gguf_path)
    except Exception as e:      # the library raises ValueError, IndexError, ... on bad bytes
        raise ValueError(
            f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def convert_gguf(gguf_path, out_dir):
    """Convert `gguf_path` into an HF Llama folder at `out_dir` (new or empty: a used folder would
    keep an earlier conversion's files); returns `out_dir`. Nothing is written unless the whole
    file reads, and the folder is written whole or not at all."""
    from safetensors.torch import save_file
    check_new_folder(out_dir, "the output folder")
    reader = open_gguf(gguf_path)
    try:
        cfg = read_config(reader)
        tensors = read_tensors(reader, cfg)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    built = build_tokenizer(reader)

    def fill(folder):
        atomic_write(os.path.join(folder, "model.safetensors"),
                     lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        write_json(os.path.join(folder, "config.json"), cfg)
        if built is not None:
            tok, tcfg = built
            atomic_write(os.path.join(folder, "tokenizer.json"), lambda p: tok.save(p))
            write_json(os.path.join(folder, "tokenizer_config.json"), tcfg)
            write_json(os.path.join(folder, "special_tokens_map.json"),
                       {k: v for k, v in tcfg.items()
                        if k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    replace_folder(out_dir, fill)                 # whole or not at all
    return out_dir


def main(argv):
    p = argparse.ArgumentParser(description="Convert a llama-architecture GGUF file into a "
                                "Hugging Face Llama folder.", epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="the .gguf file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(convert_gguf(args.gguf, args.out_dir))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:        # bad input: one line, exit status 1
        sys.exit(f"convert_gguf.py: {e}")
