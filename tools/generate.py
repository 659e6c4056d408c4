"""Talk to a trained model: generate an answer, streamed token by token.

    python tools/generate.py --model=out/distilled-selective-full --image=a.png \\
        --prompt="<image> eats"
    python tools/generate.py --model=nanoVLM-460M-8k/ \\
        --tokenizer=SmolLM2-360M-Instruct/tokenizer.json \\
        --image=a.png,b.png --prompt="What differs?" --teacher=SmolLM2-360M-Instruct/

--model: one of our VLM folders (weights.load_vlm), a nanoVLM folder (weights.load_nanovlm; its
  image splitting and [0, 1] pixels come with it) or a Hugging Face LM folder (weights.load_hf_lm;
  text only). Its tokenizer.json is used unless --tokenizer names one (a nanoVLM folder has none).
--image: comma-separated image files; each "<image>" in the prompt is one image (all at the start of
  the prompt if it names none). Images are prepared as the model folder says (one view, or
  nanoVLM's global view + tiles).
--prompt: wrapped in the chat template of the folder's tokenizer_config.json (or a nanoVLM
  config's lm_chat_template) when there is one; --raw=true feeds it as is.
--max_new_tokens (64), --temperature (0 = greedy), --top_k (sampling among the k best), --seed.
--device: auto (CUDA when there is one), cpu or cuda. On CUDA the model runs in bf16 autocast with
  the fused attention kernels (scale.cuda) and generates on a preallocated cache (scale.decode); on
  the CPU it runs the reference (model.Decoder.generate).
--teacher: a frozen text-only teacher (HF LM folder). After the student's answer, the teacher's own
  answer through the KV handoff: the student prefills the context, the teacher takes the student's
  K/V of every context column but the last as its cache, re-runs the last context token and then
  generates greedily with its own cache (teacher_generate): what the teacher would say
  reading this student's image (and prompt) KV.
Bad input (missing folder or image, an image for a text-only model, a teacher that cannot read the
student's KV, ...) -> one line on stderr, exit 2; the teacher is checked before the student answers.
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import chat  # noqa: E402
import kvshare  # noqa: E402
from plumbing.checks import check_teacher_tokenizer, check_teacher_vocab  # noqa: E402
from plumbing.files import read_json  # noqa: E402
from plumbing.devices import Devices  # noqa: E402
from scale import cuda, decode, tiles, weights  # noqa: E402
from model import VLM  # noqa: E402


class BadInput(Exception):
    pass


def load_model(folder):
    """(model, kind, chat template or None); kind in {"vlm", "nanovlm", "lm"}."""
    if not os.path.isdir(folder):
        raise BadInput(f"model folder not found: {folder}")
    # the one loader that picks the layout (and refuses a config that is none of them)
    model = weights.load_model_folder(folder)
    cfg = read_json(os.path.join(folder, "config.json"))
    nanovlm = "vit_hidden_dim" in cfg
    template = (cfg.get("lm_chat_template") if nanovlm else None) or chat.load_chat_template(folder)
    kind = ("nanovlm" if nanovlm else "vlm") if isinstance(model, VLM) else "lm"
    return model, kind, template


def load_tok(path, model):
    if not os.path.isfile(path):
        raise BadInput(f"tokenizer not found: {path} (pass --tokenizer=PATH/tokenizer.json)")
    split = isinstance(model, VLM) and bool(model.view_token_ids)
    tok = data.load_tokenizer(path, extra_tokens=tiles.VIEW_TOKENS if split else ())
    if isinstance(model, VLM):
        ids = {data.IMAGE_TOKEN: model.image_token_id,
               **dict(zip(tiles.VIEW_TOKENS, model.view_token_ids))}
        wrong = [f"{t} is {tok.token_to_id(t)} in the tokenizer, {i} in the model" for t,
                 i in ids.items() if tok.token_to_id(t) != i]
        if wrong:
            raise BadInput(f"{path}: tokenizer and model disagree: {wrong[0]}")
    return tok


def read_images(spec):
    images = []
    for path in [p for p in (spec or "").split(",") if p]:
        if not os.path.isfile(path):
            raise BadInput(f"image file not found: {path}")
        try:
            with warnings.catch_warnings():      # PIL only warns between 1x and 2x the limit
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            raise BadInput(f"--image: cannot read {path} ({type(e).__name__}: {e}); expected an "
                           "image file of at most "
                           f"{Image.MAX_IMAGE_PIXELS} pixels") from None
    return images


class Stream:
    """Prints tokens as they come: decodes all ids so far and prints the new suffix (byte-level BPE
    pieces of one character can span tokens)."""
    def __init__(self, tok, eos_id, out=None):
        self.tok, self.eos_id, self.out, self.ids, self.shown, self.done = (tok, eos_id, out, [],
                                                                            "", False)

    def __call__(self, t):
        t = int(t[0])
        self.done = self.done or t == self.eos_id
        if self.done:
            return
        self.ids.append(t)
        out = self.out or sys.stdout
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            out.write(text[len(self.shown):])
            out.flush()
            self.shown = text


@torch.no_grad()
def teacher_generate(teacher, student_kv, input_ids, attention_mask, student_only_ids,
                     **generate_kw):
    """The KV handoff at inference (scope "full", as kvshare.teacher_continue): the student has
    prefilled a LEFT-padded context (input_ids, attention_mask: (B, P)) and returned its per-layer
    K/V; the frozen teacher takes
    the K/V of columns 0..P-2 as its cache, re-runs the last context token itself (as in
    teacher_continue) and then generates its own answer with its own cache (Decoder.generate;
    greedy unless generate_kw says otherwise). Returns the teacher's new tokens (B, N)."""
    P = input_ids.shape[1]  # input_ids, attention_mask: (B, P)
    if kvshare.student_only_mask(input_ids[:, P - 1], student_only_ids).any():
        raise ValueError("teacher_generate: a context ends with an image (student-only) token; the "
                         "prompt after the image must have at least one text token")
    check_teacher_vocab(
        teacher, input_ids[:, P - 1:].masked_fill(~attention_mask[:, P - 1:].bool(), 0))
    # past: per layer (K, V), each (B, n_kv_heads, P-1, head_dim)
    past = [(k[:, :, :P - 1], v[:, :, :P - 1]) for k, v in student_kv]
    # input_ids (B, 1): the last context token; attention_mask (B, P)
    return teacher.generate(input_ids=input_ids[:, P - 1:], attention_mask=attention_mask,
                            past_kv=past, **generate_kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="our VLM folder, a nanoVLM folder or a HF LM "
                    "folder")
    ap.add_argument("--prompt", required=True, help="the user text; <image> marks each image")
    ap.add_argument("--image", default="", help="comma-separated image files (default: none)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the model "
                    "folder's; a nanoVLM folder has none)")
    ap.add_argument("--teacher", default=None, help="a HF LM folder: also print the frozen "
                    "teacher's answer through the KV handoff")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="default: 64")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top_k", type=int, default=None, help="sample among the k most likely "
                    "tokens (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto (default): CUDA when available")
    ap.add_argument("--raw", default="false", choices=["true", "false"],
                    help="true: feed the prompt as is, without the chat template")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (BadInput, ValueError, FileNotFoundError, ImportError) as e:
        # one line, but all of it: check_compatible lists each difference on a line of its own
        print("generate.py: "
              f"{' '.join(line.strip() for line in str(e).splitlines() if line.strip())}",
              file=sys.stderr)
        return 2


