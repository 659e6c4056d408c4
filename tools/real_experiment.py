"""
LinguDistill on a real language model: SmolLM2-135M-Instruct is the teacher; the student is its
decoder + a small fresh vision tower. Vision adaptation degrades the decoder's language, the
distill variants try to restore it; every model is measured on real benchmarks (BIG-bench dev
tasks, perplexity on held-out real text) and on VQA, over several seeds, with the same
baselines and paired statistics as tools/experiment.py.

  python tools/real_experiment.py --teacher=.weights/smollm2-135m --seeds=0,1,2
      [--bigbench=.weights/bigbench-1.0.0.tar.gz] [--out_dir=out/real] [--items=60]
      [--merge_lams=0.25,0.5] [TRAIN FLAGS, e.g. --adapt_steps=120 --device=cuda]
  python tools/real_experiment.py --help      # every flag, its default and what it does

The data (written once to <out_dir>/data, the same for every seed):
- vision-heavy sources (CE only in LinguDistill): the tiny world's renders (world.build_world,
  world seed 0, 32 px) with English questions in SmolLM2's chat format (ChatML, no system
  prompt): "What colour is the shape in the image?" -> "red", likewise shape, count, position,
  caption; the vision benchmark is the world's fresh renders asked the same way (exact match).
- the language-intensive source "text" (KD in LinguDistill): real English from BIG-bench tasks
  that are neither dev nor reserved (bigbench.training_text: "<input> <answer>"), raw text, the
  first quarter of its words the context, the rest the response. One task in ten (by a hash of
  its name) is held out of training: its texts are the perplexity set.
Evaluation: the per-token KL(teacher || model) on the held-out texts (eval.held_out_scores, in
nats; the teacher's is 0) — the primary language metric: it registers partial damage and
partial recovery where the dev tasks sit at chance; perplexity on the same texts; the BIG-bench
dev tasks (bigbench.DEV_TASKS; the first --items of each, file order; mean log-probability per
option token), their mean = "language"; VQA exact match; transfer T (eval.transfer: does the
teacher reading the student's image KV answer as it would from the image's words?) on the vision
prompts whose answer those words give, "What shape is in the image?" + "It is a" with "the red
circle." as the oracle's text (colour, shape; transfer_items). The reserved BIG-bench tasks
are never read.

Per seed (the seed sets the tower's init and the data order; teacher and data are fixed): one
align + adapt run (train.py --stage=adapt), the distill variants from that adapted model
(experiment.VARIANTS), and the weight merges of the adapted decoder toward the teacher. The
text-replay KD variants (KD on the image-free language sources only) are, on this data, the
same runs as text-only teacher KD (own text) and LinguDistill (student KV), since the only KD
source, "text", has no image: variant_aliases reports them without training them again.
KL recovery = 1 - KL(model) / KL(adapted), the share of the held-out KL that adaptation added and
the model removed; recovery = (model - adapted) / (teacher - adapted) on the dev-task mean.
Strong-task recovery: the same on the mean of the dev tasks where the teacher is >= 10 points
above chance (strong_tasks; chosen on the teacher's scores alone), the readout that is not the
KD objective (the held-out KL is KD's own divergence on held-out text).
Paired differences (LinguDistill minus each baseline and each merge) on all three, and vision.
Writes real.md, real.json and (with matplotlib) real.png to --out_dir; a re-run in the same
--out_dir resumes (finished seeds are read back from seed<N>.json, measured models from
seed<N>/rows.json). --results_dir=DIR keeps the finished seeds, the teacher's row and the settings
in a second, tracked folder (docs/seeds/...), read first and written as each seed finishes, so runs
spread over sessions lose at most the seed in progress. The folder's settings.json records what the results depend on (the train
config, --items, the teacher folder's name); a later call with other settings is refused.
"""
import json
import os
import sys
import time
import zlib


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bigbench  # noqa: E402
import data  # noqa: E402
import world  # noqa: E402
import chat  # noqa: E402
import eval as ev  # noqa: E402
import experiment  # noqa: E402
import kvshare  # noqa: E402
import toolflags  # noqa: E402
import train  # noqa: E402
from model import VLM  # noqa: E402
from plumbing.files import atomic_write, read_json, write_json, write_text  # noqa: E402
from plumbing.loop import TrainingError  # noqa: E402
from scale.weights import load_hf_lm  # noqa: E402

