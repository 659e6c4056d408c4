"""
Does the KV handoff matter? One seed of the tiny world, measured at three points (after ALIGN,
after ADAPT, after DISTILL) and under three interventions.

  python tools/handoff_study.py [--seed=0] [--out_dir=out/handoff] [--only=NAME]
                                [--pipelines=NAME,NAME] [TRAIN FLAGS]
  python tools/handoff_study.py --help        # every flag, its default and what it does

--only=NAME trains one pipeline and stops; --pipelines= picks which are trained and measured
(default: all, in this order). NAMEs: base,
"align x3" (--align_steps x 3), "adapt lr /3" (--adapt_lr / 3), "scope image" (distill the base
adapted model with --scope=image). Every other flag goes to train.py (e.g. --preset=smoke,
--distill_steps=100). Runs use --resume=true in <out_dir>/seed<N>/<pipeline>, so a re-run (or a
run after `--only=` runs in parallel processes) only measures. Writes <out_dir>/handoff.md and
handoff.json.

What each measurement means (percentages; knowledge VQA = "<image> eats" -> " apples .", which
needs the image AND the text-only knowledge; chance about 10):
- kvqa: the student answering knowledge VQA itself (eval.vqa_accuracy, greedy exact match).
- handoff full / image: the frozen teacher answering knowledge VQA from the student's KV
  (eval.teacher_handoff_accuracy): scope full = image + prompt KV from the student; scope image
  = only the image-column KV, the teacher computes its own prompt KV. After ALIGN the student's
  decoder IS the teacher's, so handoff full == kvqa exactly: whatever the teacher misses there,
  alignment missed, not drift.
- seen / unseen: the same two on entities whose knowledge VQA is / is not in the training
  mix (align and distill train on seen entities' knowledge VQA; unseen ones need transfer).
- K drift / V drift: on text-only inputs (the language benchmark's contexts + correct answers),
  per decoder layer, ||KV_student - KV_teacher|| / ||KV_teacher|| over real tokens, both decoders
  running the same ids (K after RoPE). 0 for the aligned model; the table shows the layer mean,
  handoff.md also the per-layer values.
- img->desc: does the image KV look like the words for the same entity? For each entity, the
  student's layer-mean V over its image columns (a fresh single-object render) against the
  teacher's mean V over "the <colour> <shape>", each centred over entities; top-1 cosine
  retrieval among all entities
  (chance 1/n_entities), the best layer.
- T (seen / unseen), top1: eval.transfer on knowledge VQA: 1 - mean KL(p_oracle || p_handoff) /
  mean KL(p_oracle || p_blind), the teacher's next-token distributions with the image's words
  in its place (oracle), from the student's KV (handoff, scope full), without the image
  (blind); top1 = how often the handoff's argmax is the oracle's. 1: the teacher sees the
  image as if it read its words; 0: no better than no image.
- language / vision: eval.evaluate_models (4-way MC on held-out text facts; vision VQA).
"""
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval as evaluation  # noqa: E402
import kvshare  # noqa: E402
from tools import oracle  # noqa: E402
import toolflags  # noqa: E402
import train  # noqa: E402
from plumbing.loop import Checkpoints, TrainingError  # noqa: E402
from plumbing.files import write_json, write_text  # noqa: E402

PIPELINES = ("base", "align x3", "adapt lr /3", "scope image")
FOLDERS = {"base": "base", "align x3": "align-x3", "adapt lr /3": "adapt-lr-div3",
           "scope image": "base"}               # scope image distills the base adapted model


@torch.no_grad()
def kv_drift(student, teacher, batches):
    """Per decoder layer, ||K_s - K_t|| / ||K_t|| and the same for V, over the real (non-pad)
    tokens of text-only `batches` (eval.batches rows). `student` is a VLM or a Decoder.
    Returns {"k": [per layer], "v": [per layer]}."""
    decoder = getattr(student, "decoder", student)
    decoder.eval()
    n = teacher.cfg.n_layers
    num = {"k": torch.zeros(n), "v": torch.zeros(n)}          # sum of squared differences
    den = {"k": torch.zeros(n), "v": torch.zeros(n)}          # sum of squared teacher values
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        last = ids.shape[1] - 1                                  # logits are not needed
        _, kv_s = decoder(ids, attention_mask=mask, use_cache=True, logits_start=last)
        _, kv_t = teacher(ids, attention_mask=mask, use_cache=True, logits_start=last)
        w = mask[:, None, :, None].float()                       # (B, 1, T, 1)
        for layer, (s, t) in enumerate(zip(kv_s, kv_t)):
            for j, key in enumerate("kv"):
                num[key][layer] += float(((s[j].float() - t[j].float()) ** 2 * w).sum())
                den[key][layer] += float((t[j].float() ** 2 * w).sum())
    return {key: (num[key] / den[key].clamp(min=1e-30)).sqrt().tolist() for key in "kv"}


