"""
The miniature experiment: seeds x {teacher, adapted, CE-only, uniform KD, text-only teacher
KD, LinguDistill, text-replay KD (own text / student KV), weight merges}, every model on the
tiny world's benchmarks (test items), mean ± std over seeds, and paired per-seed differences of
LinguDistill against each baseline with 95 % t-intervals and Holm-adjusted p-values.

  python tools/experiment.py --seeds=0,1,2 [--jobs=3] [--threads=0] [--out_dir=out/experiment]
                             [--merge_lams=0.25,0.5,0.75] [--teachers_from=DIR]
                             [--variants=ce-only,lingudistill,...] [TRAIN FLAGS]
  python tools/experiment.py --help           # every flag, its default and what it does

Text-replay KD (issue 31): KD on the image-free language source text_qa only (train.py
--kd_sources=text_qa), CE everywhere, the teacher on its own text (--scope=none) or through the
student's K/V of that text (--scope=full). LinguDistill minus it is what KD through the handoff
on image-grounded examples adds. Every model is measured on the test items; the validation
split's items (world.World.bench(..., "val")) give the val_* keys, on which the one setting the
report chooses (the merge at equal vision) is chosen. Transfer T comes with its shuffled-image
null (eval.shuffled_items): T_shuffled, T - T_shuffled paired over seeds, the blind teacher's
top-1 and the raw KLs. The report states the family of its intervals and their Holm-adjusted
p-values, and the outcome of the pre-stated rule (decide; RESULTS.md).

Every VLM also gets the transfer measure T (eval.transfer: does the frozen teacher see the
image through the KV handoff? 1 = as if it read the image's words, 0 = as if no image);
--tower=oracle runs the positive control (oracle.py).

The weight-merging baseline (no training): the adapted decoder interpolated toward the
teacher, theta = (1 - lam) * theta_adapted + lam * theta_teacher (merge_toward_teacher);
--merge_lams= (empty) leaves it out.

A finished seed is not trained or evaluated again: its seed<N>.json is read back when it was
made with the same train flags and merges, so a re-run in the same --out_dir (more seeds, or
after an interruption) only does what is missing. --results_dir=DIR keeps the finished seeds in
a second, tracked folder (docs/seeds/...): read first, written as each seed finishes, so an
experiment spread over sessions loses at most the seed in progress. --teachers_from=DIR takes each seed's teacher
from DIR/seed<N>/teacher (the same seed's stage 1 in another experiment folder) instead of
pretraining it again: stage 1 reads nothing of the tower or of stages 2-3, so the teacher is the
one this seed would train, and two experiments (e.g. the default world and --tower=oracle) then
share their teachers seed by seed.

Every other flag goes to train.py (e.g. --device=cuda, --align_steps=1000). Writes
experiment.md, experiment.json (per seed, mean, std, paired differences) and, if matplotlib
is installed, experiment.png (language vs vision per model) to --out_dir.
"""
import copy
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval as evaluation  # noqa: E402
import toolflags  # noqa: E402
import train  # noqa: E402
from plumbing.files import write_json, write_text  # noqa: E402

# name -> train.py overrides for stage 3; "{text}" is the image-free language sources (the tiny
# world's text_qa; a tool on other data names its own: real_experiment's "text")
VARIANTS = {
    "CE-only": ["--policy=none", "--scope=full"],
    "uniform KD": ["--policy=uniform", "--scope=full"],
    "text-only teacher KD": ["--policy=selective", "--scope=none"],
    "LinguDistill": ["--policy=selective", "--scope=full"],
    # text-replay KD (issue 31): KD on the image-free language sources only, CE everywhere else,
    # the teacher reading its own text (scope none) or the student's K/V of that text (full)
    "text-replay KD (own text)": ["--policy=selective", "--scope=none", "--kd_sources={text}"],
    "text-replay KD (student KV)": ["--policy=selective", "--scope=full", "--kd_sources={text}"],
}
TEXT_SOURCES = "text_qa"                       # the tiny world's image-free language source
MERGE_LAMS = (0.25, 0.5, 0.75)
# LinguDistill minus each of these
BASELINES = ("CE-only", "text-replay KD (own text)", "text-replay KD (student KV)",
             "text-only teacher KD", "uniform KD")