# The student: the teacher's decoder + this tower (train.py flags); the run's defaults. The adapt
# learning rate is the one that degrades the LM without destroying it (seed 0, 60 steps, held-out
# perplexity 55.6 -> 53.4 at 1e-4, 128 at 3e-4, 3e4-1e7 at 1e-3; RESULTS.md).
TRAIN_DEFAULTS = ["--image_size=32", "--patch_size=4", "--shuffle_factor=2", "--vision_dim=64",
                  "--vision_layers=2", "--vision_heads=4", "--batch_size=8", "--max_len=48",
                  "--num_workers=0", "--align_steps=30", "--align_lr=3e-3", "--adapt_steps=60",
                  "--adapt_lr=3e-4", "--adapt_vision_lr=3e-3", "--distill_steps=40",
                  "--distill_lr=2e-4", "--warmup_frac=0.1", "--ckpt_every=1000", "--keep_last=1",
                  "--log_every=10"]
QUESTIONS = {"colour": "What colour is the shape in the image?",
             "shape": "What shape is in the image?",
             "count": "How many shapes are in the image?",
             "position": "On which side of the image is the shape?",
             "caption": "Describe the image in a few words."}
# T's items: SmolLM2's first answer token is "The" with or without the image's words (their
# KL(oracle || blind) there is 0.09-0.12 nats), so T is read after a lead-in, where the words
# change the teacher's next token: 0.24 nats (colour), 1.21 (shape); 25 items each, seed 0.
TRANSFER_LEADS = {"colour": "The shape is coloured", "shape": "It is a"}
WORLD_SEED, IMAGE_SIZE = 0, 32
TEXT_SOURCE = "text"          # the one language-intensive (KD) source: image-free real text


def train_flags(train_argv):
    """TRAIN_DEFAULTS, each overridden by the same flag in train_argv, then train_argv."""
    given = {a.split("=", 1)[0] for a in train_argv}
    return [d for d in TRAIN_DEFAULTS if d.split("=", 1)[0] not in given] + train_argv


def held_out_task(task):
    """One BIG-bench task in ten (by a hash of its name) is perplexity text, never trained on."""
    return zlib.crc32(task.encode()) % 10 == 0


def vision_example(ex):
    """A tiny-world VQA example -> the same image asked in English, in SmolLM2's chat format."""
    answer = ex["response"].strip().removesuffix(" .").strip()
    return {"image": ex["image"], "prompt": chat.chat_prompt(data.IMAGE_TOKEN
                                                             + QUESTIONS[ex["source"]]),
            "response": answer, "source": ex["source"]}


def transfer_items(tiny_bench):
    """The vision prompts whose answer the image's words give, for eval.transfer: the question,
    then a lead-in the answer must follow (TRANSFER_LEADS), with the image's words as the
    oracle's text: "<image>What shape is in the image?" + "It is a" -> " circle", the oracle
    reading "the red circle. What shape is in the image?" + "It is a"."""
    items = []
    for ex in (ex for ex in tiny_bench if ex["source"] in TRANSFER_LEADS):
        it = vision_example(ex)
        items.append({**it, "prompt": it["prompt"] + TRANSFER_LEADS[ex["source"]],
                      "response": " " + it["response"], "desc": ex["desc"] + ". ",
                      "split": ex["source"]})
    return items


