"""
Export a trained student VLM in the SmolVLM / Idefics3 layout of transformers
(SmolVLMForConditionalGeneration / Idefics3ForConditionalGeneration), the folder lmms-eval and
VLMEvalKit evaluate directly:

    python tools/export_smolvlm.py out/distilled-selective-full out/smolvlm-student \\
        --like=SmolVLM-256M-Instruct

Writes config.json, model.safetensors (weights.smolvlm_key_map: the explicit key map, a tied head
stored once), preprocessor_config.json and processor_config.json (the student's
tiles.Idefics3Splitting and image_seq_len), and the tokenizer files. --like: the SmolVLM folder
the student came from; its tokenizer, chat template, special-token and generation files are
copied (train.py's folders keep only tokenizer.json and the eos/pad roles), the other keys of its
processor_config.json kept, and its model_type kept. Without it the
tokenizer files come from the student's folder and model_type is --model_type (default smolvlm).

The student must have an Idefics3 image layout (loaded from a SmolVLM folder): a nanoVLM-style or
tiny-world student is refused, since its image tokens would not mean what SmolVLM's processor
writes.
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VLM  # noqa: E402
from plumbing.files import read_json, write_json  # noqa: E402
from scale.tiles import Idefics3Splitting  # noqa: E402
from scale.weights import (SMOLVLM_MODEL_TYPES, lm_config_to_hf, load_model_folder,  # noqa: E402
                     save_safetensors, smolvlm_key_map, vision_config_to_hf)

# Files of a SmolVLM folder that describe the tokenizer and the chat format (copied as they are).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "vocab.json",
                   "merges.txt", "video_preprocessor_config.json", "generation_config.json")
PROCESSOR_CLASS = {"smolvlm": "SmolVLMProcessor", "idefics3": "Idefics3Processor"}


def smolvlm_config_dict(vlm: VLM, model_type="smolvlm"):
    """config.json for SmolVLMConfig / Idefics3Config: the text part is save_hf_lm's Llama config,
    the vision part SigLIP's fields; the top-level tie_word_embeddings decides the tying."""
    if model_type not in SMOLVLM_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}; expected one of {SMOLVLM_MODEL_TYPES}")
    lm = vlm.decoder.cfg
    if lm.qkv_bias:
        raise ValueError("SmolVLM's text model is a Llama: no q/k/v biases (qkv_bias must be "
                         "False)")
    text = {k: v for k, v in lm_config_to_hf(lm).items() if k not in ("architectures",
                                                                      "torch_dtype")}
    vision = {**vision_config_to_hf(vlm.vision.cfg), "model_type": f"{model_type}_vision"}
    arch = {"smolvlm": "SmolVLMForConditionalGeneration",
            "idefics3": "Idefics3ForConditionalGeneration"}[model_type]
    return {"architectures": [arch], "model_type": model_type,
            "image_token_id": vlm.image_token_id, "scale_factor": vlm.projector.factor,
            "tie_word_embeddings": lm.tie_embeddings, "text_config": text,
            "vision_config": vision, "torch_dtype": "float32"}


def processor_settings(vlm: VLM, model_type="smolvlm"):
    """(preprocessor_config.json, processor_config.json) for the student's Idefics3Splitting."""
    split = vlm.image_splitting
    if not isinstance(split, Idefics3Splitting):
        raise ValueError("the student has no Idefics3 image layout (image_splitting is "
                         f"{type(split).__name__}); only a student loaded from a SmolVLM / "
                         "Idefics3 folder exports in this layout")
    processor_class = PROCESSOR_CLASS[model_type]
    image = {"image_processor_type": "Idefics3ImageProcessor", "processor_class": processor_class,
             "do_convert_rgb": True, "do_resize": True,
             "size": {"longest_edge": split.longest_edge},
             "resample": split.resample, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
             "do_pad": True, "do_image_splitting": split.split,
             "max_image_size": {"longest_edge": split.tile}}
    return image, {"image_seq_len": vlm.n_image_tokens, "processor_class": processor_class}


def save_smolvlm(vlm: VLM, folder, model_type="smolvlm"):
    """Weights, config.json and the processor settings (not the tokenizer files)."""
    image, processor = processor_settings(vlm, model_type)
    config = smolvlm_config_dict(vlm, model_type)
    sd = vlm.state_dict()
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, "model.safetensors"),
                     {fk: sd[ok] for ok, fk in smolvlm_key_map(vlm).items()})
    write_json(os.path.join(folder, "config.json"), config)
    write_json(os.path.join(folder, "preprocessor_config.json"), image)
    write_json(os.path.join(folder, "processor_config.json"), processor)


def export(student, out, like=None, model_type=None):
    """Write OUT from the student folder (see the module docstring). Returns the model_type."""
    if os.path.abspath(student) == os.path.abspath(out):
        raise ValueError("OUT must differ from the student folder")
    vlm = load_model_folder(student)
    if not isinstance(vlm, VLM):
        raise ValueError(f"{student}: a text-only model; expected a VLM folder")
    if model_type is None:
        src = read_json(os.path.join(like, "config.json")) if like else {}
        model_type = src.get("model_type", "smolvlm") if isinstance(src, dict) else "smolvlm"
    tok_src = like or student
    if not os.path.isfile(os.path.join(tok_src, "tokenizer.json")):
        raise FileNotFoundError(f"{tok_src}: no tokenizer.json to copy")
    save_smolvlm(vlm, out, model_type)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tok_src, name)):
            shutil.copy(os.path.join(tok_src, name), os.path.join(out, name))
    original = os.path.join(like, "processor_config.json") if like else ""
    if os.path.isfile(original):            # keep its other keys (a chat template, ...)
        merged = read_json(original)
        if isinstance(merged, dict):
            ours = read_json(os.path.join(out, "processor_config.json"))
            if "image_processor" in merged:
                merged["image_processor"] = read_json(os.path.join(out,
                                                                   "preprocessor_config.json"))
            write_json(os.path.join(out, "processor_config.json"), {**merged, **ours})
    return model_type


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("student", help="a trained VLM folder (train.py's distilled-*/ or adapted/) "
                   "whose student came from a SmolVLM folder")
    p.add_argument("out", help="the SmolVLM folder to write")
    p.add_argument("--like", default=None, help="the SmolVLM folder the student came from "
                   "(tokenizer, chat template and model_type are taken from it)")
    p.add_argument("--model_type", default=None, choices=SMOLVLM_MODEL_TYPES,
                   help="smolvlm or idefics3 (default: --like's, else smolvlm)")
    args = p.parse_args(argv)
    try:
        model_type = export(args.student, args.out, args.like, args.model_type)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export_smolvlm.py: {e}")
    print(f"wrote {args.out} ({model_type} layout, for transformers' "
          f"{PROCESSOR_CLASS[model_type].replace('Processor', 'ForConditionalGeneration')})")


if __name__ == "__main__":
    main(sys.argv[1:])