# paired differences are reported on these metrics (eval.evaluate_models keys): the recovery of
# the language drop, the unseen-entity language split and knowledge VQA (the handoff's natural
# readouts), and vision
DIFF_METRICS = {"recovery": "recovery", "acc_unseen": "lang unseen",
                "knowledge_vqa": "knowledge VQA", "vision": "vision"}
VISION_SLACK = 0.01            # "equal or better vision" for the merge comparison: >= LD - 1 point


def merge_name(lam):
    return f"merge λ={lam:g}"


@torch.no_grad()
def merge_toward_teacher(vlm, teacher, lam):
    """A new VLM whose decoder is (1 - lam) * adapted + lam * teacher, parameter by parameter;
    the vision tower and projector stay the adapted ones, and so do the decoder's rows beyond
    the teacher's vocabulary (<image> etc.). `vlm` and `teacher` are left untouched."""
    merged = copy.deepcopy(vlm)
    theirs = dict(teacher.named_parameters())
    for name, p in merged.decoder.named_parameters():          # a tied head is visited once
        t = theirs.get(name)
        vocab_rows = name in ("embed.weight", "lm_head.weight")     # may have extra rows here
        if t is None or not (t.shape == p.shape or vocab_rows and t.shape[1:] == p.shape[1:]
                             and t.shape[0] < p.shape[0]):
            raise ValueError(f"merge: decoder parameter {name} {tuple(p.shape)} has no teacher "
                             f"counterpart of the same shape (teacher: "
                             f"{None if t is None else tuple(t.shape)})")
        # lerp(a, b, lam) = a + lam * (b - a), exact at lam = 0 and lam = 1
        p[:t.shape[0]] = torch.lerp(p[:t.shape[0]], t.to(p.device, p.dtype), lam)
    return merged