def text_batches(world, tok, teacher, image_size):
    """The language benchmark's contexts + correct answers, text only."""
    rows = [{"image": None, "prompt": it["context"], "response": it["options"][it["answer"]],
             "source": "mc"} for it in world.language_bench]
    return list(evaluation.batches(rows, tok, teacher, image_size, 64, "cpu"))


@torch.no_grad()
def image_desc_match(student, teacher, world, tok, image_size):
    """Top-1 retrieval, per layer, of each entity's description ("the red circle", teacher V)
    from the student's V at that entity's image columns (cosine of token-mean V, each side
    centred over entities)."""
    student.eval()
    captions = [it for it in world.vision_bench if it["source"] == "caption"]  # entity order
    assert len(captions) == len(world.entities)
    b = next(evaluation.batches(captions, tok, student, image_size, len(captions), "cpu"))
    _, kv = kvshare.student_prefill(student, b)
    img = (b["input_ids"] == student.image_token_id).float()[:, None, :, None]
    words = [{"image": None, "prompt": e.desc, "response": " .", "source": "desc"}
             for e in world.entities]
    w = next(evaluation.batches(words, tok, teacher, image_size, len(words), "cpu"))
    _, kv_t = teacher(w["input_ids"], attention_mask=w["attention_mask"], use_cache=True)
    ctx = w["attention_mask"].clone()
    ctx[:, w["context_len"]:] = 0                                      # the description only
    ctx = ctx.float()[:, None, :, None]
    hits = []
    for (_, v_s), (_, v_t) in zip(kv, kv_t):
        a = ((v_s * img).sum(2) / img.sum(2)).flatten(1)                # (N, nkv * hd)
        d = ((v_t * ctx).sum(2) / ctx.sum(2)).flatten(1)
        a, d = a - a.mean(0), d - d.mean(0)          # centred: what tells entities apart
        sim = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(d, dim=1).T
        hits.append(float((sim.argmax(1) == torch.arange(len(a))).float().mean()))
    return hits


def aligned_model(cfg, teacher, tok, world):
    """The student right after ALIGN: train.py's initial student (with --tower=oracle, the
    oracle's) + the align stage's last checkpoint (its decoder is exactly the teacher's)."""
    ckpts = Checkpoints(os.path.join(cfg.out_dir, "ckpt", "align"), cfg.keep_last,
                        train.RESUME_MAY_CHANGE)
    state = ckpts.load(ckpts.paths()[-1], cfg)
    assert state["step"] == cfg.align_steps, (state["step"], cfg.align_steps)
    vlm = train.initial_student(cfg, teacher, tok)
    if cfg.tower == "oracle":
        vlm = oracle.OracleVLM.wrap(vlm, teacher, world, tok)
    vlm.load_state_dict(state["model"])
    return vlm.eval()


def pipeline_argv(name, seed, out_dir, train_argv):
    """train.py flags of one pipeline (its folder; the intervention's overrides)."""
    cfg = train.get_config(train_argv)
    folder = os.path.join(out_dir, f"seed{seed}", FOLDERS[name])
    extra = {"align x3": [f"--align_steps={3 * cfg.align_steps}"],
             "adapt lr /3": [f"--adapt_lr={cfg.adapt_lr / 3}"],
             "scope image": ["--scope=image"]}.get(name, [])
    return toolflags.resuming(train_argv) + [f"--seed={seed}", f"--out_dir={folder}",
                                             "--eval=false"] + extra


def train_pipeline(name, seed, out_dir, train_argv):
    """Train (or resume) one pipeline. Returns {point: model}, the teacher, world, tok, cfg."""
    argv = pipeline_argv(name, seed, out_dir, train_argv)
    base_dir = train.get_config(pipeline_argv("base", seed, out_dir, train_argv)).out_dir
    cfg = train.get_config(argv)
    if cfg.out_dir != base_dir and not os.path.isdir(os.path.join(cfg.out_dir, "teacher")):
        shutil.copytree(os.path.join(base_dir, "teacher"), os.path.join(cfg.out_dir, "teacher"))
    points = {}
    if name == "base":
        train.run(train.get_config(argv + ["--stage=pretrain"]))
    if name != "scope image":
        models, world, tok = train.run(train.get_config(argv + ["--stage=adapt"]))
        points["aligned"] = aligned_model(cfg, models["teacher"], tok, world)
        points["adapted"] = models["adapted"]
    models, world, tok = train.run(train.get_config(argv + ["--stage=distill"]))
    points["distilled"] = models[f"distilled-{train.variant_name(cfg)}"]
    return points, models["teacher"], world, tok, cfg


