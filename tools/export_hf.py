"""
Export a model folder as a plain Hugging Face Llama (or Qwen2) folder that
transformers.AutoModelForCausalLM / AutoTokenizer and lm-eval's `--model hf` load:

  python tools/export_hf.py SRC_FOLDER OUT_FOLDER [--drop_image_row]

SRC_FOLDER: our VLM folder (train.py's adapted / distilled-*: weights.load_vlm; its decoder is
exported, the vision tower and projector are dropped) or a Hugging Face LM folder (the teacher;
weights.load_hf_lm). It must hold the tokenizer.json the model was trained with.

OUT_FOLDER must be new or empty (a used one would keep an earlier export's files, e.g. a
special_tokens_map.json naming other ids) and is written whole or not at all. It gets
config.json + model.safetensors (weights.save_hf_lm: the explicit key map, tied head stored
once) + tokenizer.json + tokenizer_config.json (+ generation_config.json).
config.json gains bos/eos/pad_token_id; tokenizer_config.json names tokenizer_class
PreTrainedTokenizerFast, the eos/pad tokens of data.load_tokenizer's role mapping (so
data.load_tokenizer on the export maps them again) and add_bos_token false (our models are
trained without a BOS, so lm-eval must not prepend one). Keys of a source tokenizer_config.json
(e.g. SmolLM2's chat_template) are kept.

The <image> row. A student built on a real LM has one more vocabulary row than its teacher:
data.load_tokenizer appends "<image>" (SmolLM2: id 49152) and the decoder's embedding (and
untied head) cover it. By default the export keeps it: the HF model is exactly our decoder
(same logits, same softmax), vocab_size = teacher + 1, and tokenizer.json carries <image> as an
added special token. --drop_image_row cuts the trailing rows that are ids data.load_tokenizer
ADDED to the base tokenizer (<image>, and <pad>/<eos> where it had to add them; train.py's
folders already store them in tokenizer.json), writes tokenizer.json without them, and sets
vocab_size back: the export then has the
teacher's exact shape and tokenizer. Its softmax no longer includes the dropped rows, so its
log-probabilities differ from the student's by log(1 - p(dropped ids)) per token (tiny once the
student has learnt never to emit <image> in text, but not zero). Only trailing ids can be
dropped; anything else is an error.
"""
import argparse
import json
import os
import sys
from dataclasses import replace

from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data                                     # noqa: E402
from model import VLM, Decoder  # noqa: E402
from plumbing.files import check_new_folder, read_json, replace_folder, write_json    # noqa: E402
from scale.weights import load_model_folder, save_hf_lm  # noqa: E402


def load_decoder(folder):
    """(decoder, kind): our VLM folder -> its decoder; a Hugging Face LM folder -> the decoder."""
    model = load_model_folder(folder)
    return (model.decoder, "vlm") if isinstance(model, VLM) else (model, "hf")


def trailing_specials(tok_path):
    """(ids, tokenizer.json dict without them, tok): the trailing ids of data.load_tokenizer's
    view of tok_path that are our special tokens (<image>, <pad>, <eos>) beyond the BPE
    vocabulary, whether load_tokenizer appends them now or save_tokenizer already wrote them."""
    with open(tok_path, encoding="utf-8") as f:
        j = json.load(f)
    tok = data.load_tokenizer(tok_path)
    ids, i = [], tok.get_vocab_size(with_added_tokens=True) - 1
    while i >= 0 and tok.id_to_token(i) in data.SPECIAL_TOKENS:
        ids.insert(0, i)
        i -= 1
    keep = ids[0] if ids else i + 1
    if any(v >= keep for v in (j.get("model", {}).get("vocab") or {}).values()):
        ids = []                                      # part of the BPE vocabulary: not ours to drop
    else:
        j["added_tokens"] = [t for t in j.get("added_tokens", []) if t["id"] < keep]
    return ids, j, tok


def drop_rows(decoder, keep):
    """A Decoder with only the first `keep` vocabulary rows (embedding and, if untied, head)."""
    cfg = replace(decoder.cfg, vocab_size=keep)
    small = Decoder(cfg)
    sd = {k: (v[:keep] if k in ("embed.weight", "lm_head.weight") else v) for k,
          v in decoder.state_dict().items()}
    small.load_state_dict(sd)
    return small


