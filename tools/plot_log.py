"""
Plot a run's log.jsonl: the loss (and its CE / KD parts) of every stage against the step, one
panel per stage, with each stage's wall time in its title. Needs matplotlib (requirements-dev.txt).

    python tools/plot_log.py out/log.jsonl                 # writes out/log.png
    python tools/plot_log.py out/log.jsonl --out=run.png
"""
import argparse
import json
import os
import sys


def read_log(path):
    """{stage: {"step": [...], "loss": [...], "ce": [...], "kd": [...], "wall_s": float}} from
    train.py's log.jsonl (one record per step; "time" = seconds since the stage started, so the
    last record's time is the stage's wall time)."""
    stages = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                s = stages.setdefault(r["stage"], {"step": [], "loss": [], "ce": [], "kd": [],
                                                   "wall_s": None})
                s["step"].append(r["step"])
                s["wall_s"] = r["time"]
                for k in ("loss", "ce", "kd"):
                    s[k].append(r.get(k))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {n}: not a train.py log record ({e})") from None
    if not stages:
        raise ValueError(f"{path}: no records; expected train.py's log.jsonl")
    return stages


def plot(stages, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], stages.items()):
        for k in ("loss", "ce", "kd"):
            if any(v is not None for v in s[k]) and (k == "loss" or any(s["kd"])):
                ax.plot(s["step"], s[k], label=k, lw=1)
        wall = f", {s['wall_s']:.0f} s"
        ax.set(title=f"{name}{wall}", xlabel="step", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("log", help="a train.py log.jsonl")
    p.add_argument("--out", default="", help="PNG to write (default: beside the log, log.png)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("plot_log.py: needs matplotlib (pip install -r requirements-dev.txt)")
    try:
        stages = read_log(args.log)
    except (OSError, ValueError) as e:
        sys.exit(f"plot_log.py: {e}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.log)), "log.png")
    print(f"wrote {plot(stages, out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