def text_example(text):
    """Raw text -> context = its first quarter of words (at least 3), response = the rest."""
    words = text.split()
    k = min(max(3, len(words) // 4), len(words) - 1)
    return {"image": None, "prompt": " ".join(words[:k]), "response": " " + " ".join(words[k:]),
            "source": "text"}


def build_data(folder, source, n_vision=400, n_text=2000, n_heldout=200):
    """Write vision.jsonl (+ images/), text.jsonl and heldout_text.json to folder, once.
    Returns the JSONL paths and the held-out texts."""
    paths = [os.path.join(folder, "vision.jsonl"), os.path.join(folder, "text.jsonl")]
    heldout_path = os.path.join(folder, "heldout_text.json")
    if not os.path.isfile(heldout_path):
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        tiny = world.build_world(WORLD_SEED, image_size=IMAGE_SIZE)
        lines = []
        for src in QUESTIONS:
            for i, ex in enumerate(tiny.sources[src][:n_vision]):
                name = f"images/{src}-{i:04d}.png"
                ex["image"].save(os.path.join(folder, name))
                lines.append({**vision_example(ex), "image": name})
        texts, _ = bigbench.training_text(source, max_per_task=40,
                                          keep_task=lambda t: not held_out_task(t))
        texts = [t for t in texts if len(t.split()) >= 8][:n_text]
        heldout, _ = bigbench.training_text(source, max_per_task=20, keep_task=held_out_task)
        heldout = [" ".join(t.split()[:64]) for t in heldout if len(t.split()) >= 8][:n_heldout]
        for path, rows in zip(paths, (lines, [text_example(t) for t in texts])):
            write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_json(heldout_path, heldout)
    with open(heldout_path, encoding="utf-8") as f:
        return paths, json.load(f)


def vision_bench():
    """The tiny world's fresh-render VQA benchmark asked in English, and its transfer items."""
    tiny = world.build_world(WORLD_SEED, image_size=IMAGE_SIZE)
    return [vision_example(ex) for ex in tiny.vision_bench], transfer_items(tiny.vision_bench)


def evaluate(model, tok, bench, vqa, transfer_set, heldout, teacher=None):
    """{"acc": dev-task mean, "acc_<task>", "ppl", "kl"[, "vision", "transfer", ...]} for a VLM
    or a text-only Decoder; ppl and kl = eval.held_out_scores (kl 0 for the teacher itself:
    teacher=None); vqa, transfer_set = vision_bench(); transfer T (per split too) =
    eval.transfer on the teacher, for a VLM."""
    decoder = model.decoder if isinstance(model, VLM) else model
    model.eval()
    row = {f"acc_{task}": ev.multiple_choice(decoder, tok, items, batch_size=16,
                                             scorer=bigbench.shared_context_scores)["acc"]
           for task, items in bench.items()}
    row["acc"] = sum(row.values()) / len(row)
    row.update({"kl": 0.0}, **ev.held_out_scores(decoder, heldout, tok, 16, teacher))
    if isinstance(model, VLM):
        row["vision"] = ev.vqa_accuracy(model, vqa, tok, IMAGE_SIZE, batch_size=32)
        row.update(ev.transfer(model, teacher, transfer_set, tok, IMAGE_SIZE, batch_size=32))
    return row


STRONG_MARGIN = 0.10       # a dev task is read when the teacher is this far above its chance


def strong_tasks(teacher_row, bench, margin=STRONG_MARGIN):
    """The dev tasks on which the teacher is >= margin above chance (chance: the mean over items
    of 1 / number of options), in bench order: the readout that is not the KD objective (the
    held-out KL is). Chosen on the teacher's own scores only, never on a student's."""
    chance = {t: sum(1 / len(it["options"]) for it in items) / max(1, len(items))
              for t, items in bench.items()}
    return [t for t in bench if teacher_row[f"acc_{t}"] - chance[t] >= margin - 1e-12]


def add_strong(rows, tasks):
    """Each row's "acc_strong" (mean accuracy over `tasks`) and "recovery_strong"
    ((model - adapted) / (teacher - adapted) on it); no keys when no task qualifies."""
    if not tasks:
        return rows
    for row in rows.values():
        row["acc_strong"] = sum(row[f"acc_{t}"] for t in tasks) / len(tasks)
    drop = rows["teacher"]["acc_strong"] - rows["adapted"]["acc_strong"]
    for row in rows.values():
        row["recovery_strong"] = ((row["acc_strong"] - rows["adapted"]["acc_strong"]) / drop
                                  if drop > 0 else float("nan"))
    return rows


def effective_flags(argv):
    """train.py's --key=value flags as one {key: value} (a later flag overrides an earlier)."""
    return tuple(sorted(dict(a[2:].split("=", 1) for a in argv if a.startswith("--")
                             and "=" in a).items()))


def variant_aliases(base, variants):
    """{variant: the earlier variant of `variants` it equals}: variants whose stage-3 flags are
    the same once filled in. Here the only KD source is the image-free "text" (TEXT_SOURCE), so
    text-replay KD (own text) IS text-only teacher KD and text-replay KD (student KV) IS
    LinguDistill (the same config, hence the same model): they are reported, not trained twice."""
    first, aliases = {}, {}
    for name in variants:
        key = effective_flags(base + experiment.variant_flags(name, TEXT_SOURCE))
        same = first.setdefault(key, name)
        if same != name:
            aliases[name] = same
    return aliases


def run_seed(seed, opts, train_argv, paths, heldout, bench, vision, teacher_row):
    """Adapt once, every distill variant and merge from it; evaluate all -> rows. Each model's
    row is kept in seed<N>/rows.json as soon as it is measured, so a re-run measures only the
    models still missing (train.py's --resume likewise skips finished stages)."""
    seed_dir = os.path.join(opts["out_dir"], f"seed{seed}")
    base = toolflags.resuming([f"--teacher_path={opts['teacher']}",
                               f"--data_path={','.join(paths)}", f"--kd_sources={TEXT_SOURCE}",
                               f"--seed={seed}", f"--out_dir={seed_dir}", "--eval=false"]
                              + train_flags(train_argv))
    rows_path = os.path.join(seed_dir, "rows.json")
    rows = {"teacher": teacher_row}
    if os.path.isfile(rows_path):
        with open(rows_path, encoding="utf-8") as f:
            rows.update(json.load(f))
    times, t0 = {}, time.time()
    models, _, tok = train.run(train.get_config(base + ["--stage=adapt"]))
    teacher, adapted = kvshare.freeze(models["teacher"]), models["adapted"]
    times["adapt"] = time.time() - t0
    build = {"adapted": lambda: adapted}
    aliases = variant_aliases(base, opts["variants"])
    build.update({name: (lambda name=name: experiment.train_variant(base, name, TEXT_SOURCE))
                  for name in opts["variants"] if name not in aliases})
    build.update({experiment.merge_name(lam):
                  (lambda lam=lam: experiment.merge_toward_teacher(adapted, teacher, lam))
                  for lam in opts["merge_lams"]})
    for name, make in build.items():
        if name not in rows:
            t0 = time.time()
            rows[name] = evaluate(make(), tok, bench, *vision, heldout, teacher)
            times[name] = time.time() - t0
            write_json(rows_path, {k: v for k, v in rows.items() if k != "teacher"})
    for name, same in aliases.items():             # the same run by construction: its rows
        rows[name] = dict(rows[same])
    drop, kl = rows["teacher"]["acc"] - rows["adapted"]["acc"], rows["adapted"]["kl"]
    for row in rows.values():
        row["recovery"] = (row["acc"] - rows["adapted"]["acc"]) / drop if drop > 0 else float("nan")
        row["recovery_kl"] = 1 - row["kl"] / kl if kl > 0 else float("nan")
    add_strong(rows, strong_tasks(rows["teacher"], bench))
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()), flush=True)
    return rows