def export(src, out, drop_image_row=False):
    """Write OUT (see the module docstring). Returns a dict describing what was written."""
    tok_path = os.path.join(src, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{tok_path}: the source folder has no tokenizer.json")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("OUT_FOLDER must differ from SRC_FOLDER")
    check_new_folder(out, "OUT_FOLDER")                   # before any work
    decoder, kind = load_decoder(src)
    extra, trimmed, tok = trailing_specials(tok_path)
    V = decoder.cfg.vocab_size
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok > V:
        raise ValueError(f"{src}: tokenizer has {n_tok} ids (with the ones load_tokenizer adds) "
                         f"but the model only {V} rows")
    if drop_image_row and (not extra or extra[-1] != V - 1):
        raise ValueError(f"{src}: --drop_image_row: no appended <image>/<pad>/<eos> ids at the "
                         f"end of the vocabulary (vocab_size {V}; the tokenizer's own tokens "
                         "play those roles or sit inside its vocabulary, as in the tiny "
                         "world): nothing to drop")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    info = {}
    # written whole or not at all: a temp folder beside OUT, renamed into place
    replace_folder(out, lambda tmp: info.update(write_export(src, tmp, decoder, extra, trimmed,
                                                             tok, drop_image_row)))
    return {"kind": kind, **info, "out": out}


def write_export(src, out, decoder, extra, trimmed, tok, drop_image_row):
    """The files of the export into the (new) folder `out`; see the module docstring."""
    if drop_image_row:
        decoder = drop_rows(decoder, extra[0])
        write_json(os.path.join(out, "tokenizer.json"), trimmed)   # the source file minus those ids
        roles = tok.role_tokens
    else:
        tok.save(os.path.join(out, "tokenizer.json"))
        roles = tok.role_tokens
    save_hf_lm(decoder, out)
    eos = roles.get(data.EOS_TOKEN, data.EOS_TOKEN)
    pad = roles.get(data.PAD_TOKEN, data.PAD_TOKEN)
    written = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    missing = [t for t in (eos, pad) if written.token_to_id(t) is None]
    if missing:               # --drop_image_row dropped an appended <eos>/<pad>: name no such token
        eos, pad = (None if eos in missing else eos), (None if pad in missing else pad)
    src_cfg = os.path.join(src, "tokenizer_config.json")
    tcfg = read_json(src_cfg) if os.path.isfile(src_cfg) else {}
    tcfg.pop("added_tokens_decoder", None)      # ids may have changed; tokenizer.json is the truth
    tcfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                 "add_eos_token": False,
                 "clean_up_tokenization_spaces": False,
                 "model_max_length": decoder.cfg.max_positions})
    name = lambda v: v.get("content") if isinstance(v, dict) else v   # str or serialised AddedToken
    bos = name(tcfg.get("bos_token"))
    if bos is not None and written.token_to_id(bos) is None:
        tcfg.pop("bos_token")
        bos = None
    for key, val in (("eos_token", eos), ("pad_token", pad)):
        if val is None:
            tcfg.pop(key, None)
        else:
            tcfg[key] = val
    write_json(os.path.join(out, "tokenizer_config.json"), tcfg)
    cfg = read_json(os.path.join(out, "config.json"))
    ids = {"eos_token_id": written.token_to_id(eos) if eos else None,
           "pad_token_id": written.token_to_id(pad) if pad else None}
    ids["bos_token_id"] = written.token_to_id(bos) if bos else None
    cfg.update({k: v for k, v in ids.items() if v is not None})
    write_json(os.path.join(out, "config.json"), cfg)
    write_json(os.path.join(out, "generation_config.json"),
               {k: v for k, v in ids.items() if v is not None})
    return {"vocab_size": decoder.cfg.vocab_size, "dropped_rows": extra if drop_image_row else [],
            "eos_token": eos, "pad_token": pad}


def main(argv):
    p = argparse.ArgumentParser(description="Write a model folder's decoder as a Hugging Face "
                                "Llama folder (for lm-eval).", epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="our VLM / LM folder (train.py's teacher/, adapted/, "
                   "distilled-*/)")
    p.add_argument("out", help="the Hugging Face folder to write")
    p.add_argument("--drop_image_row", action="store_true",
                   help="drop the <image> row(s) the VLM added to the embedding")
    args = p.parse_args(argv)
    pos, flags = [args.model, args.out], ["--drop_image_row"] * args.drop_image_row
    info = export(pos[0], pos[1], drop_image_row="--drop_image_row" in flags)
    print(f"{pos[0]} ({info['kind']}) -> {info['out']}: Hugging Face folder, vocab_size "
          f"{info['vocab_size']}"
          + (f", dropped rows {info['dropped_rows']}" if info["dropped_rows"] else "")
          + f"; eos {info['eos_token']!r}, pad {info['pad_token']!r}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export_hf.py: {e}")