def run(args):
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_k is not None
                                                           and args.top_k < 1):
        raise BadInput("--max_new_tokens and --top_k must be >= 1, --temperature >= 0")
    if not args.prompt.strip() and not args.image:
        raise BadInput("--prompt is empty and there is no --image: nothing to answer; expected "
                       "--prompt=TEXT")
    torch.manual_seed(args.seed)
    images = read_images(args.image)                  # before the model loads
    devices = Devices(args.device)
    model, kind, template = load_model(args.model)
    model = on_device(model.eval(), devices)
    tok = load_tok(args.tokenizer or os.path.join(args.model, "tokenizer.json"), model)
    is_vlm = isinstance(model, VLM)
    if images and not is_vlm:
        raise BadInput(f"{args.model} is a text-only model; it cannot take --image")
    prompt = args.prompt
    n_tags = prompt.count(data.IMAGE_TOKEN)
    if n_tags and n_tags != len(images):
        raise BadInput(f"the prompt has {n_tags} {data.IMAGE_TOKEN} tag(s) for {len(images)} "
                       "image(s)")
    prompt = data.IMAGE_TOKEN * (len(images) - n_tags) + prompt        # images inside the user turn
    if template is not None and args.raw == "false":
        prompt = chat.chat_prompt(prompt, template)
    example = {"image": images or None, "prompt": prompt, "response": "", "source": "generate"}
    if is_vlm:
        batch = tiles.collate([example], tok, model.n_image_tokens, model.vision.cfg.image_size,
                              model.image_splitting)
    else:
        batch = data.collate([example], tok, 0, 0)
    P = batch["context_len"]
    batch = devices.to_device(batch)
    ids, mask = batch["input_ids"][:, :P], batch["attention_mask"][:, :P]     # the context alone
    eos, pad = data.special_id(tok, data.EOS_TOKEN), data.special_id(tok, data.PAD_TOKEN)
    gen = torch.Generator(devices.device).manual_seed(args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              eos_id=eos, pad_id=pad, generator=gen)
    # bad teacher: before any work
    teacher = on_device(load_teacher(args.teacher, model, ids, tok), devices) if args.teacher \
        else None
    views = ("" if not images
             else f", {batch['images'].shape[0]} image view(s), grids {batch['grids'][0]}")
    print(f"[{kind} {args.model}: {P} context tokens{views}]", file=sys.stderr)
    with devices.autocast():
        if is_vlm:
            model.generate(ids, batch["images"], attention_mask=mask, on_token=Stream(tok, eos),
                           **kw)
        else:
            model.generate(input_ids=ids, attention_mask=mask, on_token=Stream(tok, eos), **kw)
        print()
        if teacher is not None:
            teacher_via_handoff(args, teacher, model, tok, batch, ids, mask)
    return 0


