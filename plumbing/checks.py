"""
The checks train.py runs before any work starts, so that bad input ends with one line naming the
flag, file or folder and what was expected -- never a deep traceback or a half-written out_dir:
every flag of a TrainConfig, the out_dir (another run's checkpoints, a missing earlier stage, a
resumed log), the tiny world's contexts against a packed row, and a given student's tokens.
"""
import math
import os

import torch
from tokenizers import Tokenizer

import data
import distill
import kvshare
from scale import tiles
import world
from scale import stream
from plumbing.devices import ranks, resume_command
from plumbing.files import read_json
from plumbing.loop import Checkpoints, read_log
from scale.weights import image_layout, vision_config_from_hf

STAGES = ("pretrain", "adapt", "distill", "all")
FLOAT32_MAX = torch.finfo(torch.float32).max
ADAM_BETA1 = 0.9                     # train.train_stage's AdamW: its first step is lr / (1 - 0.9)
LEARNING_RATES = ("pretrain_lr", "align_lr", "adapt_lr", "adapt_vision_lr", "distill_lr")


def check_teacher_vocab(teacher, text_ids):
    """Every id the teacher embeds must lie in its vocabulary (on the host: no device assert)."""
    top, V = int(text_ids.max()), teacher.cfg.vocab_size
    if top >= V:
        raise ValueError(f"token id {top} is outside the teacher's vocabulary ({V}); text tokens "
                         "must lie in the shared prefix (ids the teacher must not embed, like "
                         "image-splitting tokens, belong in student_only_ids)")


def variant_name(cfg):
    return cfg.variant or f"{cfg.policy}-{cfg.scope}"