COLUMNS = [("kl", "held-out KL"), ("recovery_kl", "KL recovery"), ("ppl", "held-out ppl"),
           ("acc", "BIG-bench dev mean"), ("recovery", "dev recovery"),
           ("acc_strong", "strong dev tasks"), ("recovery_strong", "strong-task recovery"),
           ("vision", "vision"),
           ("transfer", "T")] + [(f"transfer_{s}", f"T {s}") for s in TRANSFER_LEADS]
DIFF_METRICS = {"recovery_kl": "KL recovery", "recovery": "dev recovery",
                "recovery_strong": "strong-task recovery", "vision": "vision"}


def format_rows(mean, std, tasks):
    cols = COLUMNS[:4] + [(f"acc_{t}", t) for t in tasks] + COLUMNS[4:]
    return ev.format_table(mean, std, columns=cols, plain=("kl", "ppl", "transfer",
                           *(f"transfer_{s}" for s in TRANSFER_LEADS)))


def plot(mean, std, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in mean.items():
        if "vision" in r:
            ax.errorbar(100 * r["vision"], 100 * r["acc"], xerr=100 * std[name]["vision"],
                        yerr=100 * std[name]["acc"], fmt="o", capsize=3, label=name)
    ax.axhline(100 * mean["teacher"]["acc"], ls="--", c="grey", label="teacher (language)")
    ax.set_xlabel("vision (VQA exact match, %)")
    ax.set_ylabel("BIG-bench dev mean accuracy (%)")
    ax.set_title("SmolLM2-135M: language vs vision (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return True


FLAGS = {"teacher": ("", "the teacher: a Hugging Face SmolLM2 folder (tools/convert_gguf.py)"),
         "seeds": ("0,1,2", "comma list of seeds: one align + adapt + every variant each"),
         "out_dir": (os.path.join("out", "real"), "data/, seed<N>/, real.md / .json / .png"),
         "bigbench": (bigbench.DEFAULT_SOURCE, "the BIG-bench archive or folder"),
         "items": ("60", "items per BIG-bench dev task (the first ones, file order)"),
         "merge_lams": ("0.25,0.5", "merge toward the teacher at these λ (empty: no merges)"),
         "variants": (",".join(experiment.VARIANTS), "comma list of the distill variants"),
         "results_dir": ("", "also write each finished seed<N>.json, teacher.json and "
                         "settings.json here, and read them back from here first (a tracked "
                         "folder, e.g. docs/seeds/real: commit each file as it lands)")}


def parse_args(argv):
    """-> (opts, train_argv); None when argv asks for --help (printed)."""
    if toolflags.asks_help(argv, __doc__.split("\n\n")[1], FLAGS):
        return None
    opts, train_argv = toolflags.parse(argv, FLAGS, reserved=(
        "teacher_path", "data_path", "kd_sources", "seed", "stage", "variant"))
    if not opts["teacher"] or not os.path.isdir(opts["teacher"]):
        raise ValueError(f"--teacher={opts['teacher']!r}: expected a Hugging Face SmolLM2 folder "
                         "(tools/convert_gguf.py, README 'Real weights and real data')")
    try:
        opts["seeds"] = [int(s) for s in opts["seeds"].split(",") if s]
        opts["items"] = int(opts["items"])
        opts["merge_lams"] = [float(x) for x in opts["merge_lams"].split(",") if x]
    except ValueError as e:
        raise ValueError(f"--seeds, --items, --merge_lams: {e}") from None
    if not opts["seeds"] or opts["items"] < 1:
        raise ValueError("expected --seeds=0,1,... (at least one) and --items >= 1")
    opts["variants"] = [v for v in opts["variants"].split(",") if v]
    unknown = sorted(set(opts["variants"]) - set(experiment.VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; expected names from "
                         f"{list(experiment.VARIANTS)}")
    if not all(0 <= x <= 1 for x in opts["merge_lams"]):
        raise ValueError(f"--merge_lams: each must be in [0, 1], got {opts['merge_lams']}")
    cfg = train.get_config([f"--teacher_path={opts['teacher']}"] + train_flags(train_argv))
    opts["settings"] = settings(cfg, opts)
    return opts, train_argv


# train.py keys that do not change what a seed's models are: train.py's run keys (how and where a
# run goes) less the step counts, which do change them; the teacher is named by its folder instead.
NOT_SETTINGS = train.RUN_KEYS - {f"{stage}_steps" for stage in train.BATCH_STREAMS} | {"teacher_path"}


def settings(cfg, opts):
    """What this folder's rows depend on, as JSON: the train config (less NOT_SETTINGS), the
    dev-task items and the teacher folder's name."""
    kept = {k: v for k, v in vars(cfg).items() if k not in NOT_SETTINGS}
    # through JSON and back, so it compares equal to settings.json as read (tuples -> lists)
    return json.loads(json.dumps({"train": kept, "items": opts["items"],
                                  "teacher": os.path.basename(os.path.normpath(opts["teacher"]))}))


def check_settings(out, current):
    """Record the settings in <out>/settings.json, or refuse a folder measured with others."""
    path = os.path.join(out, "settings.json")
    if not os.path.isfile(path):
        write_json(path, current)
        return
    saved = read_json(path)
    # a flag added to train.py after the folder was written counts as its default there
    default = json.loads(json.dumps(vars(train.TrainConfig())))
    changed = sorted(f"--{k}" for k in current["train"]
                     if saved["train"].get(k, default.get(k)) != current["train"][k])
    changed += [f"--{k}" for k in ("items", "teacher") if saved.get(k) != current[k]]
    if changed:
        raise ValueError(f"{path}: this --out_dir holds results measured with other settings "
                         f"({', '.join(changed)} differ); use a new --out_dir")


def finished(out, kept, name, compute):
    """The result in kept/name (the tracked folder) or out/name, else compute(); written to both
    and read back (every seed's result as JSON gives it)."""
    paths = [os.path.join(folder, name) for folder in (kept, out) if folder]
    have = [p for p in paths if os.path.isfile(p)]
    if not have:
        write_json(paths[0], compute())
    result = read_json(have[0] if have else paths[0])
    for path in paths:
        if not os.path.isfile(path):
            write_json(path, result)
    return result


def main(argv):
    parsed = parse_args(argv)
    if parsed is None:
        return
    opts, train_argv = parsed
    out, kept = opts["out_dir"], opts["results_dir"]
    for folder in filter(None, (out, kept)):
        os.makedirs(folder, exist_ok=True)
        check_settings(folder, opts["settings"])
    t_start = time.time()
    paths, heldout = build_data(os.path.join(out, "data"), opts["bigbench"])
    bench, _ = bigbench.read_tasks(bigbench.DEV_TASKS, opts["bigbench"], limit=opts["items"])
    vision = vision_bench()
    tok = data.load_tokenizer(os.path.join(opts["teacher"], "tokenizer.json"))
    teacher_row = finished(out, kept, "teacher.json", lambda: evaluate(
        load_hf_lm(opts["teacher"]), tok, bench, *vision, heldout))
    per_seed = [finished(out, kept, f"seed{seed}.json", lambda seed=seed: run_seed(
        seed, opts, train_argv, paths, heldout, bench, vision, teacher_row))
        for seed in opts["seeds"]]
    mean, std = experiment.aggregate(per_seed)
    # every merge, its vision difference beside: "equal vision" needs a tower that learns vision
    diffs = experiment.paired_differences(per_seed, mean, metrics=DIFF_METRICS, every_merge=True)
    gaps = experiment.transfer_differences(per_seed)          # T - T_shuffled, where measured
    raw, adjusted = experiment.family_pvalues(diffs, gaps)
    report = [f"seeds {opts['seeds']}, {opts['items']} items per dev task, "
              f"{len(heldout)} held-out texts; {time.time() - t_start:.0f}s in this call", "",
              "strong dev tasks (the teacher >= 10 points above chance; the readout that is not "
              f"the KD objective): {', '.join(strong_tasks(teacher_row, bench)) or 'none'}", "",
              format_rows(mean, std, list(bench)), "",
              experiment.format_differences(diffs, mean, metrics=DIFF_METRICS), "",
              experiment.format_pvalues(diffs, gaps, raw, adjusted, metrics=DIFF_METRICS)]
    if gaps:
        report += ["", experiment.format_null(mean, std, gaps, raw, adjusted)]
    text = "\n".join(report)
    write_text(os.path.join(out, "real.md"), text + "\n")
    write_json(os.path.join(out, "real.json"), {"per_seed": per_seed, "mean": mean, "std": std,
                                                "paired": diffs, "transfer_gap": gaps,
                                                "p_holm": {" | ".join(k): v
                                                           for k, v in adjusted.items()}})
    plot(mean, std, os.path.join(out, "real.png"))
    print(text)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, TrainingError) as e:
        sys.exit(f"real_experiment.py: {e}")
