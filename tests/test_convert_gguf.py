"""convert_gguf.py: a tiny synthetic llama GGUF (written the way llama.cpp's converter writes one)
converts back to the exact HF tensors, config and a working byte-level BPE tokenizer."""
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="convert_gguf.py needs the optional `gguf` package")
from safetensors.torch import load_file  # noqa: E402

from convert_gguf import LAYER_MAP, convert_gguf, permute, unpermute  # noqa: E402

Q = gguf.GGMLQuantizationType
CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0,
           max_position_embeddings=256)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["l l", "e ll", "h ell", "hell o", "Ġ hello", "Ġ t", "h e", "Ġt he", "Ġ c", "a t",
          "Ġc at", "Ġ s", "Ġs at", "o n", "Ġ on", "Ġ m", "Ġm at", "i s", "Ġ is", "Ġ d",
          "o g", "Ġd og"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")


def llama_cpp_permute(weights, n_head, n_head_kv):
    """Verbatim copy of LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode character table (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"),
                                                          ord("¬")
                                                          + 1)) + list(
                                                              range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def small_vocab():
    """3 control tokens + 256 byte tokens + one token per merge, padded to CFG['vocab_size']."""
    tokens = SPECIALS + bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
    tokens += [f"<unused{i}>" for i in range(CFG["vocab_size"] - len(tokens))]
    types = [3] * len(SPECIALS) + [1] * (256 + len(MERGES))  # 3 = control (special), 1 = normal
    types += [4] * (CFG["vocab_size"] - len(types))  # 4 = user-defined
    return tokens, types


def random_hf_state_dict(tied):
    g = torch.Generator().manual_seed(1)
    h, f, v = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"]
    hd = h // CFG["num_attention_heads"]
    q, kv = CFG["num_attention_heads"] * hd, CFG["num_key_value_heads"] * hd
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": 1 + rnd(h)}
    for i in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + rnd(h),
                   p + "post_attention_layernorm.weight": 1 + rnd(h),
                   p + "self_attn.q_proj.weight": rnd(q, h),
                   p + "self_attn.k_proj.weight": rnd(kv, h),
                   p + "self_attn.v_proj.weight": rnd(kv, h),
                   p + "self_attn.o_proj.weight": rnd(h, q),
                   p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                   p + "mlp.down_proj.weight": rnd(h, f)})
    if not tied:
        sd["lm_head.weight"] = rnd(v, h)
    return sd


def write_gguf(path, sd, qtype=None, drop=(), extra=(), tokenizer=True):
    """Write `sd` (HF layout) as a llama GGUF the way llama.cpp's converter does (q/k permuted)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(CFG["num_hidden_layers"])
    w.add_context_length(CFG["max_position_embeddings"])
    w.add_embedding_length(CFG["hidden_size"])
    w.add_feed_forward_length(CFG["intermediate_size"])
    w.add_head_count(CFG["num_attention_heads"])
    w.add_head_count_kv(CFG["num_key_value_heads"])
    w.add_layer_norm_rms_eps(CFG["rms_norm_eps"])
    w.add_rope_freq_base(CFG["rope_theta"])
    w.add_vocab_size(CFG["vocab_size"])
    if tokenizer:
        tokens, types = small_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(TEMPLATE)
    to_gguf = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(CFG["num_hidden_layers"]):
        to_gguf.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for g,
                        hf in LAYER_MAP.items()})
    for hf_name, t in sd.items():
        name, a = to_gguf[hf_name], t.numpy()
        if name.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, CFG["num_attention_heads"], CFG["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, CFG["num_attention_heads"], CFG["num_key_value_heads"])
        if name in drop:
            continue
        if qtype is not None and a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    for name, a in extra:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def convert(tmp_path, **kw):
    tied = kw.pop("tied", True)
    sd = random_hf_state_dict(tied)
    out = convert_gguf(write_gguf(str(tmp_path / "m.gguf"), sd, **kw), str(tmp_path / "hf"))
    return sd, out


# ---------------------------------------------------------------------------------------------

def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(4 * 16, 8).numpy()
    for n in (4, 2, 1):
        assert np.array_equal(permute(w, n), llama_cpp_permute(w, n, None))
        assert np.array_equal(unpermute(permute(w, n), n), w)
        assert np.array_equal(permute(unpermute(w, n), n), w)
    assert not np.array_equal(permute(w, 4), w)
    # torch works too
    assert np.array_equal(unpermute(torch.from_numpy(permute(w, 4)), 4), torch.from_numpy(w))


def test_permutation_maps_hf_rope_to_interleaved_rope():
    """Why the permutation exists: HF rotates halves (x_i, x_{i+d/2}); llama.cpp rotates adjacent
    pairs (x_2i, x_2i+1). Permuted rows + interleaved RoPE == HF rows + half RoPE, up to
    unpermute."""
    d, pos = 16, 5.0
    ang = pos * 100000.0 ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    cos, sin = ang.cos(), ang.sin()
    wq, x = torch.randn(d, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    q = wq @ x
    a, b = q[: d // 2], q[d // 2:]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin])
    qg = torch.from_numpy(permute(wq.numpy(), 1)) @ x
    e, o = qg[0::2], qg[1::2]
    gg = torch.stack([e * cos - o * sin, o * cos + e * sin], dim=1).reshape(d)
    torch.testing.assert_close(torch.from_numpy(unpermute(gg[:, None].numpy(), 1))[:, 0], hf)


@pytest.mark.parametrize("tied", [True, False])
def test_roundtrip_bit_exact(tmp_path, tied):
    sd, out = convert(tmp_path, tied=tied)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    cfg = json.load(open(os.path.join(out, "config.json")))
    for k, v in CFG.items():
        assert cfg[k] == v, k
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is tied and cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("qtype,levels", [(Q.Q8_0, 127), (Q.Q4_1, 15)])
def test_quantized_within_quantisation_error(tmp_path, qtype, levels):
    sd, out = convert(tmp_path, tied=False, qtype=qtype)
    got = load_file(os.path.join(out, "model.safetensors"))
    for k, v in sd.items():
        if v.ndim == 1:
            assert torch.equal(got[k], v), k  # norms stay F32
            continue
        bound = 2 * v.abs().max() / levels  # block scale = range / levels; error <= scale / 2
        err = (got[k] - v).abs().max()
        assert 0 < err <= bound, (k, err, bound)


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_logits_match(tmp_path, tied):
    transformers = pytest.importorskip("transformers", reason="parity check needs transformers")
    sd, out = convert(tmp_path, tied=tied)
    ref = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**CFG, tie_word_embeddings=tied)).eval()
    full = dict(sd) if not tied else {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    ref.load_state_dict(full, strict=False)
    missing = set(ref.state_dict()) - set(full)
    assert not missing, missing
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, CFG["vocab_size"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    _, out = convert(tmp_path)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    tokens, _ = small_vocab()
    for i, s in enumerate(SPECIALS):
        assert tok.encode(s).ids == [i]
    text = "<|im_start|>user\nthe cat sat on the mat, hello dog 2024!<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    # merges are applied
    assert tokens.index("Ġcat") in enc.ids and tokens.index("Ġhello") in enc.ids
    assert sum(t in "2024" for t in enc.tokens) == 4  # "smollm" pre-tokenizer: one digit per token
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    tcfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert (tcfg["bos_token"], tcfg["eos_token"],
            tcfg["chat_template"]) == ("<|im_start|>", "<|im_end|>", TEMPLATE)
    smap = json.load(open(os.path.join(out, "special_tokens_map.json")))
    assert smap == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}


def test_no_tokenizer_metadata_skips_with_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        _, out = convert(tmp_path, tokenizer=False)
    assert "tokenizer" in caplog.text
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_missing_and_unknown_tensors_one_clear_error(tmp_path):
    sd = random_hf_state_dict(tied=True)
    path = write_gguf(str(tmp_path / "bad.gguf"), sd, drop={"blk.1.ffn_up.weight"},
                      extra=[("blk.0.attn_q.bias", np.zeros(64, np.float32))])
    with pytest.raises(ValueError) as e:
        convert_gguf(path, str(tmp_path / "hf"))
    assert "missing ['blk.1.ffn_up.weight']" in str(e.value)
    assert "unknown/unused ['blk.0.attn_q.bias']" in str(e.value)
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
