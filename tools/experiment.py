"""
The miniature experiment: seeds x {teacher, adapted, CE-only, uniform KD, text-only teacher
KD, LinguDistill, weight merges}, every model on the tiny world's benchmarks, mean ± std over
seeds, and paired per-seed differences of LinguDistill against each baseline with 95 %
t-intervals.

  python tools/experiment.py --seeds=0,1,2 [--jobs=3] [--threads=0] [--out_dir=out/experiment]
                             [--merge_lams=0.25,0.5,0.75] [--teachers_from=DIR] [TRAIN FLAGS]
  python tools/experiment.py --help           # every flag, its default and what it does

Every VLM also gets the transfer measure T (eval.transfer: does the frozen teacher see the
image through the KV handoff? 1 = as if it read the image's words, 0 = as if no image);
--tower=oracle runs the positive control (oracle.py).

The weight-merging baseline (no training): the adapted decoder interpolated toward the
teacher, theta = (1 - lam) * theta_adapted + lam * theta_teacher (merge_toward_teacher);
--merge_lams= (empty) leaves it out.

A finished seed is not trained or evaluated again: its seed<N>.json is read back when it was
made with the same train flags and merges, so a re-run in the same --out_dir (more seeds, or
after an interruption) only does what is missing. --teachers_from=DIR takes each seed's teacher
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
from runtime import write_json, write_text  # noqa: E402

VARIANTS = {                                   # name -> train.py overrides for stage 3
    "CE-only": ["--policy=none", "--scope=full"],
    "uniform KD": ["--policy=uniform", "--scope=full"],
    "text-only teacher KD": ["--policy=selective", "--scope=none"],
    "LinguDistill": ["--policy=selective", "--scope=full"],
}
MERGE_LAMS = (0.25, 0.5, 0.75)
BASELINES = ("CE-only", "text-only teacher KD", "uniform KD")    # LinguDistill minus each of these
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


def train_variant(base_argv, name):
    """Stage 3 of one VARIANTS entry from the adapted model in base_argv's --out_dir -> the
    distilled model (folder distilled-<name as a slug>)."""
    slug = name.lower().replace(" ", "-")
    models, _, _ = train.run(train.get_config(base_argv + ["--stage=distill", f"--variant={slug}"]
                                              + VARIANTS[name]))
    return models[f"distilled-{slug}"]


def run_seed(seed, train_argv, out_dir, merge_lams=MERGE_LAMS, teachers_from=""):
    """Pretrain + adapt once, then every distill variant from the same adapted model, and the
    merges of the adapted model toward the teacher; eval all. With teachers_from, the teacher
    is copied from teachers_from/seed<N>/teacher and stage 1 is not run."""
    # --resume: a re-run in the same --out_dir continues where an interrupted one stopped
    resume = [] if any(a.startswith("--resume") for a in train_argv) else ["--resume=true"]
    seed_dir = os.path.join(out_dir, f"seed{seed}")
    base = train_argv + resume + [f"--seed={seed}", f"--out_dir={seed_dir}", "--eval=false"]
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
    for name in VARIANTS:
        rows_models[name] = train_variant(base, name)
    for lam in merge_lams:
        rows_models[merge_name(lam)] = merge_toward_teacher(rows_models["adapted"], teacher, lam)
    cfg = train.get_config(base)
    rows = evaluation.evaluate_models(rows_models, world, tok, cfg.image_size, teacher=teacher)
    for name, row in rows.items():
        drop = rows["teacher"]["acc"] - rows["adapted"]["acc"]
        row["recovery"] = (row["acc"] - rows["adapted"]["acc"]) / drop if drop > 0 else float("nan")
    return rows


def _run_seed_to_file(args):
    seed, train_argv, out_dir, jobs, merge_lams, threads, teachers_from = args
    path = os.path.join(out_dir, f"seed{seed}.json")
    made_by = {"train_argv": list(train_argv), "merge_lams": list(merge_lams)}
    if os.path.isfile(path):                     # a finished seed of the same experiment
        with open(path) as f:
            done = json.load(f)
        if {k: done.get(k) for k in made_by} == made_by:
            return done["rows"]
    # share the cores between seeds (CPU float results, hence the models, depend on it)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // jobs))
    rows = run_seed(seed, train_argv, out_dir, merge_lams, teachers_from)
    write_json(path, {**made_by, "rows": rows})
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


def best_merge(mean, ref="LinguDistill", slack=VISION_SLACK):
    """The merge at equal or better vision than `ref`: among the merges whose mean vision is
    >= ref's mean vision - slack, the one with the highest mean language (None if none)."""
    ok = [n for n in mean if n.startswith("merge ")
          and mean[n]["vision"] >= mean[ref]["vision"] - slack - 1e-9]
    return max(ok, key=lambda n: mean[n]["acc"]) if ok else None


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
        floor = 100 * (mean[ref]["vision"] - VISION_SLACK)
        if merge:
            lines.append(f"Best merge at equal or better vision (mean vision >= {floor:.1f}, "
                         f"{ref}'s minus 1 point; highest mean language): {merge} (language "
                         f"{100 * mean[merge]['acc']:.1f}, vision "
                         f"{100 * mean[merge]['vision']:.1f}).")
        elif any(f"{ref} − {m}" in diffs for m in merges):
            lines.append(f"No merge has mean vision >= {floor:.1f} ({ref}'s minus 1 point): "
                         "the merges below are compared at lower vision.")
        else:
            lines.append(f"No merge has mean vision >= {floor:.1f} ({ref}'s minus 1 point): "
                         f"no merge comparison ({', '.join(merges)}).")
    if not keys:
        return "\n".join(lines + ["", f"No baseline beside {ref}: no paired differences."])
    lines += ["", "Paired differences (same seed), points, mean ± t_{0.975,n-1} · s / √n "
              "[95 % interval] (s: sample std over seeds):", "",
              f"| difference | {' | '.join(metrics[k] for k in keys)} | {metrics[keys[0]]} per "
              "seed |", "|---" * (len(keys) + 2) + "|"]
    for name, d in diffs.items():
        per = " / ".join(f"{100 * x:+.1f}" for x in d[keys[0]]["diffs"])
        cells = " | ".join(format_interval(d[k]) for k in keys)
        lines.append(f"| {name} | {cells} | {per} |")
    return "\n".join(lines)


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
    rec = " | ".join(f"{n}: {100 * mean[n]['recovery']:.0f} ± {100 * std[n]['recovery']:.0f}%"
                     for n in mean if n not in ("teacher", "adapted"))
    text = (f"{evaluation.format_table(mean, std)}\n\n"
            f"mean ± std over {len(seeds)} seed(s) (population std). Recovery of the language "
            f"drop, (model - adapted) / (teacher - adapted): {rec}\n\n"
            f"{format_differences(diffs, mean)}\n\n{format_transfer(mean, std)}\n\n"
            f"{format_per_seed(per_seed, seeds)}\n\n"
            f"seeds {seeds}; train.py {' '.join(train_argv)}; {seconds:.0f}s\n")
    has_merges = any(n.startswith("merge ") for n in mean)
    return text, {"seeds": seeds, "train_argv": train_argv, "per_seed": per_seed, "mean": mean,
                  "std": std, "best_merge": best_merge(mean) if has_merges else None,
                  "paired_differences": diffs}


def experiment(seeds, train_argv, out_dir, jobs=1, merge_lams=MERGE_LAMS, threads=0,
               teachers_from=""):
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    args = [(s, train_argv, out_dir, jobs, merge_lams, threads, teachers_from) for s in seeds]
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
         "teachers_from": ("", "reuse each seed's teacher from DIR/seed<N>/teacher (no stage 1)")}


def main(argv):
    if toolflags.asks_help(argv, __doc__.split("\n\n")[1], FLAGS):
        return
    opts, train_argv = toolflags.parse(argv, FLAGS, reserved=("seed", "stage", "variant",
                                                               "policy", "scope"))
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
                     opts["teachers_from"]))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:      # bad input: one line, not a traceback
        sys.exit(f"tools/experiment.py: {e}")