def measure(model, teacher, world, tok, image_size, text):
    row = evaluation.evaluate_models({"m": model}, world, tok, image_size, teacher=teacher)["m"]
    knowledge = world.bench("knowledge_bench")          # the test items, as evaluate_models'
    row["handoff_image"] = evaluation.teacher_handoff_accuracy(
        model, teacher, knowledge, tok, image_size, scope="image")
    for split in ("seen", "unseen"):       # seen: the entity's knowledge VQA is in training
        items = [it for it in knowledge if it["split"] == split]
        row[f"kvqa_{split}"] = evaluation.vqa_accuracy(model, items, tok, image_size)
        row[f"handoff_{split}"] = evaluation.teacher_handoff_accuracy(model, teacher, items, tok,
                                                                      image_size)
    row["drift"] = kv_drift(model, teacher, text)
    row["img_desc"] = image_desc_match(model, teacher, world, tok, image_size)
    return row


def format_results(rows):
    cols = [("acc", "language"), ("vision", "vision"), ("knowledge_vqa", "kvqa (student)"),
            ("teacher_handoff", "handoff full"), ("handoff_image", "handoff image")]
    lines = ["| pipeline / point | " + " | ".join(h for _, h in cols)
             + " | kvqa seen/unseen | handoff seen/unseen | T | T seen/unseen | top1 | K drift"
             " | V drift | img->desc (best layer) |", "|---" * (len(cols) + 9) + "|"]
    for name, r in rows.items():
        mean = {k: sum(v) / len(v) for k, v in r["drift"].items()}
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k, _ in cols)
                     + f" | {100 * r['kvqa_seen']:.0f} / {100 * r['kvqa_unseen']:.0f}"
                     + f" | {100 * r['handoff_seen']:.0f} / {100 * r['handoff_unseen']:.0f}"
                     + f" | {r['transfer']:.2f} | {r.get('transfer_seen', float('nan')):.2f} / "
                     f"{r.get('transfer_unseen', float('nan')):.2f}"
                     + f" | {100 * r['transfer_top1']:.0f}"
                     + f" | {mean['k']:.3f} | {mean['v']:.3f} | {100 * max(r['img_desc']):.1f} |")
    lines += ["", "Per-layer drift (K / V, layer 0 first) and img->desc per layer:", ""]
    for name, r in rows.items():
        per = ", ".join(f"{k:.3f}/{v:.3f}" for k, v in zip(r["drift"]["k"], r["drift"]["v"]))
        lines.append(f"- {name}: {per}; img->desc "
                     + ", ".join(f"{100 * h:.0f}" for h in r["img_desc"]))
    return "\n".join(lines)


FLAGS = {"seed": ("0", "the one seed of the study (world, init, batches)"),
         "out_dir": ("out/handoff", "seed<N>/<pipeline>/ folders, handoff.md and handoff.json"),
         "only": ("", "train this one pipeline and stop (no measuring); empty: all"),
         "pipelines": (",".join(PIPELINES), "comma list of the pipelines trained and measured")}


def main(argv):
    if toolflags.asks_help(argv, __doc__.split("\n\n")[1], FLAGS):
        return None
    opts, train_argv = toolflags.parse(argv, FLAGS, reserved=("stage", "eval", "resume"))
    try:
        seed, out_dir = int(opts["seed"]), opts["out_dir"]
    except ValueError:
        raise ValueError(f"--seed={opts['seed']!r}: expected an integer") from None
    if opts["only"]:
        if opts["only"] not in PIPELINES:
            raise ValueError(f"--only={opts['only']!r}; expected one of {PIPELINES}")
        train_pipeline(opts["only"], seed, out_dir, train_argv)
        return None
    pipelines = [p for p in opts["pipelines"].split(",") if p]
    if not pipelines or any(p not in PIPELINES for p in pipelines):
        raise ValueError(f"--pipelines={opts['pipelines']!r}; expected names from {PIPELINES}")
    t0, rows = time.time(), {}
    for name in pipelines:
        points, teacher, world, tok, cfg = train_pipeline(name, seed, out_dir, train_argv)
        kvshare.freeze(teacher)
        text = text_batches(world, tok, teacher, cfg.image_size)
        for point, model in points.items():
            rows[f"{name} / {point}"] = measure(model, teacher, world, tok, cfg.image_size, text)
    table = format_results(rows)
    note = (f"\n\nseed {seed}, train flags {train_argv or '(defaults)'}, pipelines {pipelines}; "
            f"{time.time() - t0:.0f} s (measuring, and training what was not yet trained)\n")
    print(table + note)
    os.makedirs(out_dir, exist_ok=True)
    write_text(os.path.join(out_dir, "handoff.md"), table + note)
    write_json(os.path.join(out_dir, "handoff.json"), rows)
    return rows


if __name__ == "__main__":
    # one thread: the README's numbers were measured so (CPU float results, hence the trained
    # models, depend on the thread count), and --only= runs can share the cores in parallel
    torch.set_num_threads(1)
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, TrainingError) as e:
        sys.exit(f"handoff_study.py: {e}")
