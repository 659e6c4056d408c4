"""
Evaluation: does LinguDistill restore language without costing vision?

  python eval.py --ckpt=out/distilled-selective-full     # one model on the tiny world's benchmarks
  python eval.py --experiment                            # >= 3 seeds x all variants -> table (md + json)
  python eval.py --mc=questions.json --ckpt=HF_FOLDER    # multiple-choice JSON/JSONL by log-likelihood

Metrics
- multiple choice by log-likelihood (HellaSwag/ARC style): the option with the highest
  mean log-probability per token (length-normalised) wins;
- VQA exact match of greedy generation. Computed in one teacher-forced pass: greedy decoding
  reproduces the reference answer (+ EOS) exactly iff the argmax at every answer position
  is the reference token, so the two are the same number;
- perplexity on text;
- teacher-through-handoff (diagnostic): the frozen teacher answering knowledge VQA from the
  student's image KV (kvshare.teacher_continue). If it is at chance, KD on image-grounded
  sources cannot help.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import data
import kvshare
from model import VLM


def response_logits(model, batch):
    """Logits predicting each response token, (B, R, V), for a VLM or a text-only Decoder."""
    P, R = batch["context_len"], batch["labels"].shape[1]
    if isinstance(model, VLM):
        logits, _ = model(batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"],
                          logits_start=P - 1)
    else:
        if batch["images"] is not None:
            raise ValueError("a text-only model cannot be evaluated on image examples")
        logits, _ = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_start=P - 1)
    return logits[:, :R].float()


def batches(examples, tok, n_image_tokens, image_size, batch_size, device):
    for i in range(0, len(examples), batch_size):
        b = data.collate(examples[i:i + batch_size], tok, n_image_tokens, image_size)
        yield {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


def image_tokens(model):
    return model.n_image_tokens if isinstance(model, VLM) else 0


@torch.no_grad()
def multiple_choice(model, items, tok, image_size=32, batch_size=64):
    """Accuracy over items {"context", "options", "answer", ["split"]}: overall and per split."""
    device = next(model.parameters()).device
    flat = [{"image": None, "prompt": it["context"], "response": opt, "source": "mc"}
            for it in items for opt in it["options"]]
    scores = []
    for b in batches(flat, tok, image_tokens(model), image_size, batch_size, device):
        logp = F.log_softmax(response_logits(model, b), -1).gather(-1, b["labels"][..., None])[..., 0]
        m = b["response_mask"].clone()
        m[torch.arange(m.shape[0], device=m.device), m.sum(1) - 1] = False          # score the option, not the EOS
        scores += ((logp * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
    correct, per_split, k = [], {}, 0
    for it in items:
        n = len(it["options"])
        ok = max(range(n), key=lambda j: scores[k + j]) == it["answer"]
        k += n
        correct.append(ok)
        per_split.setdefault(it.get("split", "all"), []).append(ok)
    out = {"acc": sum(correct) / max(1, len(correct))}
    out.update({f"acc_{s}": sum(v) / len(v) for s, v in per_split.items() if s != "all"})
    return out


def _exact_match(logits, batch):
    hit = (logits.argmax(-1) == batch["labels"]) | ~batch["response_mask"]
    return hit.all(1).tolist()


@torch.no_grad()
def vqa_accuracy(model, items, tok, image_size=32, batch_size=64):
    """Exact match of greedy generation (see the module docstring) over VQA examples."""
    device = next(model.parameters()).device
    hits = []
    for b in batches(items, tok, image_tokens(model), image_size, batch_size, device):
        hits += _exact_match(response_logits(model, b), b)
    return sum(hits) / max(1, len(hits))


@torch.no_grad()
def teacher_handoff_accuracy(student, teacher, items, tok, image_size=32, scope="full", batch_size=64):
    """Exact match of the frozen teacher's greedy answer when it reads the student's KV."""
    device = next(student.parameters()).device
    hits = []
    for b in batches(items, tok, student.n_image_tokens, image_size, batch_size, device):
        _, kv = kvshare.student_prefill(student, b)
        hits += _exact_match(kvshare.teacher_continue(teacher, kv, b, student.image_token_id, scope).float(), b)
    return sum(hits) / max(1, len(hits))


@torch.no_grad()
def perplexity(model, texts, tok, batch_size=32):
    """exp(mean next-token NLL) over texts (each scored as a response to an empty-ish context)."""
    device = next(model.parameters()).device
    examples = [{"image": None, "prompt": t.split(" ", 1)[0], "response": " " + t.split(" ", 1)[1], "source": "text"}
                for t in texts if " " in t]
    nll, n = 0.0, 0
    for b in batches(examples, tok, image_tokens(model), 32, batch_size, device):
        logits = response_logits(model, b)
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
        nll += float((loss * b["response_mask"].flatten()).sum())
        n += int(b["response_mask"].sum())
    return math.exp(nll / max(1, n))


# ----------------------------------------------------------------------------------------
# The table: every model on the tiny world's benchmarks

def evaluate_models(models, world, tok, image_size, teacher=None):
    """One row per model: language MC (overall, seen/unseen), vision VQA, knowledge VQA and
    the teacher-through-handoff diagnostic (for every VLM)."""
    teacher = teacher or models.get("teacher")
    if teacher is not None:
        kvshare.freeze(teacher)
    rows = {}
    for name, model in models.items():
        model.eval()
        row = multiple_choice(model, world.language_bench, tok, image_size)
        if isinstance(model, VLM):
            row["vision"] = vqa_accuracy(model, world.vision_bench, tok, image_size)
            row["knowledge_vqa"] = vqa_accuracy(model, world.knowledge_bench, tok, image_size)
            if teacher is not None:
                row["teacher_handoff"] = teacher_handoff_accuracy(model, teacher, world.knowledge_bench, tok,
                                                                  image_size)
        rows[name] = row
    return rows


COLUMNS = [("acc", "language"), ("acc_seen", "lang seen"), ("acc_unseen", "lang unseen"), ("vision", "vision"),
           ("knowledge_vqa", "knowledge VQA"), ("teacher_handoff", "teacher via handoff"), ("recovery", "recovery")]


def format_table(rows, std=None):
    """Markdown table; `std` (same shape as rows) adds ± columns for multi-seed means."""
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows.values())]
    lines = ["| model | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for k, _ in cols:
            if k not in r:
                cells.append("—")
            elif std is not None:
                cells.append(f"{100 * r[k]:.1f} ± {100 * std[name][k]:.1f}")
            else:
                cells.append(f"{100 * r[k]:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The experiment: seeds x {teacher, adapted, CE-only, uniform KD, text-only teacher, LinguDistill}

VARIANTS = {                                   # name -> train.py overrides for stage 3
    "CE-only": ["--policy=none", "--scope=full"],
    "uniform KD": ["--policy=uniform", "--scope=full"],
    "text-only teacher KD": ["--policy=selective", "--scope=none"],
    "LinguDistill": ["--policy=selective", "--scope=full"],
}


def run_seed(seed, train_argv, out_dir):
    """Pretrain + adapt once, then every distill variant from the same adapted model; eval all."""
    import train
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
    rows = evaluate_models(rows_models, world, tok, cfg.image_size, teacher=teacher)
    for name, row in rows.items():
        drop = rows["teacher"]["acc"] - rows["adapted"]["acc"]
        row["recovery"] = (row["acc"] - rows["adapted"]["acc"]) / drop if drop > 0 else float("nan")
    return rows


def _run_seed_to_file(args):
    seed, train_argv, out_dir, jobs = args
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // jobs))       # share the cores between parallel seeds
    rows = run_seed(seed, train_argv, out_dir)
    with open(os.path.join(out_dir, f"seed{seed}.json"), "w") as f:
        json.dump(rows, f, indent=2)
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


def experiment(seeds, train_argv, out_dir, jobs=1):
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    args = [(s, train_argv, out_dir, jobs) for s in seeds]
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(jobs) as pool:
            per_seed = pool.map(_run_seed_to_file, args)
    else:
        per_seed = [_run_seed_to_file(a) for a in args]
    mean, std = aggregate(per_seed)
    table = format_table(mean, std)
    rec = " | ".join(f"{n}: {100 * mean[n]['recovery']:.0f} ± {100 * std[n]['recovery']:.0f}%"
                     for n in VARIANTS)
    text = (f"{table}\n\nRecovery of the language drop, (distilled - adapted) / (teacher - adapted): {rec}\n"
            f"seeds {seeds}; train.py {' '.join(train_argv)}; {time.time() - t0:.0f}s\n")
    with open(os.path.join(out_dir, "experiment.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "experiment.json"), "w") as f:
        json.dump({"seeds": seeds, "train_argv": train_argv, "per_seed": per_seed, "mean": mean, "std": std}, f,
                  indent=2)
    return text


# ----------------------------------------------------------------------------------------
# Command line

def load_model_folder(folder):
    """A model folder written by train.py: ours (VLM) or Hugging Face layout (decoder)."""
    from weights import read_json, load_vlm, load_hf_lm
    kind = read_json(os.path.join(folder, "config.json")).get("model_type")
    return load_vlm(folder) if kind == "lingudistill_vlm" else load_hf_lm(folder)


def evaluate_folder(folder, teacher_folder=None):
    """Rebuild the tiny world the folder was trained on and evaluate the model in it."""
    import train
    from weights import read_json
    cfg = train.replace(train.TrainConfig(), **read_json(os.path.join(folder, "train_config.json")))
    world, _ = train.build_world_and_tokenizer(cfg)
    tok = data.load_tokenizer(os.path.join(folder, "tokenizer.json"))
    teacher_folder = teacher_folder or os.path.join(os.path.dirname(os.path.abspath(folder)), "teacher")
    teacher = load_model_folder(teacher_folder) if os.path.isdir(teacher_folder) else None
    rows = evaluate_models({os.path.basename(os.path.normpath(folder)): load_model_folder(folder)}, world, tok,
                           cfg.image_size, teacher=teacher)
    return format_table(rows)


def main(argv):
    opts = {"experiment": False, "seeds": "0,1,2", "jobs": "1", "out_dir": "out/experiment", "ckpt": None,
            "teacher": None}
    train_argv = []
    for arg in argv:
        key, eq, val = arg[2:].partition("=")
        if arg.startswith("--") and key in opts:
            opts[key] = val if eq else True
        else:
            train_argv.append(arg)                # passed to train.py (validated there)
    if opts["experiment"]:
        seeds = [int(s) for s in opts["seeds"].split(",")]
        print(experiment(seeds, train_argv, opts["out_dir"], int(opts["jobs"])))
    elif opts["ckpt"]:
        if train_argv:
            sys.exit(f"eval.py: unknown argument(s) {train_argv} with --ckpt")
        print(evaluate_folder(opts["ckpt"], opts["teacher"]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
