"""
The inputs README's examples use, made by command instead of by hand.

    python tools/make_examples.py --out_dir=examples
    python tools/make_examples.py --out_dir=examples --tinyvision=.weights/smollm2-135m

Writes into --out_dir:
  colour.png  a render of the tiny world (seed 0): a white square, the image of README's
              `generate.py ... --prompt="<image> is coloured"` example;
  chelsea.png the cat photo of scikit-image's data folder (451x300), from the installed
              scikit-image or from --skimage_wheel (`pip download --no-deps scikit-image`);
              skipped, with a note on stderr, when neither is there;
  smollm2-135m-tinyvision/ (with --tinyvision=LM_FOLDER) the LM's decoder + a tiny RANDOM
              vision tower (64-px tiles, 16 image tokens per view) + nanoVLM image splitting
              with a 192-px long side, its tokenizer (grid tokens added) and chat template: a
              student folder tools/generate.py runs on real photos. The tower is untrained:
              this shows the code path, not image understanding.
"""
import argparse
import os
import shutil
import sys
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from scale import tiles  # noqa: E402
import world  # noqa: E402
from model import VisionConfig, grow_vocab, vlm_from_teacher  # noqa: E402
from scale.weights import load_hf_lm, save_tokenizer, save_vlm  # noqa: E402

TINY_TOWER = VisionConfig(image_size=64, patch_size=8, dim=64, n_layers=2, n_heads=4, mlp_dim=256)


def colour_png(path):
    """The tiny world's colour question for its white-square entity, freshly rendered."""
    e = next(e for e in world.build_world(0).entities if (e.colour, e.shape) == ("white", "square"))
    world.render(e.colour, e.shape, ((16, 16, 8),), 32).save(path)
    return f"{e.desc} (entity {e.name!r})"


def chelsea_png(path, wheel=None):
    """scikit-image's chelsea.png copied to path, or None when scikit-image is not at hand."""
    if wheel:
        with zipfile.ZipFile(wheel) as z, z.open("skimage/data/chelsea.png") as src, \
                open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return path
    try:
        import skimage
    except ImportError:
        return None
    shutil.copy(os.path.join(os.path.dirname(skimage.__file__), "data", "chelsea.png"), path)
    return path


def tinyvision_folder(lm_folder, out, seed=0):
    """A student VLM folder: the LM's decoder (vocabulary grown for <image> and the grid tokens)
    + TINY_TOWER (random) + a fresh projector, nanoVLM image splitting at a 192-px long side."""
    torch.manual_seed(seed)
    tok = data.load_tokenizer(os.path.join(lm_folder, "tokenizer.json"),
                              extra_tokens=tiles.VIEW_TOKENS)
    teacher = load_hf_lm(lm_folder)
    vlm = vlm_from_teacher(grow_vocab(teacher, tok.get_vocab_size()), TINY_TOWER,
                           tok.token_to_id(data.IMAGE_TOKEN), shuffle_factor=2,
                           view_token_ids=[tok.token_to_id(t) for t in tiles.VIEW_TOKENS],
                           image_splitting=tiles.ImageSplitting(max_side=192))
    save_vlm(vlm, out)
    config = os.path.join(lm_folder, "tokenizer_config.json")
    if os.path.isfile(config):                # the chat template; save_tokenizer keeps its keys
        shutil.copy(config, out)
    save_tokenizer(tok, out)
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="examples", help="folder to write into (default: examples)")
    p.add_argument("--skimage_wheel", default="",
                   help="a scikit-image wheel to take chelsea.png from (default: the installed "
                        "scikit-image)")
    p.add_argument("--tinyvision", default="", metavar="LM_FOLDER",
                   help="also build <out_dir>/smollm2-135m-tinyvision from this HF LM folder")
    args = p.parse_args(argv)
    if args.skimage_wheel and not os.path.isfile(args.skimage_wheel):
        sys.exit(f"make_examples.py: --skimage_wheel={args.skimage_wheel}: no such file")
    if args.tinyvision and not os.path.isfile(os.path.join(args.tinyvision, "tokenizer.json")):
        sys.exit(f"make_examples.py: --tinyvision={args.tinyvision}: expected a Hugging Face LM "
                 "folder with a tokenizer.json (tools/convert_gguf.py writes one)")
    os.makedirs(args.out_dir, exist_ok=True)
    what = colour_png(os.path.join(args.out_dir, "colour.png"))
    print(f"{os.path.join(args.out_dir, 'colour.png')}: {what}")
    if chelsea_png(os.path.join(args.out_dir, "chelsea.png"), args.skimage_wheel or None):
        print(f"{os.path.join(args.out_dir, 'chelsea.png')}: scikit-image's cat photo")
    else:
        print("make_examples.py: chelsea.png skipped: pip install scikit-image, or pass "
              "--skimage_wheel (pip download --no-deps scikit-image)", file=sys.stderr)
    if args.tinyvision:
        out = tinyvision_folder(args.tinyvision,
                                os.path.join(args.out_dir, "smollm2-135m-tinyvision"))
        print(f"{out}: the LM + a tiny random vision tower, image splitting at 192 px")


if __name__ == "__main__":
    main(sys.argv[1:])
