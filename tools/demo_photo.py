"""
Real pixels, real teacher: the KV-handoff code path on photographs and SmolLM2 weights.

  python tools/demo_photo.py --lm=LM_FOLDER [--photos=a.png,b.jpg | --photos=scikit_image-*.whl]
                             [--image_size=64]

The student is the real decoder + a tiny RANDOM vision tower: this shows the code path on
real pixels and a real teacher, not image understanding.
"""
import argparse
import os
import resource
import sys
import tempfile
import time
import zipfile

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import chat  # noqa: E402
import kvshare  # noqa: E402
from model import VisionConfig, vlm_from_teacher  # noqa: E402
from scale.weights import load_hf_lm  # noqa: E402


def skimage_photos(names=("chelsea.png", "coffee.png"), wheel=None, out_dir=None):
    """Paths of real photographs shipped in scikit-image (skimage/data): from the installed
    package, or extracted from a downloaded wheel (pip download --no-deps scikit-image) into
    out_dir."""
    if wheel is None:
        try:
            import skimage
        except ImportError:
            raise ImportError("no photos: pip install scikit-image, or pass a scikit-image wheel "
                              "(pip download --no-deps scikit-image), or image paths") from None
        return [os.path.join(os.path.dirname(skimage.__file__), "data", n) for n in names]
    out_dir = out_dir or tempfile.mkdtemp(prefix="photos-")
    with zipfile.ZipFile(wheel) as z:
        return [z.extract(f"skimage/data/{n}", out_dir) for n in names]


def _top(logits, tok, k):
    p = F.softmax(logits.float(), -1)
    v, i = p.topk(k)
    return ", ".join(f"{tok.decode([j], skip_special_tokens=False)!r} {q:.2f}" for q,
                     j in zip(v.tolist(), i.tolist()))


@torch.no_grad()
def demo_real_photo(lm_folder, image_paths, image_size=64, question="What is in this picture?",
                    response=" This is a picture of", top_k=5, seed=0):
    """Student VLM = the real decoder (lm_folder, e.g. SmolLM2-135M-Instruct) + a tiny RANDOM
    vision tower + a fresh projector; real photos (resized to image_size, squashed to a
    square) in the model's chat format; then the KV handoff to the frozen real teacher (scope
    "full") and, for comparison, the text-only teacher (scope "none"). Untrained vision ->
    the teacher reads noise image KV: this shows the code path, not image understanding.
    Returns a dict of the printed numbers."""
    torch.manual_seed(seed)
    t0 = time.time()
    teacher = kvshare.freeze(load_hf_lm(lm_folder))
    tok = data.load_tokenizer(os.path.join(lm_folder, "tokenizer.json"))
    image_id = tok.token_to_id(data.IMAGE_TOKEN)
    student = vlm_from_teacher(teacher, VisionConfig(image_size=image_size),
                               image_id).eval()
    kvshare.check_compatible(teacher.cfg, student.decoder.cfg)
    t_load = time.time() - t0
    prompt = chat.chat_prompt(data.IMAGE_TOKEN + "\n" + question,
                              chat.load_chat_template(lm_folder))
    examples = []
    for path in image_paths:
        with Image.open(path) as im:
            examples.append({"image": im.convert("RGB"), "prompt": prompt, "response": response,
                             "source": "demo"})
    batch = data.collate(examples, tok, student.n_image_tokens, image_size)
    t1 = time.time()
    student_logits, kv = kvshare.student_prefill(student, batch)
    t_student = time.time() - t1
    t1 = time.time()
    full = kvshare.teacher_continue(teacher, kv, batch, image_id)
    t_teacher = time.time() - t1
    none = kvshare.teacher_on_text(teacher, kv, batch, image_id)
    V = teacher.cfg.vocab_size
    last = int(batch["response_mask"][0].sum()) - 1     # predicts the token after the response text
    diff = (student_logits[..., :V] - full).abs()[batch["response_mask"]]
    out = {"images": len(image_paths), "image_tokens": student.n_image_tokens,
           "context_len": batch["context_len"],
           "image_token_id": image_id, "student_vocab": student.decoder.cfg.vocab_size,
           "teacher_vocab": V,
           # the student's decoder IS the teacher's here, so the handoff must reproduce its logits
           "max_abs_student_vs_teacher_full": float(diff.max()),
           "kl_full_vs_none_first": float(F.kl_div(F.log_softmax(none[:, 0], -1),
                                                   F.log_softmax(full[:, 0], -1),
                                                   log_target=True, reduction="batchmean")),
           "load_s": t_load, "student_prefill_s": t_student, "teacher_continue_s": t_teacher,
           "total_s": time.time() - t0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"prompt ({batch['context_len']} tokens, {student.n_image_tokens} image tokens of id "
          f"{image_id}; student vocab {out['student_vocab']} = teacher {V} + "
          f"1):\n{prompt!r}\nresponse: {response!r}")
    for b, path in enumerate(image_paths):
        print(f"\n{os.path.basename(path)} "
              f"({examples[b]['image'].size[0]}x{examples[b]['image'].size[1]} -> "
              f"{image_size}x{image_size})")
        print(f"  teacher via student KV, first answer token : {_top(full[b, 0], tok, top_k)}")
        print(f"  teacher via student KV, after {response!r}: {_top(full[b, last], tok, top_k)}")
        print(f"  text-only teacher (scope none), first token: {_top(none[b, 0], tok, top_k)}")
    print("\nmax |student logits - teacher(full) logits| = "
          f"{out['max_abs_student_vs_teacher_full']:.2e} (same decoder weights: the handoff "
          "reproduces the student); KL(full || none) at the first answer token = "
          f"{out['kl_full_vs_none_first']:.3f} nats (the noise image KV moves the teacher)")
    print(f"time: load {t_load:.1f}s, student prefill {t_student:.2f}s, teacher continue "
          f"{t_teacher:.2f}s, total {out['total_s']:.1f}s; peak RSS {out['peak_rss_mb']:.0f} MB")
    return out




def main(argv):
    ap = argparse.ArgumentParser(description="Real photos -> student VLM -> KV handoff -> teacher.")
    ap.add_argument("--lm", help="a Hugging Face LM folder, e.g. SmolLM2-135M-Instruct")
    ap.add_argument("--photos", help="a.png,b.jpg or a scikit-image wheel (default: skimage)")
    ap.add_argument("--image_size", type=int, default=64)
    opts = vars(ap.parse_args(argv))
    if not opts["lm"]:
        raise ValueError("expected --lm=FOLDER (a Hugging Face LM folder, e.g. SmolLM2-135M)")
    photos = opts["photos"]
    if photos and photos.endswith(".whl"):
        paths = skimage_photos(wheel=photos)
    else:
        paths = photos.split(",") if photos else skimage_photos()
    return demo_real_photo(opts["lm"], paths, image_size=opts["image_size"])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, ImportError) as e:   # bad input: one line
        sys.exit(f"tools/demo_photo.py: {e}")
