"""
The checks train.py runs before any work starts, so that bad input ends with one line naming the
flag, file or folder and what was expected -- never a deep traceback or a half-written out_dir:
every flag of a TrainConfig, the out_dir (another run's checkpoints, a missing earlier stage, a
resumed log), the tiny world's contexts against a packed row, and a given student's tokens.
"""
import math
import os

import data
import distill
import kvshare
from scale import tiles
import world
from scale import stream
from plumbing.loop import Checkpoints, read_log

STAGES = ("pretrain", "adapt", "distill", "all")


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
    for key in ("pretrain_lr", "align_lr", "adapt_lr", "adapt_vision_lr", "distill_lr",
                "temperature", "grad_clip", "alpha", "weight_decay"):
        low = 0 if key in ("alpha", "weight_decay") else None
        v = getattr(cfg, key)
        if not (math.isfinite(v) and (v >= 0 if low == 0 else v > 0)):
            raise ValueError(f"--{key} must be a finite number {'>=' if low == 0 else '>'} 0, "
                             f"got {v}")
    if cfg.pack and cfg.max_len < 1:
        raise ValueError("--pack=true needs --max_len >= 1: the tokens of one packed row")
    if not 0 <= cfg.warmup_frac < 1:
        raise ValueError(f"--warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
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


def check_out_dir(cfg):
    """Before any work (train.run holds the out_dir's lock): a fresh run must not start in a
    folder holding another run's checkpoints of the same stage (it would mix two runs), a later
    stage needs the models of the earlier ones, and a resumed run's log.jsonl must read (its
    torn last line, if any, is dropped)."""
    for name in stages_to_train(cfg):
        found = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last).paths()
        if found and not cfg.resume:
            raise ValueError(
                f"--out_dir={cfg.out_dir} already holds checkpoints of stage {name} "
                f"({os.path.basename(found[-1])}, ...). Choose: --resume=true to continue that "
                "run; --stage=distill --variant=NAME (with the policy/scope you want) for another "
                "distilled variant beside it; or another --out_dir for a fresh run")
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


def check_pack_fits(cfg, examples, tok):
    """--pack=true on the tiny world: every context of stages 2-3 must leave a --max_len row room
    for one response token (data.collate's rule), checked before stage 1 trains. The image
    tokens are those of a fresh student (--student_path / --vision_path: found when stage 2
    starts). Streamed --data_path examples are cut or dropped to fit (stream.fit_to_max_len)."""
    if not cfg.pack or isinstance(examples, stream.RealData) or cfg.student_path \
            or cfg.vision_path or cfg.image_splitting:
        return
    n_image_tokens = (cfg.image_size // cfg.patch_size // cfg.shuffle_factor) ** 2
    longest = max(len(data.encode_example(ex, tok, n_image_tokens)[0])
                  for source in examples.sources.values() for ex in source)
    if longest >= cfg.max_len:
        raise ValueError(f"--pack=true --max_len={cfg.max_len}: the longest context is {longest} "
                         f"tokens (with {n_image_tokens} image tokens); expected --max_len >= "
                         f"{longest + 1} (room for one response token)")


def check_student_tokens(vlm, tok, folder):
    """A given student must read the run's tokenizer: a VLM, its <image> (and grid) ids those of
    the tokenizer, a vocabulary that covers it, and, if the folder has its own tokenizer, the
    same token for every shared id (kvshare.check_shared_vocab). A SmolVLM / Idefics3 student's
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
        kvshare.check_shared_vocab(tok, data.load_tokenizer(own))


def check_image_size(vlm, cfg):
    """--image_size is the side of every view collate and the data loader cut: a given student's
    vision tower must take exactly that."""
    if vlm.vision.cfg.image_size != cfg.image_size:
        raise ValueError(f"--student_path={cfg.student_path}: its vision tower takes "
                         f"{vlm.vision.cfg.image_size} px views; pass "
                         f"--image_size={vlm.vision.cfg.image_size} (got {cfg.image_size})")
