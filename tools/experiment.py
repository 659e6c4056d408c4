"""
The miniature experiment: seeds x {teacher, adapted, CE-only, uniform KD, text-only teacher
KD, LinguDistill}, every model on the tiny world's benchmarks, mean ± std over seeds.

  python tools/experiment.py --seeds=0,1,2 [--jobs=3] [--out_dir=out/experiment] [TRAIN FLAGS]

Every other flag goes to train.py (e.g. --device=cuda, --align_steps=1000). Writes
experiment.md, experiment.json (per seed, mean, std) and, if matplotlib is installed,
experiment.png (language vs vision per model) to --out_dir.
"""
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval as evaluation  # noqa: E402
import train  # noqa: E402
from weights import atomic_write, write_json  # noqa: E402

VARIANTS = {                                   # name -> train.py overrides for stage 3
    "CE-only": ["--policy=none", "--scope=full"],
    "uniform KD": ["--policy=uniform", "--scope=full"],
    "text-only teacher KD": ["--policy=selective", "--scope=none"],
    "LinguDistill": ["--policy=selective", "--scope=full"],
}


def run_seed(seed, train_argv, out_dir):
    """Pretrain + adapt once, then every distill variant from the same adapted model; eval all."""
    base = train_argv + [f"--seed={seed}", f"--out_dir={os.path.join(out_dir, f'seed{seed}')}", "--eval=false"]
    models, world, tok = train.run(train.get_config(base + ["--stage=pretrain"]))
    teacher = models["teacher"]
    models, _, _ = train.run(train.get_config(base + ["--stage=adapt"]))
    rows_models = {"teacher": teacher, "adapted": models["adapted"]}
    for name, argv in VARIANTS.items():
        slug = name.lower().replace(" ", "-")
        models, _, _ = train.run(train.get_config(base + ["--stage=distill", f"--variant={slug}"] + argv))
        rows_models[name] = models[f"distilled-{slug}"]
    cfg = train.get_config(base)
    rows = evaluation.evaluate_models(rows_models, world, tok, cfg.image_size, teacher=teacher)
    for name, row in rows.items():
        drop = rows["teacher"]["acc"] - rows["adapted"]["acc"]
        row["recovery"] = (row["acc"] - rows["adapted"]["acc"]) / drop if drop > 0 else float("nan")
    return rows


def _run_seed_to_file(args):
    seed, train_argv, out_dir, jobs = args
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // jobs))       # share the cores between parallel seeds
    rows = run_seed(seed, train_argv, out_dir)
    write_json(os.path.join(out_dir, f"seed{seed}.json"), rows)
    return rows


def aggregate(per_seed):
    """Mean and (population) std over seeds of every metric of every model."""
    names = list(per_seed[0])
    mean, std = {}, {}
    for n in names:
        keys = per_seed[0][n].keys()
        vals = {k: [s[n][k] for s in per_seed] for k in keys}
        mean[n] = {k: sum(v) / len(v) for k, v in vals.items()}
        std[n] = {k: (sum((x - mean[n][k]) ** 2 for x in v) / len(v)) ** 0.5 for k, v in vals.items()}
    return mean, std


def plot(mean, std, path):
    """Language vs vision per model (mean ± std over seeds) as a PNG, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, m in mean.items():
        if "vision" in m:
            ax.errorbar(100 * m["vision"], 100 * m["acc"], xerr=100 * std[name]["vision"],
                        yerr=100 * std[name]["acc"], fmt="o", capsize=3, label=name)
    ax.axhline(100 * mean["teacher"]["acc"], color="grey", linestyle="--", label="teacher (language)")
    ax.set_xlabel("vision VQA accuracy (%)")
    ax.set_ylabel("language multiple-choice accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def experiment(seeds, train_argv, out_dir, jobs=1):
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    args = [(s, train_argv, out_dir, jobs) for s in seeds]
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            per_seed = pool.map(_run_seed_to_file, args)
    else:
        per_seed = [_run_seed_to_file(a) for a in args]
    mean, std = aggregate(per_seed)
    table = evaluation.format_table(mean, std)
    rec = " | ".join(f"{n}: {100 * mean[n]['recovery']:.0f} ± {100 * std[n]['recovery']:.0f}%"
                     for n in VARIANTS)
    text = (f"{table}\n\nRecovery of the language drop, (distilled - adapted) / (teacher - adapted): {rec}\n"
            f"seeds {seeds}; train.py {' '.join(train_argv)}; {time.time() - t0:.0f}s\n")
    atomic_write(os.path.join(out_dir, "experiment.md"), lambda tmp: open(tmp, "w").write(text))
    plot(mean, std, os.path.join(out_dir, "experiment.png"))
    write_json(os.path.join(out_dir, "experiment.json"),
               {"seeds": seeds, "train_argv": train_argv, "per_seed": per_seed, "mean": mean,
                "std": std})
    return text


def main(argv):
    opts = {"seeds": "0,1,2", "jobs": "1", "out_dir": "out/experiment"}
    train_argv = []
    for arg in argv:
        key, eq, val = arg[2:].partition("=")
        if arg.startswith("--") and key in opts:
            if not eq:
                raise ValueError(f"--{key}: expected --{key}=value")
            opts[key] = val
        else:
            train_argv.append(arg)                # passed to train.py, validated here first
    try:
        seeds = [int(s) for s in opts["seeds"].split(",")]
        jobs = int(opts["jobs"])
    except ValueError:
        raise ValueError(f"--seeds={opts['seeds']} --jobs={opts['jobs']}: expected a comma list "
                         "of integers and an integer") from None
    if jobs < 1:
        raise ValueError(f"--jobs={jobs}: expected >= 1")
    train.get_config(train_argv)                  # bad train flags fail before any work
    print(experiment(seeds, train_argv, opts["out_dir"], jobs))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:      # bad input: one line, not a traceback
        sys.exit(f"tools/experiment.py: {e}")