def slug(name):
    """A variant's folder name: "text-replay KD (own text)" -> "text-replay-kd-own-text"."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(filter(None, out.split("-")))


def variant_flags(name, text_sources=TEXT_SOURCES):
    """VARIANTS[name] with its image-free language sources filled in."""
    return [f.replace("{text}", text_sources) for f in VARIANTS[name]]


def train_variant(base_argv, name, text_sources=TEXT_SOURCES):
    """Stage 3 of one VARIANTS entry from the adapted model in base_argv's --out_dir -> the
    distilled model (folder distilled-<slug(name)>)."""
    models, _, _ = train.run(train.get_config(base_argv + ["--stage=distill",
                                                           f"--variant={slug(name)}"]
                                              + variant_flags(name, text_sources)))
    return models[f"distilled-{slug(name)}"]


def add_val(rows, val_rows):
    """Each model's validation-split metrics (eval.evaluate_models(part="val")) into its row
    as "val_<key>" (the settings a report chooses, e.g. the merge at equal vision, read these)."""
    for name, row in rows.items():
        row.update({f"val_{k}": v for k, v in val_rows[name].items()})
    return rows


def run_seed(seed, train_argv, out_dir, merge_lams=MERGE_LAMS, teachers_from="",
             variants=tuple(VARIANTS)):
    """Pretrain + adapt once, then every distill variant of `variants` from the same adapted
    model, and the merges of the adapted model toward the teacher; eval all on the test items,
    and on the validation items (val_* keys). With teachers_from, the teacher is copied from
    teachers_from/seed<N>/teacher and stage 1 is not run."""
    # --resume: a re-run in the same --out_dir continues where an interrupted one stopped
    given = any(a.startswith("--resume") for a in train_argv)
    seed_dir = os.path.join(out_dir, f"seed{seed}")
    base = (train_argv if given else toolflags.resuming(train_argv)) + [
        f"--seed={seed}", f"--out_dir={seed_dir}", "--eval=false"]
    teacher_dir = os.path.join(seed_dir, "teacher")
    if teachers_from and not os.path.isdir(teacher_dir):
        given = os.path.join(teachers_from, f"seed{seed}", "teacher")
        if not os.path.isfile(os.path.join(given, "model.safetensors")):
            raise FileNotFoundError(f"--teachers_from={teachers_from}: no teacher of seed {seed} "
                                    f"({given}/model.safetensors); run that experiment's seed "
                                    "first")
        shutil.copytree(given, teacher_dir)
    if not teachers_from:
        train.run(train.get_config(base + ["--stage=pretrain"]))
    models, world, tok = train.run(train.get_config(base + ["--stage=adapt"]))
    teacher = models["teacher"]
    rows_models = {"teacher": teacher, "adapted": models["adapted"]}
    for name in variants:
        rows_models[name] = train_variant(base, name)
    for lam in merge_lams:
        rows_models[merge_name(lam)] = merge_toward_teacher(rows_models["adapted"], teacher, lam)
    cfg = train.get_config(base)
    rows = evaluation.evaluate_models(rows_models, world, tok, cfg.image_size, teacher=teacher)
    val = evaluation.evaluate_models(rows_models, world, tok, cfg.image_size, teacher=teacher,
                                     part="val")
    for part, table in (("", rows), ("val_", val)):
        drop = table["teacher"]["acc"] - table["adapted"]["acc"]
        for row in table.values():
            row["recovery"] = (row["acc"] - table["adapted"]["acc"]) / drop if drop > 0 \
                else float("nan")
    return add_val(rows, val)


def finished_seed(paths, made_by):
    """The rows of the first seed<N>.json among `paths` made by the same experiment, else None."""
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                done = json.load(f)
            if {k: done.get(k) for k in made_by} == made_by:
                return done["rows"]
    return None


def _run_seed_to_file(args):
    seed, train_argv, out_dir, jobs, merge_lams, threads, teachers_from, variants, results = args
    name = f"seed{seed}.json"
    made_by = {"train_argv": list(train_argv), "merge_lams": list(merge_lams),
               "variants": list(variants)}
    done = finished_seed([os.path.join(d, name) for d in (results, out_dir) if d], made_by)
    if done is not None:                         # a finished seed of the same experiment
        return done
    # share the cores between seeds (CPU float results, hence the models, depend on it)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // jobs))
    rows = run_seed(seed, train_argv, out_dir, merge_lams, teachers_from, variants)
    for d in (out_dir, results) if results else (out_dir,):
        os.makedirs(d, exist_ok=True)
        write_json(os.path.join(d, name), {**made_by, "rows": rows})
    return rows


def aggregate(per_seed):
    """Mean and (population) std over seeds of every metric of every model."""
    names = list(per_seed[0])
    mean, std = {}, {}
    for n in names:
        keys = per_seed[0][n].keys()
        vals = {k: [s[n][k] for s in per_seed] for k in keys}
        mean[n] = {k: sum(v) / len(v) for k, v in vals.items()}
        std[n] = {k: (sum((x - mean[n][k]) ** 2 for x in v) / len(v)) ** 0.5
                  for k, v in vals.items()}
    return mean, std


# ----------------------------------------------------------------------------------------
# Paired differences between models over seeds, with 95 % t-intervals

# t_{0.975, df}, df = 1..30: the two-sided 95 % quantile of Student's t, from the standard t
# table (e.g. NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.2).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df):
    """t_{0.975, df}: the table up to df = 30, then the Cornish-Fisher expansion around the
    normal quantile (error < 1e-3 there)."""
    if df < 1:
        raise ValueError(f"t975: df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(diffs):
    """Mean of paired differences and its 95 % t-interval, mean ± t_{0.975,n-1} * s / sqrt(n)
    (s: the sample std, n - 1 in the denominator). With n = 1 there is no interval (None)."""
    n = len(diffs)
    mean = sum(diffs) / n
    out = {"n": n, "diffs": list(diffs), "mean": mean, "sd": None, "half_width": None,
           "lo": None, "hi": None}
    if n > 1:
        sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
        hw = t975(n - 1) * sd / n ** 0.5
        out.update(sd=sd, half_width=hw, lo=mean - hw, hi=mean + hw)
    return out


def _betacf(a, b, x, iters=300, eps=1e-15):
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_pvalue(t, df):
    """Two-sided p-value of Student's t with df degrees of freedom: P(|T| >= |t|) =
    I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if df < 1:
        raise ValueError(f"t_pvalue: df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_pvalue(t):
    """The two-sided paired t-test p-value of a t_interval (None with n = 1 or no spread)."""
    if t["sd"] is None or math.isnan(t["sd"]) or math.isnan(t["mean"]):
        return None
    if t["sd"] == 0:
        return 0.0 if t["mean"] != 0 else 1.0
    return t_pvalue(t["mean"] / (t["sd"] / t["n"] ** 0.5), t["n"] - 1)


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values ({name: p}; None entries are left
    out): the k-th smallest becomes max over j <= k of min(1, (m - j + 1) p_(j)); controls the
    family-wise error rate at the nominal level."""
    given = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda x: x[0])
    m, out, running = len(given), {}, 0.0
    for j, (p, k) in enumerate(given):
        running = max(running, min(1.0, (m - j) * p))
        out[k] = running
    return out


def best_merge(mean, ref="LinguDistill", slack=VISION_SLACK):
    """The merge at equal or better vision than `ref`: among the merges whose mean vision is
    >= ref's mean vision - slack, the one with the highest mean language (None if none). Chosen
    on the validation split (val_vision, val_acc) where the rows have it, so the test items
    that report the comparison do not choose it."""
    v, a = ("val_vision", "val_acc") if "val_vision" in mean.get(ref, {}) else ("vision", "acc")
    ok = [n for n in mean if n.startswith("merge ")
          and mean[n][v] >= mean[ref][v] - slack - 1e-9]
    return max(ok, key=lambda n: mean[n][a]) if ok else None


def paired_differences(per_seed, mean, ref="LinguDistill", metrics=DIFF_METRICS,
                       every_merge=False):
    """{"<ref> − <other>": {metric: t_interval}} (the metrics the rows have) for every baseline
    present, plus the best merge (best_merge), or every merge with every_merge. Seeds pair up:
    each difference is within one seed (same teacher, same adapted model)."""
    merges = [n for n in mean if n.startswith("merge ")]
    if not every_merge:
        best = best_merge(mean, ref) if merges else None
        merges = [best] if best else []
    others = [b for b in BASELINES if b in mean] + merges
    keys = [k for k in metrics if k in mean[ref]]
    return {f"{ref} − {o}": {k: t_interval([s[ref][k] - s[o][k] for s in per_seed])
                             for k in keys} for o in others}


def format_interval(t):
    """Points: "+19.4 ± 11.4 [+8.0, +30.8]", or "+19.4 (n=1, no interval)"."""
    if t["half_width"] is None:
        return f"{100 * t['mean']:+.1f} (n=1, no interval)"
    return (f"{100 * t['mean']:+.1f} ± {100 * t['half_width']:.1f} "
            f"[{100 * t['lo']:+.1f}, {100 * t['hi']:+.1f}]")


def format_differences(diffs, mean, ref="LinguDistill", metrics=DIFF_METRICS):
    """Markdown: which merge is compared (or that none qualifies), then the table (one column
    per metric of `metrics` that diffs has; the first one is also shown seed by seed)."""
    keys = [k for k in metrics if k in next(iter(diffs.values()), {})]
    merges = [n for n in mean if n.startswith("merge ")]
    lines = []
    if merges:
        merge = best_merge(mean, ref)
        val = "val_vision" in mean[ref]
        v, a = ("val_vision", "val_acc") if val else ("vision", "acc")
        on = "on the validation split" if val else "on the reported items (no validation split)"
        floor = 100 * (mean[ref][v] - VISION_SLACK)
        if merge:
            lines.append(f"Best merge at equal or better vision, chosen {on} (mean vision >= "
                         f"{floor:.1f}, {ref}'s minus 1 point; highest mean language): {merge} "
                         f"(language {100 * mean[merge][a]:.1f}, vision "
                         f"{100 * mean[merge][v]:.1f} there).")
        elif any(f"{ref} − {m}" in diffs for m in merges):
            lines.append(f"No merge has mean vision >= {floor:.1f} ({ref}'s minus 1 point): "
                         "the merges below are compared at lower vision.")
        else:
            lines.append(f"No merge has mean vision >= {floor:.1f} ({ref}'s minus 1 point): "
                         f"no merge comparison ({', '.join(merges)}).")
    if not keys:
        return "\n".join(lines + ["", f"No baseline beside {ref}: no paired differences."])
    lines += ["", "Paired differences (same seed), points: mean ± half-width [95 % interval]; "
              "here ± is the interval's half-width t_{0.975,n-1} · s / √n (s: sample std over "
              "seeds), not a std:", "",
              f"| difference | {' | '.join(metrics[k] for k in keys)} | {metrics[keys[0]]} per "
              "seed |", "|---" * (len(keys) + 2) + "|"]
    for name, d in diffs.items():
        per = " / ".join(f"{100 * x:+.1f}" for x in d[keys[0]]["diffs"])
        cells = " | ".join(format_interval(d[k]) for k in keys)
        lines.append(f"| {name} | {cells} | {per} |")
    return "\n".join(lines)


TRANSFER_KEYS = ("transfer", "transfer_shuffled", "transfer_gap")


def transfer_differences(per_seed, models=None):
    """{model: t_interval of T - T_shuffled over seeds} (paired: the same student and prompts,
    its own images vs another entity's), for every model whose rows have the null."""
    names = [n for n in per_seed[0] if "transfer_gap" in per_seed[0][n]
             and (models is None or n in models)]
    return {n: t_interval([s[n]["transfer_gap"] for s in per_seed]) for n in names}


def family_pvalues(diffs, gaps):
    """Holm-adjusted p-values over the report's whole family of intervals: every (difference,
    metric) of `diffs` and every model's T - T_shuffled of `gaps`. -> (raw, adjusted), keyed
    (difference, metric) and ("T − T_shuffled", model)."""
    raw = {(d, k): paired_pvalue(t) for d, per in diffs.items() for k, t in per.items()}
    raw.update({("T − T_shuffled", n): paired_pvalue(t) for n, t in gaps.items()})
    return raw, holm(raw)


def _p(x):
    return "—" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def format_pvalues(diffs, gaps, raw, adjusted, metrics=DIFF_METRICS):
    """Markdown: the paired t-test p-values of every interval, raw / Holm-adjusted."""
    keys = [k for k in metrics if k in next(iter(diffs.values()), {})]
    m = sum(p is not None for p in raw.values())
    lines = [f"Paired t-test p-values, raw / Holm-adjusted over the family of all {m} intervals "
             "of this report (every difference × metric above and every model's T − T_shuffled "
             "below):", "", f"| difference | {' | '.join(metrics[k] for k in keys)} |",
             "|---" * (len(keys) + 1) + "|"]
    for name in diffs:
        cells = " | ".join(f"{_p(raw[name, k])} / {_p(adjusted.get((name, k)))}" for k in keys)
        lines.append(f"| {name} | {cells} |")
    for n in gaps:
        key = ("T − T_shuffled", n)
        lines.append(f"| T − T_shuffled, {n} | {_p(raw[key])} / {_p(adjusted.get(key))} |"
                     + " |" * (len(keys) - 1))
    return "\n".join(lines)


def format_null(mean, std, gaps, raw, adjusted):
    """Markdown: transfer T against the shuffled-image null, per split, the top-1 agreement
    with the oracle of the handoff, the shuffled handoff and the blind teacher, and the raw KLs
    from the oracle (nats), mean ± population std over seeds; then T − T_shuffled paired over
    seeds (interval and Holm p)."""
    models = [n for n, m in mean.items() if "transfer_shuffled" in m]
    if not models:
        return ""
    f2 = lambda n, k: f"{mean[n][k]:.2f} ± {std[n][k]:.2f}" if k in mean[n] else "—"
    pc = lambda n, k: f"{100 * mean[n][k]:.1f} ± {100 * std[n][k]:.1f}" if k in mean[n] else "—"
    splits = [sp for sp in ("", "_seen", "_unseen") if f"transfer_shuffled{sp}" in mean[models[0]]]
    head = [f"T{sp.replace('_', ' ')}" for sp in splits] + \
        [f"T_shuffled{sp.replace('_', ' ')}" for sp in splits]
    lines = ["Transfer T against the shuffled-image null (the same student and prompts, each "
             "image another entity's: eval.shuffled_items), mean ± population std over seeds; "
             "top-1: how often the teacher's argmax is the oracle's (points):", "",
             "| model | " + " | ".join(head) + " | top-1 handoff | top-1 shuffled | top-1 blind |",
             "|---" * (len(head) + 4) + "|"]
    for n in models:
        cells = [f2(n, f"transfer{sp}") for sp in splits] + \
            [f2(n, f"transfer_shuffled{sp}") for sp in splits] + \
            [pc(n, k) for k in ("transfer_top1", "transfer_top1_shuffled", "transfer_top1_blind")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    kls = [(f"kl_{w}{sp}", f"KL(o‖{w[0]}){sp.replace('_', ' ')}") for sp in splits
           for w in ("handoff", "blind", "shuffled")]
    lines += ["", "Raw KLs from the oracle's next-token distribution, nats (mean ± population "
              "std over seeds): o = oracle (the image's words), h = handoff, b = blind (no "
              "image), s = shuffled image:", "",
              "| model | " + " | ".join(h for _, h in kls) + " |", "|---" * (len(kls) + 1) + "|"]
    f3 = lambda n, k: f"{mean[n][k]:.3f} ± {std[n][k]:.3f}" if k in mean[n] else "—"
    lines += [f"| {n} | " + " | ".join(f3(n, k) for k, _ in kls) + " |" for n in models]
    lines += ["", "T − T_shuffled, paired over seeds (± = the 95 % interval's half-width; p: "
              "raw / Holm over the report's family):", "",
              "| model | T − T_shuffled | p | per seed |", "|---|---|---|---|"]
    for n, t in gaps.items():
        key = ("T − T_shuffled", n)
        ci = (f"{t['mean']:+.2f} (n=1, no interval)" if t["half_width"] is None else
              f"{t['mean']:+.2f} ± {t['half_width']:.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}]")
        per = " / ".join(f"{x:+.2f}" for x in t["diffs"])
        lines.append(f"| {n} | {ci} | {_p(raw[key])} / {_p(adjusted.get(key))} | {per} |")
    return "\n".join(lines)


# The pre-stated rule (RESULTS.md, "Is it the handoff?"): the handoff adds something in a world
# only if LinguDistill beats both text-replay forms on recovery at equal vision, and the
# LinguDistill student's T beats the shuffled-image null.
RULE_BASELINES = ("text-replay KD (own text)", "text-replay KD (student KV)")
RULE_VISION_FLOOR = -0.02         # "equal vision": the vision difference's interval above -2 points
RULE_N = 10


def decide(diffs, gaps, adjusted, ref="LinguDistill", n_required=RULE_N):
    """The rule's outcome -> (verdict, [reasons]). Each part needs the 95 % interval above its
    bound and, where a p-value applies, Holm p < 0.05; decided only at n >= n_required."""
    parts = []
    for b in RULE_BASELINES:
        d = diffs.get(f"{ref} − {b}")
        if d is None:
            return "not decided", [f"no {b} in these rows"]
        rec, vis = d["recovery"], d["vision"]
        p = adjusted.get((f"{ref} − {b}", "recovery"))
        ok = rec["lo"] is not None and rec["lo"] > 0 and p is not None and p < 0.05
        okv = vis["lo"] is not None and vis["lo"] > RULE_VISION_FLOOR
        parts.append((ok and okv, f"{ref} − {b}: recovery {format_interval(rec)} (Holm p "
                                  f"{_p(p)}), vision {format_interval(vis)}"))
    g = gaps.get(ref)
    if g is None:
        return "not decided", [f"no T_shuffled for {ref}"]
    p = adjusted.get(("T − T_shuffled", ref))
    okg = g["lo"] is not None and g["lo"] > 0 and p is not None and p < 0.05
    parts.append((okg, f"T − T_shuffled of {ref}: {g['mean']:+.2f}"
                  + ("" if g["lo"] is None else f" [{g['lo']:+.2f}, {g['hi']:+.2f}]")
                  + f" (Holm p {_p(p)})"))
    n = g["n"]
    reasons = [("met: " if ok else "not met: ") + r for ok, r in parts]
    if n < n_required:
        return f"not decided (n = {n} < {n_required}, the rule's n)", reasons
    return ("the handoff adds something" if all(ok for ok, _ in parts)
            else "the handoff adds nothing measurable"), reasons


def format_per_seed(per_seed, seeds):
    """Markdown: language, vision, recovery (points) and transfer T (eval.transfer) of every
    model, seed by seed."""
    cell = lambda n, k, scale=100, digits=1: " / ".join(
        f"{scale * s[n][k]:.{digits}f}" if k in s[n] else "—" for s in per_seed)
    lines = [f"Per seed ({' / '.join(map(str, seeds))}):", "",
             "| model | language | vision | recovery | transfer T |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {cell(n, 'acc')} | {cell(n, 'vision')} | {cell(n, 'recovery')} | "
              f"{cell(n, 'transfer', 1, 2)} |" for n in per_seed[0]]
    return "\n".join(lines)


def format_transfer(mean, std):
    """Markdown: transfer T (eval.transfer) overall and per split of knowledge VQA (entities
    seen / unseen in its training), and the handoff's top-1 agreement with the oracle (points),
    mean ± std over seeds, for every model that has it."""
    keys = [("transfer", "T"), ("transfer_seen", "T seen"), ("transfer_unseen", "T unseen"),
            ("transfer_top1", "top-1")]
    lines = ["Transfer T by split (mean ± std over seeds):", "",
             "| model | " + " | ".join(h for _, h in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in mean.items():
        if "transfer" in m:
            cells = [f"{m[k]:.2f} ± {std[name][k]:.2f}" if k != "transfer_top1" else
                     f"{100 * m[k]:.1f} ± {100 * std[name][k]:.1f}" for k, _ in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(mean, std, path):
    """Language vs vision per model (mean ± std over seeds) as a PNG, if matplotlib is
    installed: the merges as one line labelled by λ, the teacher's language as a dashed line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    merges = [n for n in mean if n.startswith("merge ")]
    for name, m in mean.items():
        if "vision" in m and name not in merges:
            ax.errorbar(100 * m["vision"], 100 * m["acc"], xerr=100 * std[name]["vision"],
                        yerr=100 * std[name]["acc"], fmt="o", capsize=3, label=name)
    if merges:                                   # the line starts at the adapted model (λ=0)
        line = [("λ=0", mean["adapted"])] * ("adapted" in mean) + \
            [(n.split(" ", 1)[1], mean[n]) for n in merges]
        xs = [100 * m["vision"] for _, m in line]
        ys = [100 * m["acc"] for _, m in line]
        ax.plot(xs, ys, "s-", color="black", alpha=0.6, label="merge toward teacher")
        for (lam, _), x, y in zip(line, xs, ys):
            ax.annotate(lam, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(100 * mean["teacher"]["acc"], color="grey", linestyle="--",
               label="teacher (language)")
    ax.set_xlabel("vision VQA accuracy (%)")
    ax.set_ylabel("language multiple-choice accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(seeds, train_argv, per_seed, seconds):
    """(experiment.md text, experiment.json object) from the per-seed rows."""
    mean, std = aggregate(per_seed)
    diffs = paired_differences(per_seed, mean)
    gaps = transfer_differences(per_seed)
    raw, adjusted = family_pvalues(diffs, gaps)
    verdict, reasons = decide(diffs, gaps, adjusted) if "LinguDistill" in mean else ("", [])
    rec = " | ".join(f"{n}: {100 * mean[n]['recovery']:.0f} ± {100 * std[n]['recovery']:.0f}%"
                     for n in mean if n not in ("teacher", "adapted"))
    rule = (f"The pre-stated rule (RESULTS.md): {verdict}.\n" + "\n".join(f"- {r}" for r in reasons)
            + "\n\n") if verdict else ""
    text = (f"Test items (the validation split's entities excluded); mean ± population std over "
            f"{len(seeds)} seed(s):\n\n{evaluation.format_table(mean, std)}\n\n"
            f"Recovery of the language drop, (model - adapted) / (teacher - adapted): {rec}\n\n"
            f"{format_differences(diffs, mean)}\n\n"
            + (f"{format_pvalues(diffs, gaps, raw, adjusted)}\n\n" if diffs else "")
            + rule
            + (f"{format_null(mean, std, gaps, raw, adjusted)}\n\n" if gaps else
               f"{format_transfer(mean, std)}\n\n")
            + f"{format_per_seed(per_seed, seeds)}\n\n"
            f"seeds {seeds}; train.py {' '.join(train_argv)}; {seconds:.0f}s\n")
    has_merges = any(n.startswith("merge ") for n in mean)
    return text, {"seeds": seeds, "train_argv": train_argv, "per_seed": per_seed, "mean": mean,
                  "std": std, "best_merge": best_merge(mean) if has_merges else None,
                  "paired_differences": diffs, "transfer_differences": gaps,
                  "p_values": {" | ".join(k): v for k, v in raw.items()},
                  "p_holm": {" | ".join(k): v for k, v in adjusted.items()},
                  "rule": {"verdict": verdict, "reasons": reasons}}


def experiment(seeds, train_argv, out_dir, jobs=1, merge_lams=MERGE_LAMS, threads=0,
               teachers_from="", variants=tuple(VARIANTS), results_dir=""):
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    args = [(s, train_argv, out_dir, jobs, merge_lams, threads, teachers_from, tuple(variants),
             results_dir) for s in seeds]
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            per_seed = pool.map(_run_seed_to_file, args)
    else:
        per_seed = [_run_seed_to_file(a) for a in args]
    text, result = report(seeds, train_argv, per_seed, time.time() - t0)
    write_text(os.path.join(out_dir, "experiment.md"), text)
    plot(result["mean"], result["std"], os.path.join(out_dir, "experiment.png"))
    write_json(os.path.join(out_dir, "experiment.json"), result)
    return text


FLAGS = {"seeds": ("0,1,2", "comma list of seeds: one pretrain + adapt + every variant each"),
         "jobs": ("1", "seeds trained at once, in parallel processes"),
         "threads": ("0", "torch threads per seed process (0: CPU cores // --jobs)"),
         "out_dir": ("out/experiment", "seed<N>/ folders, experiment.md / .json / .png"),
         "merge_lams": (",".join(f"{lam:g}" for lam in MERGE_LAMS),
                        "merge toward the teacher at these λ (empty: no merges)"),
         "teachers_from": ("", "reuse each seed's teacher from DIR/seed<N>/teacher (no stage 1)"),
         "results_dir": ("", "also write each finished seed<N>.json here, and read finished seeds "
                         "back from here first (a tracked folder, e.g. docs/seeds/i31-default: "
                         "commit each file as it lands)"),
         "variants": (",".join(slug(n) for n in VARIANTS),
                      "comma list of the distill variants to train (slugs), e.g. "
                      "ce-only,lingudistill,text-replay-kd-own-text,text-replay-kd-student-kv")}


def main(argv):
    if toolflags.asks_help(argv, __doc__.split("\n\n")[1], FLAGS):
        return
    opts, train_argv = toolflags.parse(argv, FLAGS, reserved=("seed", "stage", "variant",
                                                               "policy", "scope", "kd_sources"))
    by_slug = {slug(n): n for n in VARIANTS}
    asked = [v for v in opts["variants"].split(",") if v]
    unknown = [v for v in asked if v not in by_slug]
    if unknown or not asked:
        raise ValueError(f"--variants={opts['variants']}: expected a comma list of "
                         f"{', '.join(by_slug)}")
    variants = [n for n in VARIANTS if n in {by_slug[v] for v in asked}]     # VARIANTS' order
    try:
        seeds = [int(s) for s in opts["seeds"].split(",")]
        jobs, threads = int(opts["jobs"]), int(opts["threads"])
        lams = [float(x) for x in opts["merge_lams"].split(",") if x]
    except ValueError:
        raise ValueError(f"--seeds={opts['seeds']} --jobs={opts['jobs']} "
                         f"--threads={opts['threads']} --merge_lams={opts['merge_lams']}: expected "
                         "a comma list of integers, two integers and a comma list of "
                         "numbers") from None
    if jobs < 1 or threads < 0:
        raise ValueError(f"--jobs={jobs} --threads={threads}: expected >= 1 and >= 0")
    if not all(0 <= lam <= 1 for lam in lams):
        raise ValueError(f"--merge_lams={opts['merge_lams']}: expected numbers in [0, 1]")
    train.get_config(train_argv)                  # bad train flags fail before any work
    print(experiment(seeds, train_argv, opts["out_dir"], jobs, lams, threads,
                     opts["teachers_from"], variants, opts["results_dir"]))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:      # bad input: one line, not a traceback
        sys.exit(f"tools/experiment.py: {e}")