def check_config(cfg):
    """Every flag is checked here, before any work starts; each error names the flag."""
    choices = {"stage": STAGES, "policy": distill.POLICIES, "scope": kvshare.SCOPES,
               "kd": distill.DIVERGENCES, "device": ("auto", "cpu", "cuda"),
               "tower": ("learned", "oracle")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r}; expected one of {list(ok)}")
    at_least = {"batch_size": 1, "grad_accum": 1, "seq_len": 1, "log_every": 1, "ckpt_every": 1,
                "keep_last": 1, "pretrain_steps": 1, "align_steps": 0, "adapt_steps": 1,
                "distill_steps": 1, "kd_chunk": 0, "max_bad_steps": 0, "num_workers": 0,
                "max_len": 0, "vocab_size": 256 + len(data.SPECIAL_TOKENS), "lm_dim": 1,
                "lm_layers": 1, "lm_heads": 1, "lm_kv_heads": 1, "lm_ffn": 1, "vision_dim": 1,
                "vision_layers": 1, "vision_heads": 1, "patch_size": 1, "image_size": 1,
                "shuffle_factor": 1, "image_max_side": 1}
    for key, low in at_least.items():
        if getattr(cfg, key) < low:
            raise ValueError(f"--{key} must be >= {low}, got {getattr(cfg, key)}")
    for key in LEARNING_RATES + ("temperature", "grad_clip", "alpha", "weight_decay",
                                 "max_loss_ratio", "max_grad_ratio"):
        low = 0 if key in ("alpha", "weight_decay", "max_loss_ratio", "max_grad_ratio") else None
        v = getattr(cfg, key)
        if not (math.isfinite(v) and (v >= 0 if low == 0 else v > 0)):
            raise ValueError(f"--{key} must be a finite number {'>=' if low == 0 else '>'} 0, "
                             f"got {v}")
        if v > FLOAT32_MAX:                  # a float32 tensor op with it fails at step 1
            raise ValueError(f"--{key}={v:g} overflows float32 (at most {FLOAT32_MAX:.4g}); "
                             "expected a smaller number")
    for key in LEARNING_RATES:
        lr = getattr(cfg, key)
        if max(lr / (1 - ADAM_BETA1), lr * cfg.weight_decay) > FLOAT32_MAX:
            raise ValueError(f"--{key}={lr:g} overflows float32 in AdamW's update (its first step "
                             f"is lr / (1 - beta1) = {lr / (1 - ADAM_BETA1):g}, the decay lr x "
                             f"--weight_decay = {lr * cfg.weight_decay:g}; float32 holds at most "
                             f"{FLOAT32_MAX:.4g}); expected a smaller learning rate")
    if 0 < cfg.max_loss_ratio <= 1 or 0 < cfg.max_grad_ratio <= 1:
        raise ValueError(f"--max_loss_ratio={cfg.max_loss_ratio:g} / --max_grad_ratio="
                         f"{cfg.max_grad_ratio:g}: expected 0 (off) or a ratio > 1")
    if cfg.pack and cfg.max_len < 1:
        raise ValueError("--pack=true needs --max_len >= 1: the tokens of one packed row")
    if not 0 <= cfg.warmup_frac < 1:
        raise ValueError(f"--warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
    if cfg.fused_loss and (cfg.kd != "fkl" or cfg.temperature != 1 or cfg.policy == "none"):
        raise ValueError("--fused_loss=true computes forward KL at temperature 1 with a teacher: "
                         "it needs --kd=fkl --temperature=1 and a --policy other than none")
    if cfg.kd == "jsd" and not 0 < cfg.jsd_beta < 1:
        raise ValueError(f"--jsd_beta must be in (0, 1) for --kd=jsd, got {cfg.jsd_beta}")
    if cfg.tower == "oracle" and (cfg.data_path or cfg.teacher_path or cfg.student_path):
        raise ValueError("--tower=oracle is a tiny-world control: no --data_path, --teacher_path "
                         "or --student_path")
    n_looks = len(world.COLOURS) * len(world.SHAPES)
    if not 4 <= cfg.n_entities <= n_looks:
        raise ValueError(f"--n_entities must be in [4, {n_looks}] (colour x shape), got "
                         f"{cfg.n_entities}")
    for whole, part in (("lm_dim", "lm_heads"), ("lm_heads", "lm_kv_heads"),
                        ("vision_dim", "vision_heads"), ("image_size", "patch_size")):
        if getattr(cfg, whole) % getattr(cfg, part):
            raise ValueError(f"--{whole}={getattr(cfg, whole)} must be divisible by --{part}="
                             f"{getattr(cfg, part)}")
    if (cfg.lm_dim // cfg.lm_heads) % 2:
        raise ValueError(f"--lm_dim / --lm_heads = {cfg.lm_dim // cfg.lm_heads} must be even (RoPE "
                         "rotates pairs)")
    if (cfg.image_size // cfg.patch_size) % cfg.shuffle_factor:
        raise ValueError(f"--shuffle_factor={cfg.shuffle_factor} must divide the patch grid "
                         f"{cfg.image_size // cfg.patch_size} (--image_size / --patch_size)")
    needs_teacher = {"--preset=paper": cfg.preset == "paper",
                     "--image_splitting": cfg.image_splitting, "--data_path": bool(cfg.data_path)}
    for flag, needed in needs_teacher.items():
        if needed and not cfg.teacher_path:
            raise ValueError(f"{flag} needs --teacher_path=FOLDER (a HF SmolLM2/Llama folder): "
                             "the tiny world's tokenizer has no chat or grid tokens")
    if cfg.image_splitting:
        try:
            tiles.ImageSplitting(max_side=cfg.image_max_side).check_tile(cfg.image_size)
        except ValueError as e:
            raise ValueError(f"--image_max_side / --image_size: {e}") from None
    if cfg.teacher_path and cfg.stage == "pretrain":
        raise ValueError("--stage=pretrain trains a teacher; with --teacher_path the teacher is "
                         "given")
    for key in ("teacher_path", "student_path", "vision_path", "image_root"):
        path = getattr(cfg, key)
        if path and not os.path.isdir(path):
            what = "a file; expected a folder" if os.path.exists(path) else "no such file or folder"
            raise ValueError(f"--{key}={path}: {what}")
    paths = cfg.data_path.split(",") if cfg.data_path else []
    if "" in paths:
        raise ValueError(f"--data_path={cfg.data_path}: an empty file name (a stray comma?); "
                         "expected a comma list of .jsonl / .parquet files")
    for path in paths:
        if not path.endswith((".jsonl", ".parquet")):
            raise ValueError(f"--data_path: {path} is not a .jsonl or .parquet file")
        if not os.path.isfile(path):
            raise ValueError(f"--data_path: {path}: no such file")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out_dir={cfg.out_dir} is a file; expected a folder")
    where = os.path.abspath(cfg.out_dir)       # the out_dir, or the folder the run creates it in
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise ValueError(f"--out_dir={cfg.out_dir}: {where} is a file; expected a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ValueError(f"--out_dir={cfg.out_dir}: cannot write in {where} (read-only or no "
                         "permission); expected a writable folder")


def stages_to_train(cfg):
    """The checkpoint folder names of the stages this run trains."""
    names = []
    if cfg.stage in ("pretrain", "all") and not cfg.teacher_path:
        names.append("pretrain")
    if cfg.stage in ("adapt", "all"):
        names += ["align", "adapt"]
    if cfg.stage in ("distill", "all"):
        names.append(f"distill-{variant_name(cfg)}")
    return names


def check_out_dir(cfg, run_keys=()):
    """Before any work (train.run holds the out_dir's lock): a fresh run must not start in a
    folder holding another run's checkpoints of the same stage (it would mix two runs), a
    resumed one must continue them (check_resume), a later stage needs the models of the earlier
    ones, and a resumed run's log.jsonl must read (its torn last line, if any, is dropped)."""
    for name in stages_to_train(cfg):
        found = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last).paths()
        if found and not cfg.resume:
            raise ValueError(
                f"--out_dir={cfg.out_dir} already holds checkpoints of stage {name} "
                f"({os.path.basename(found[-1])}, ...). Choose: --resume=true to continue that "
                "run; --stage=distill --variant=NAME (with the policy/scope you want) for another "
                "distilled variant beside it; or another --out_dir for a fresh run")
    if cfg.resume:
        check_resume(cfg, run_keys)
    log = os.path.join(cfg.out_dir, "log.jsonl")
    if cfg.resume and os.path.isfile(log):
        read_log(log)                      # a bad line is an error; a torn last line is dropped
    # with --teacher_path the teacher is given and a student can start from it
    needed = {"adapt": ["teacher"], "distill": ["teacher", "adapted"]}.get(cfg.stage, [])
    for folder in [] if cfg.teacher_path else needed:
        if not os.path.isdir(os.path.join(cfg.out_dir, folder)):
            first = "pretrain" if folder == "teacher" else "adapt"
            raise ValueError(f"--stage={cfg.stage} needs {os.path.join(cfg.out_dir, folder)}, "
                             f"which stage {first} writes: run --stage={first} (or --stage=all) "
                             f"with --out_dir={cfg.out_dir} first")


def check_resume(cfg, run_keys):
    """--resume=true, before anything in out_dir is written (run_config.json included): the
    newest checkpoint of each stage this run trains must come from its config (but run_keys:
    Checkpoints.load) and from as many processes (a step's batch is --batch_size per process)."""
    world = ranks()[1]
    for name in stages_to_train(cfg):
        ckpts = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last, run_keys)
        if not ckpts.paths():
            continue
        path = ckpts.paths()[-1]
        was = ckpts.load(path, cfg, mmap=True).get("world_size")   # None: an older checkpoint
        if was is not None and was != world:
            raise ValueError(f"--out_dir={cfg.out_dir}: checkpoint {path} was written by {was} "
                             f"process(es), this run has {world}: the batch of a step is "
                             "--batch_size per process, so another count would train another run. "
                             f"Resume with: {resume_command(cfg.out_dir, processes=was)}")


def check_resume_changes(saved, cfg, given, may_change, path):
    """A resume that starts from the run's saved config (`saved`, read from `path`;
    train.get_config) may change only the keys may_change: the given flags that change any other
    key are refused, named, before any work."""
    changed = [k for k in given if k not in may_change and getattr(cfg, k) != getattr(saved, k)]
    if changed:
        raise ValueError(
            f"{', '.join(f'--{k}={getattr(cfg, k)}' for k in changed)}: --resume=true continues "
            f"the run in {cfg.out_dir} with its own config ({path}: "
            f"{', '.join(f'{k}={getattr(saved, k)!r}' for k in changed)}), and a resume may "
            f"change only {', '.join(sorted(may_change))}; for another config start a fresh run "
            "in another --out_dir (or, for stage 3, --stage=distill --variant=NAME beside it, "
            "without --resume)")


def check_teacher_tokenizer(teacher_folder, tok, flag="--teacher"):
    """A teacher paired with a student (train.py, eval.py, tools/generate.py) must read the
    student's ids as the same tokens wherever their vocabularies overlap: the handoff feeds the
    student's context ids to the teacher and KD compares those logits. The teacher folder's
    tokenizer.json against the student's `tok` (check_shared_vocab, below); a folder without
    one is not checked."""
    path = os.path.join(teacher_folder, "tokenizer.json")
    if not os.path.isfile(path):
        return
    try:                                     # as it is (data.load_tokenizer would add our roles)
        teacher_tok = Tokenizer.from_file(path)
    except Exception as e:                   # the tokenizers library raises its own Exception type
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
    try:
        check_shared_vocab(teacher_tok, tok)
    except ValueError as e:
        where = f"{flag}={teacher_folder}" if flag.startswith("--") else f"{flag} {teacher_folder}"
        raise ValueError(f"{where}: its tokenizer is not the model's: {e}; expected the teacher "
                         "the model was trained with") from None


def student_image_layout(cfg):
    """(image tokens per view, image splitting or None) of the student stage 2 will build, read
    from the configs alone: --student_path (our VLM or nanoVLM folder), --vision_path's tower,
    else the flags; None where the configs do not tell (a SmolVLM student: its processor's
    layout)."""
    split = tiles.ImageSplitting(max_side=cfg.image_max_side) if cfg.image_splitting else None
    if cfg.student_path:
        return image_layout(cfg.student_path)
    if cfg.vision_path:
        vision = vision_config_from_hf(read_json(os.path.join(cfg.vision_path, "config.json")))
        return vision.n_patches // cfg.shuffle_factor ** 2, split
    return (cfg.image_size // cfg.patch_size // cfg.shuffle_factor) ** 2, split


def context_ids(example, tok, n_image_tokens, split, tile):
    """An example's context ids as stage 2 lays them out (split images: their grid tokens)."""
    if split is None:
        return data.encode_example(example, tok, n_image_tokens)[0]
    grids = [tiles.tile_grid(*tiles.split_size(im.height, im.width, tile, split.max_side,
                                               split.resize_to_max_side), tile)
             for im in data.example_images(example)]
    return tiles.encode_example(example, tok, n_image_tokens, grids)[0]


def check_pack_fits(cfg, examples, tok):
    """--pack=true on the tiny world: every context of stages 2-3 must leave a --max_len row room
    for one response token (data.collate's rule), checked before stage 1 trains. The image
    tokens are those of the student stage 2 builds (student_image_layout: --student_path,
    --vision_path, --image_splitting; not checked for a SmolVLM student). Streamed --data_path
    examples are cut or dropped to fit (stream.fit_to_max_len)."""
    layout = None if not cfg.pack or isinstance(examples, stream.RealData) \
        else student_image_layout(cfg)
    if layout is None:
        return
    n_image_tokens, split = layout
    longest = max(len(context_ids(ex, tok, n_image_tokens, split, cfg.image_size))
                  for source in examples.sources.values() for ex in source)
    if longest >= cfg.max_len:
        raise ValueError(f"--pack=true --max_len={cfg.max_len}: the longest context is {longest} "
                         f"tokens (with {n_image_tokens} image tokens"
                         f"{' per view, images split' if split else ''}); expected --max_len >= "
                         f"{longest + 1} (room for one response token)")


def check_student_tokens(vlm, tok, folder):
    """A given student must read the run's tokenizer: a VLM, its <image> (and grid) ids those of
    the tokenizer, a vocabulary that covers it, and, if the folder has its own tokenizer, the
    same token for every shared id (check_shared_vocab, below). A SmolVLM / Idefics3 student's
    layout tokens come from its own tokenizer (weights.load_smolvlm), the run's."""
    image_id = tok.token_to_id(data.IMAGE_TOKEN)
    if getattr(vlm, "image_token_id", None) != image_id:
        raise ValueError(f"{folder}: not a VLM with the tokenizer's {data.IMAGE_TOKEN} id "
                         f"{image_id}")
    if vlm.decoder.cfg.vocab_size < tok.get_vocab_size():
        raise ValueError(f"{folder}: the student's vocabulary ({vlm.decoder.cfg.vocab_size}) is "
                         f"smaller than the tokenizer's ({tok.get_vocab_size()})")
    view_ids = [tok.token_to_id(t) for t in tiles.VIEW_TOKENS]
    idefics3 = isinstance(getattr(vlm, "image_splitting", None), tiles.Idefics3Splitting)
    if vlm.view_token_ids and not idefics3 and list(vlm.view_token_ids) != view_ids:
        raise ValueError(f"{folder}: the student's image-splitting token ids differ from the "
                         "tokenizer's (load it with --image_splitting=true)")
    own = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(own):
        check_shared_vocab(tok, data.load_tokenizer(own))


def check_image_size(vlm, cfg):
    """--image_size is the side of every view collate and the data loader cut: a given student's
    vision tower must take exactly that."""
    if vlm.vision.cfg.image_size != cfg.image_size:
        raise ValueError(f"--student_path={cfg.student_path}: its vision tower takes "
                         f"{vlm.vision.cfg.image_size} px views; pass "
                         f"--image_size={vlm.vision.cfg.image_size} (got {cfg.image_size})")


# ----------------------------------------------------------------------------------------
# The handoff's data and vocabularies (kvshare.py): checked on the host, never in the step

def check_shared_vocab(teacher_tokenizer, student_tokenizer):
    """KD compares the first min(V_teacher, V_student) logits; both tokenizers must map those
    ids to the same tokens (tokenizers.Tokenizer objects)."""
    n = min(teacher_tokenizer.get_vocab_size(), student_tokenizer.get_vocab_size())
    bad = [i for i in range(n)
           if teacher_tokenizer.id_to_token(i) != student_tokenizer.id_to_token(i)]
    if bad:
        examples = ", ".join(f"id {i}: teacher {teacher_tokenizer.id_to_token(i)!r} vs student "
                             f"{student_tokenizer.id_to_token(i)!r}" for i in bad[:5])
        raise ValueError(f"tokenizers disagree on {len(bad)} of the {n} shared ids ({examples})")
    return n


def check_handoff_batch(batch, student_only_ids, teacher_vocab_size, scope="full"):
    """ValueError unless the teacher can continue this padded batch (host): the ids it embeds are in
    its vocabulary; "full": contexts end with text (it runs it); "image": images before text."""
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["context_len"]
    text_ids, is_image = kvshare.teacher_ids(ids, mask, student_only_ids)
    if int(text_ids.max()) >= teacher_vocab_size:
        raise ValueError(f"token id {int(text_ids.max())} is outside the teacher's vocabulary "
                         f"({teacher_vocab_size}); text tokens must lie in the shared prefix (ids "
                         "it must not embed, e.g. image splitting's, belong in student_only_ids)")
    if scope == "full" and is_image[:, P - 1].any():
        raise ValueError("scope 'full': a context ends with an image (student-only) token; the "
                         "prompt after the image must have at least one text token")
    text = mask[:, :P].bool() & ~is_image[:, :P]
    if scope == "image" and ((text.long().cumsum(-1) > 0) & is_image[:, :P]).any():
        raise ValueError("scope 'image' needs the image tokens before the prompt text")