def on_device(model, devices):
    """The model on the run's device; on CUDA with its GPU forms, chosen here once: the fused
    attention kernels (scale.cuda) and generation on a preallocated cache (scale.decode)."""
    if devices.cuda:
        decode.use_static_cache(cuda.use_cuda_attention(model.to(devices.device)))
    return model


def load_teacher(folder, student, ids, tok):
    """The frozen teacher, checked before the student answers: its tokenizer the student's on the
    ids they share (checks.check_teacher_tokenizer, as train.py and eval.py), same attention
    shapes and RoPE, and a context that ends with a text token (the teacher re-runs it itself)."""
    if not os.path.isdir(folder):
        raise BadInput(f"teacher folder not found: {folder}")
    check_teacher_tokenizer(folder, tok)
    teacher = kvshare.freeze(weights.load_hf_lm(folder))
    decoder = student.decoder if isinstance(student, VLM) else student
    kvshare.check_compatible(teacher.cfg, decoder.cfg)
    only = student.student_only_ids if isinstance(student, VLM) else ()
    if int(ids[0, -1]) in only or int(ids[0, -1]) >= teacher.cfg.vocab_size:
        raise BadInput("with --teacher the prompt must end with a text token the teacher knows (it "
                       "re-runs the last context token itself; an image token there has no teacher "
                       "embedding)")
    return teacher


def teacher_via_handoff(args, teacher, student, tok, batch, ids, mask):
    t_path = os.path.join(args.teacher, "tokenizer.json")
    t_tok = data.load_tokenizer(t_path) if os.path.isfile(t_path) else tok
    with torch.no_grad():
        if isinstance(student, VLM):
            _, kv = student(ids, batch["images"], attention_mask=mask, use_cache=True,
                            logits_start=-1)
        else:
            _, kv = student(input_ids=ids, attention_mask=mask, use_cache=True, logits_start=-1)
    only = student.student_only_ids if isinstance(student, VLM) else ()
    eos = data.special_id(t_tok, data.EOS_TOKEN)
    eos = eos if eos < teacher.cfg.vocab_size else None
    print("[teacher via the KV handoff]", flush=True)
    teacher_generate(teacher, kv, ids, mask, only, max_new_tokens=args.max_new_tokens,
                             eos_id=eos, pad_id=0, on_token=Stream(t_tok, eos))
    print()


if __name__ == "__main__":
    sys.exit(main())
