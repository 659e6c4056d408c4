"""
Export a trained student VLM in nanoVLM's layout (config.json + model.safetensors), the folder
nanoVLM's own evaluation and VLMEvalKit read. The tokenizer files are copied beside it.

    python tools/export_nanovlm.py out/distilled-selective-full out/nanovlm-student

The student must number its image token as nanoVLM does (<|image|> = lm_base_vocab_size, the first
extra token; image-splitting tokens right after it): students built from a SmolLM2 teacher with
--image_splitting=true are; the tiny world's are not (its <image> is id 2), and are refused.

Pixels: train.py's students read [-1, 1] pixels, nanoVLM's checkpoints [0, 1]. The export folds
the difference into the patch embedding (x = 2 x' - 1: weight * 2, bias - the weight's sum over
its input), so the nanoVLM folder gives the student's outputs on nanoVLM's [0, 1] pixels.
OUT must be new or empty; it is written whole or not at all.
"""
import argparse
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VLM  # noqa: E402
from plumbing.files import check_new_folder, replace_folder, write_json  # noqa: E402
from scale.weights import (NANOVLM_EXTRA_TOKENS, _nanovlm_qkv_part, load_model_folder,  # noqa: E402
                     nanovlm_key_map, save_safetensors)


def nanovlm_config_dict(vlm: VLM):
    """The nanoVLM config.json fields for our VLM (names as in nanoVLM's VLMConfig)."""
    lm, vis = vlm.decoder.cfg, vlm.vision.cfg
    n_extra = lm.vocab_size - vlm.image_token_id
    if n_extra > len(NANOVLM_EXTRA_TOKENS):
        raise ValueError("nanoVLM numbers <|image|> lm_base_vocab_size (the first extra token); "
                         f"with image_token_id {vlm.image_token_id} and vocab_size {lm.vocab_size} "
                         f"that needs {n_extra} extra tokens, more than nanoVLM's "
                         f"{len(NANOVLM_EXTRA_TOKENS)}")
    n_views = len(NANOVLM_EXTRA_TOKENS) - 1
    if vlm.view_token_ids and vlm.view_token_ids != tuple(range(vlm.image_token_id + 1,
                                                                vlm.image_token_id + 1 + n_views)):
        raise ValueError("nanoVLM numbers the global-image and grid tokens right after <|image|>; "
                         "view_token_ids must be image_token_id + 1 .. image_token_id + 65")
    split = vlm.image_splitting
    extra = {} if split is None else {"max_img_size": split.max_side,
                                      "resize_to_max_side_len": split.resize_to_max_side}
    theta = int(lm.rope_theta) if float(lm.rope_theta).is_integer() else lm.rope_theta
    return {**extra, "vit_hidden_dim": vis.dim, "vit_inter_dim": vis.mlp_dim,
            "vit_patch_size": vis.patch_size,
            "vit_img_size": vis.image_size, "vit_n_heads": vis.n_heads, "vit_dropout": 0.0,
            "vit_n_blocks": vis.n_layers, "vit_ln_eps": vis.ln_eps, "vit_cls_flag": False,
            "lm_hidden_dim": lm.dim, "lm_inter_dim": lm.ffn_dim, "lm_rms_eps": lm.rms_eps,
            "lm_re_base": theta,
            "lm_max_position_embeddings": lm.max_positions,
            "lm_base_vocab_size": vlm.image_token_id,
            "extra_token_amount": n_extra, "lm_vocab_size": lm.vocab_size, "lm_n_heads": lm.n_heads,
            "lm_n_kv_heads": lm.n_kv_heads, "lm_dropout": 0.0, "lm_n_blocks": lm.n_layers,
            "lm_attn_scaling": 1.0, "lm_use_tokens": False, "lm_tie_weights": lm.tie_embeddings,
            "mp_pixel_shuffle_factor": vlm.projector.factor,
            "mp_image_token_length": vlm.n_image_tokens,
            "vlm_extra_tokens": dict(list(NANOVLM_EXTRA_TOKENS.items())[:n_extra])}


def zero_one_pixels(sd):
    """The patch embedding of a tower that reads x in [-1, 1], rewritten to read x' = (x + 1) / 2
    in [0, 1] with the same output: W x + b = (2 W) x' + (b - sum of W over its input)."""
    w, b = sd["vision.patch_embed.weight"], sd["vision.patch_embed.bias"]      # (D, 3, p, p), (D,)
    return {**sd, "vision.patch_embed.weight": 2 * w,
            "vision.patch_embed.bias": b - w.sum(dim=(1, 2, 3))}


def save_nanovlm(vlm: VLM, folder, copy_from=None):
    """Write our VLM as a new nanoVLM folder (config.json + model.safetensors, and the
    tokenizer files of `copy_from`; the folder whole or not at all), with the keys nanoVLM's
    save_model writes: concatenated qkv_proj, (1, N, D) position embedding, the RoPE inv_freq
    buffer, and for tied embeddings only decoder.head.weight. The image token must be the first
    extra token (image_token_id = lm_base_vocab_size), as in nanoVLM. An image-splitting student
    that reads [-1, 1] pixels is saved for nanoVLM's [0, 1] (zero_one_pixels)."""
    check_new_folder(folder, "the output folder")
    config = nanovlm_config_dict(vlm)
    sd = vlm.state_dict()
    if vlm.image_splitting is not None and vlm.image_splitting.pixels == "[-1,1]":
        sd = zero_one_pixels(sd)
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
    inv_freq = 1.0 / (vlm.decoder.cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    tensors["decoder.rotary_embd.inv_freq"] = inv_freq

    def fill(tmp):
        save_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
        write_json(os.path.join(tmp, "config.json"), config)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if copy_from and os.path.isfile(os.path.join(copy_from, name)):
                shutil.copy(os.path.join(copy_from, name), os.path.join(tmp, name))
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    replace_folder(folder, fill)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="a trained VLM folder (train.py's adapted/ or distilled-*/)")
    p.add_argument("out", help="the nanoVLM folder to write")
    args = p.parse_args(argv)
    try:
        check_new_folder(args.out, "the output folder")         # before any work
        vlm = load_model_folder(args.student)
        if not isinstance(vlm, VLM):
            raise ValueError(f"{args.student}: a text-only model; expected a VLM folder")
        save_nanovlm(vlm, args.out, copy_from=args.student)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export_nanovlm.py: {e}")
    print(f"wrote {args.out} (nanoVLM layout)")


if __name__ == "__main__":
    main(sys.argv[1:])
