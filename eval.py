"""
Evaluation: does LinguDistill restore language without costing vision?

  python eval.py --ckpt=out/distilled-selective-full     # one model on the tiny world's benchmarks
  python eval.py --experiment                            # >= 3 seeds x all variants -> table (md + json)
  python eval.py --mc=questions.json --ckpt=HF_FOLDER    # multiple-choice JSON/JSONL by log-likelihood
        [--batch_size=16] [--limit=N]                    # (lm-eval's MMLU _cot_prompts.json works as is)
  python eval.py --demo_photo=LM_FOLDER [--photos=a.png,b.jpg | --photos=scikit_image-*.whl] [--image_size=64]
                                                         # real photos -> student VLM -> KV handoff -> real teacher

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
import re
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
    plot(mean, std, os.path.join(out_dir, "experiment.png"))
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
    name, model = os.path.basename(os.path.normpath(folder)), load_model_folder(folder)
    rows = evaluate_models({name: model}, world, tok, cfg.image_size, teacher=teacher)
    held_out = [it["context"] + it["options"][it["answer"]] for it in world.language_bench]
    return format_table(rows) + f"\nperplexity on the language benchmark's correct sentences: " \
        f"{perplexity(model, held_out, tok):.3f}"


def main(argv):
    opts = {"experiment": False, "seeds": "0,1,2", "jobs": "1", "out_dir": "out/experiment", "ckpt": None,
            "teacher": None, "mc": None, "batch_size": "16", "limit": None, "demo_photo": None, "photos": None,
            "image_size": "64"}
    train_argv = []
    for arg in argv:
        key, eq, val = arg[2:].partition("=")
        if arg.startswith("--") and key in opts:
            opts[key] = val if eq else True
        else:
            train_argv.append(arg)                # passed to train.py (validated there)
    if (opts["mc"] or opts["demo_photo"]) and train_argv:
        sys.exit(f"eval.py: unknown argument(s) {train_argv} with --mc / --demo_photo")
    if opts["experiment"]:
        seeds = [int(s) for s in opts["seeds"].split(",")]
        print(experiment(seeds, train_argv, opts["out_dir"], int(opts["jobs"])))
    elif opts["mc"]:
        if not opts["ckpt"]:
            sys.exit("eval.py: --mc=FILE needs --ckpt=MODEL_FOLDER (with its tokenizer.json)")
        items = load_mc_file(opts["mc"])
        items = items[:int(opts["limit"])] if opts["limit"] else items
        model = load_model_folder(opts["ckpt"])
        tok = data.load_tokenizer(os.path.join(opts["ckpt"], "tokenizer.json"))
        t0 = time.time()
        r = score_mc(model, tok, items, int(opts["batch_size"]))
        print(f"{opts['mc']}: accuracy {r['acc']:.4f} ({r['correct']}/{r['n']}), n {r['n']}, "
              f"chance {r['chance']:.4f}, {time.time() - t0:.1f}s")
    elif opts["demo_photo"]:
        photos = opts["photos"]
        if photos and photos.endswith(".whl"):
            paths = skimage_photos(wheel=photos)
        else:
            paths = photos.split(",") if photos else skimage_photos()
        demo_real_photo(opts["demo_photo"], paths, image_size=int(opts["image_size"]))
    elif opts["ckpt"]:
        if train_argv:
            sys.exit(f"eval.py: unknown argument(s) {train_argv} with --ckpt")
        print(evaluate_folder(opts["ckpt"], opts["teacher"]))
    else:
        sys.exit(__doc__)


# ----------------------------------------------------------------------------------------
# Multiple choice from files: lm-eval's MMLU prompt file, or generic JSON / JSONL
#
# Zero-shot format (lm-eval's default MMLU template; the option is the letter, scored by its
# log-likelihood after "Answer:"):
#   The following are multiple choice questions (with answers) about {subject}.\n\n   (if a subject is known)
#   {question}\nA. {choice 0}\nB. {choice 1}\nC. {choice 2}\nD. {choice 3}\nAnswer:
# options " A", " B", " C", " D" (one token each for byte-level BPE: the space belongs to the letter).

LETTERS = "ABCDEFGHIJ"
_MMLU_HEADER = re.compile(r"\s*The following are multiple choice questions \(with answers\) about (.+?)\.\n\n")
_ANSWER = re.compile(r"The answer is \(([A-J])\)")


def mc_item(question, choices, answer, subject=None):
    """-> {"context", "options", "answer", ["subject"]} in the zero-shot format above."""
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    context = header + question.strip() + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"
    item = {"context": context, "options": [f" {LETTERS[i]}" for i in range(len(choices))], "answer": answer}
    return {**item, "subject": subject} if subject else item


def _split_options(text):
    """"(A) x (B) y ..." or one option per line -> [x, y, ...]: markers must come in order
    A, B, C, ... each after a space or newline, so "E(X) = 37" in an option is not a marker."""
    cuts, k = [0], 1
    while k < len(LETTERS):
        hits = [i + 1 for i in (text.find(f" ({LETTERS[k]}) ", cuts[-1]), text.find(f"\n({LETTERS[k]}) ", cuts[-1]))
                if i >= 0]
        if not hits:
            break
        cuts.append(min(hits))
        k += 1
    return [text[a + 4:b].strip() for a, b in zip(cuts, cuts[1:] + [len(text)])]


def _parse_mmlu_prompt(subject, text):
    """One subject of lm-eval's flan_cot_fewshot/_cot_prompts.json: a header, then blocks
    "Q: {question}\\n(A) .. (B) .. (C) .. (D) ..\\nA: Let's think step by step. ... The answer is (X).".
    Options sit on the question's last line(s), starting at its last line that begins with "(A) "."""
    m = _MMLU_HEADER.match(text)
    topic = m.group(1) if m else subject.replace("_", " ")
    blocks = re.split(r"\n\n(?=Q: )", "\n\n" + text[m.end() if m else 0:].strip())[1:]
    if not blocks:
        raise ValueError("no 'Q: ' question found")
    items = []
    for n, block in enumerate(blocks, 1):
        where = f"question {n}"
        q_part, sep, a_part = block.partition("\nA: ")
        if not sep:
            raise ValueError(f"{where}: no '\\nA: ' answer line")
        start = q_part.rfind("\n(A) ")
        if start < 0:
            raise ValueError(f"{where}: no line starting with '(A) ' (the options)")
        options = _split_options(q_part[start + 1:])
        answers = _ANSWER.findall(a_part)
        if len(options) < 2 or not answers:
            raise ValueError(f"{where}: expected >= 2 options '(A) .. (B) ..' and 'The answer is (X)', found "
                             f"{len(options)} option(s) and {'no' if not answers else 'an'} answer")
        answer = LETTERS.index(answers[-1])
        if answer >= len(options):
            raise ValueError(f"{where}: answer ({answers[-1]}) but only {len(options)} options")
        items.append(mc_item(q_part[3:start], options, answer, topic))
    return items


def _generic_mc(obj):
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    q, choices, ans = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(q, str) or not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"expected 'question' (str) and 'choices' (2-{len(LETTERS)} strings), "
                         f"found keys {sorted(obj)}")
    if isinstance(ans, str) and len(ans) == 1 and ans in LETTERS:
        ans = LETTERS.index(ans)
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise ValueError(f"'answer' must be a choice index 0..{len(choices) - 1} or a letter, "
                         f"found {obj.get('answer')!r}")
    subject = obj.get("subject")
    return mc_item(q, choices, ans, subject.replace("_", " ") if isinstance(subject, str) and subject else None)


def load_mc_file(path):
    """Multiple-choice items {"context", "options", "answer"[, "subject"]} from
    - lm-eval's MMLU prompt file (lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json): a JSON
      object subject -> few-shot text; each question becomes one zero-shot item (282 in 0.4.13);
    - generic JSON (a list) or JSONL of {"question", "choices": [...], "answer": index or letter,
      "subject"?}.
    A bad entry is a ValueError naming the file and the subject/question or item/line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        whole, lines = json.loads(text), None
    except json.JSONDecodeError:
        whole, lines = None, [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    items = []
    if isinstance(whole, dict):
        if not whole or not all(isinstance(v, str) for v in whole.values()):
            raise ValueError(f"{path}: expected lm-eval's MMLU prompt shape (subject -> prompt text) or a list of "
                             "{'question', 'choices', 'answer'}")
        for subject, prompt in whole.items():
            try:
                items += _parse_mmlu_prompt(subject, prompt)
            except ValueError as err:
                raise ValueError(f"{path}: subject {subject!r} {err}") from None
    elif isinstance(whole, list):
        for i, obj in enumerate(whole):
            try:
                items.append(_generic_mc(obj))
            except ValueError as err:
                raise ValueError(f"{path}: item {i}: {err}") from None
    elif lines is not None:
        for n, line in lines:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n}: bad JSON ({err.msg}); expected JSON or JSONL") from None
            try:
                items.append(_generic_mc(obj))
            except ValueError as err:
                raise ValueError(f"{path} line {n}: {err}") from None
    else:
        raise ValueError(f"{path}: expected a JSON object, a JSON list or JSONL, found {type(whole).__name__}")
    if not items:
        raise ValueError(f"{path}: no multiple-choice items")
    return items


@torch.no_grad()
def mc_option_scores(model, tok, items, batch_size=16):
    """Per item, the multiple_choice score of each option: mean log-probability of its tokens
    after the context (EOS not scored). Items whose options are single tokens (" A" ...) take ONE
    forward of the context and read the next-token log-probs (4x fewer tokens for MMLU);
    others run every (context, option) row through data.collate as multiple_choice does.
    Rows are sorted by length so batches carry little padding."""
    device = next(model.parameters()).device
    pad = data.special_id(tok, data.PAD_TOKEN)
    ctx = [data.encode_example({"image": None, "prompt": it["context"], "response": "", "source": "mc"}, tok, 0)[0]
           for it in items]
    opt_ids = [[tok.encode(o).ids for o in it["options"]] for it in items]
    scores = [None] * len(items)
    fast = sorted((i for i, ids in enumerate(opt_ids) if all(len(o) == 1 for o in ids)), key=lambda i: len(ctx[i]))
    for s in range(0, len(fast), batch_size):
        rows = fast[s:s + batch_size]
        P = max(len(ctx[i]) for i in rows)
        ids = torch.full((len(rows), P), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, P - len(ctx[i]):], mask[r, P - len(ctx[i]):] = torch.tensor(ctx[i]), 1
        b = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "context_len": P, "images": None,
             "labels": ids[:, :1].to(device)}                         # R = 1: only the next-token logits
        logp = F.log_softmax(response_logits(model, b)[:, 0], -1)
        for r, i in enumerate(rows):
            scores[i] = logp[r, [o[0] for o in opt_ids[i]]].tolist()
    slow = [(i, j) for i in range(len(items)) if scores[i] is None for j in range(len(items[i]["options"]))]
    slow.sort(key=lambda ij: len(ctx[ij[0]]) + len(opt_ids[ij[0]][ij[1]]))
    flat = [{"image": None, "prompt": items[i]["context"], "response": items[i]["options"][j], "source": "mc"}
            for i, j in slow]
    flat_scores = []
    for b in batches(flat, tok, 0, 32, batch_size, device):
        logp = F.log_softmax(response_logits(model, b), -1).gather(-1, b["labels"][..., None])[..., 0]
        m = b["response_mask"].clone()
        m[torch.arange(m.shape[0], device=m.device), m.sum(1) - 1] = False          # score the option, not the EOS
        flat_scores += ((logp * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
    for (i, j), sc in zip(slow, flat_scores):
        if scores[i] is None:
            scores[i] = [None] * len(items[i]["options"])
        scores[i][j] = sc
    return scores


def score_mc(model, tok, items, batch_size=16):
    """Accuracy of picking the highest-scoring option (ties -> the first, as multiple_choice):
    {"acc", "n", "correct", "chance", "pred"}; chance = mean of 1 / number of options."""
    was_training = model.training
    model.eval()
    try:
        scores = mc_option_scores(model, tok, items, batch_size)
    finally:
        model.train(was_training)
    pred = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(p == it["answer"] for p, it in zip(pred, items))
    return {"acc": correct / max(1, len(items)), "n": len(items), "correct": correct,
            "chance": sum(1 / len(it["options"]) for it in items) / max(1, len(items)), "pred": pred}


# ----------------------------------------------------------------------------------------
# Real pixels, real teacher: the handoff code path on photographs and SmolLM2 weights

def skimage_photos(names=("chelsea.png", "coffee.png"), wheel=None, out_dir=None):
    """Paths of real photographs shipped in scikit-image (skimage/data): from the installed
    package, or extracted from a downloaded wheel (pip download --no-deps scikit-image) into out_dir."""
    if wheel is None:
        try:
            import skimage
        except ImportError:
            raise ImportError("no photos: pip install scikit-image, or pass a scikit-image wheel "
                              "(pip download --no-deps scikit-image), or image paths") from None
        return [os.path.join(os.path.dirname(skimage.__file__), "data", n) for n in names]
    import tempfile
    import zipfile
    out_dir = out_dir or tempfile.mkdtemp(prefix="photos-")
    with zipfile.ZipFile(wheel) as z:
        return [z.extract(f"skimage/data/{n}", out_dir) for n in names]


def _top(logits, tok, k):
    p = F.softmax(logits.float(), -1)
    v, i = p.topk(k)
    return ", ".join(f"{tok.decode([j], skip_special_tokens=False)!r} {q:.2f}" for q, j in zip(v.tolist(), i.tolist()))


@torch.no_grad()
def demo_real_photo(lm_folder, image_paths, image_size=64, question="What is in this picture?",
                    response=" This is a picture of", top_k=5, seed=0):
    """Student VLM = the real decoder (lm_folder, e.g. SmolLM2-135M-Instruct) + a tiny RANDOM
    vision tower + a fresh projector; real photos (resized to image_size, squashed to a
    square) in the model's chat format; then the KV handoff to the frozen real teacher (scope
    "full") and, for comparison, the text-only teacher (scope "none"). Untrained vision ->
    the teacher reads noise image KV: this shows the code path, not image understanding.
    Returns a dict of the printed numbers."""
    import resource
    from PIL import Image
    from model import VisionConfig, make_config, VISION_PRESETS, vlm_from_teacher
    from weights import load_hf_lm
    torch.manual_seed(seed)
    t0 = time.time()
    teacher = kvshare.freeze(load_hf_lm(lm_folder))
    tok = data.load_tokenizer(os.path.join(lm_folder, "tokenizer.json"))
    image_id = tok.token_to_id(data.IMAGE_TOKEN)
    student = vlm_from_teacher(teacher, make_config(VisionConfig, VISION_PRESETS, "tiny", image_size=image_size),
                               image_id).eval()
    kvshare.check_compatible(teacher.cfg, student.decoder.cfg)
    t_load = time.time() - t0
    prompt = data.chat_prompt(data.IMAGE_TOKEN + "\n" + question, data.load_chat_template(lm_folder))
    examples = []
    for path in image_paths:
        with Image.open(path) as im:
            examples.append({"image": im.convert("RGB"), "prompt": prompt, "response": response, "source": "demo"})
    batch = data.collate(examples, tok, student.n_image_tokens, image_size)
    t1 = time.time()
    student_logits, kv = kvshare.student_prefill(student, batch)
    t_student = time.time() - t1
    t1 = time.time()
    full = kvshare.teacher_continue(teacher, kv, batch, image_id, "full")
    t_teacher = time.time() - t1
    none = kvshare.teacher_continue(teacher, kv, batch, image_id, "none")
    V = teacher.cfg.vocab_size
    last = int(batch["response_mask"][0].sum()) - 1             # predicts the token after the response text
    diff = (student_logits[..., :V] - full).abs()[batch["response_mask"]]
    out = {"images": len(image_paths), "image_tokens": student.n_image_tokens, "context_len": batch["context_len"],
           "image_token_id": image_id, "student_vocab": student.decoder.cfg.vocab_size, "teacher_vocab": V,
           # the student's decoder IS the teacher's here, so the handoff must reproduce its logits
           "max_abs_student_vs_teacher_full": float(diff.max()),
           "kl_full_vs_none_first": float(F.kl_div(F.log_softmax(none[:, 0], -1), F.log_softmax(full[:, 0], -1),
                                                   log_target=True, reduction="batchmean")),
           "load_s": t_load, "student_prefill_s": t_student, "teacher_continue_s": t_teacher,
           "total_s": time.time() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"prompt ({batch['context_len']} tokens, {student.n_image_tokens} image tokens of id {image_id}; "
          f"student vocab {out['student_vocab']} = teacher {V} + 1):\n{prompt!r}\nresponse: {response!r}")
    for b, path in enumerate(image_paths):
        print(f"\n{os.path.basename(path)} ({examples[b]['image'].size[0]}x{examples[b]['image'].size[1]} -> "
              f"{image_size}x{image_size})")
        print(f"  teacher via student KV, first answer token : {_top(full[b, 0], tok, top_k)}")
        print(f"  teacher via student KV, after {response!r}: {_top(full[b, last], tok, top_k)}")
        print(f"  text-only teacher (scope none), first token: {_top(none[b, 0], tok, top_k)}")
    print(f"\nmax |student logits - teacher(full) logits| = {out['max_abs_student_vs_teacher_full']:.2e} "
          f"(same decoder weights: the handoff reproduces the student); KL(full || none) at the first answer "
          f"token = {out['kl_full_vs_none_first']:.3f} nats (the noise image KV moves the teacher)")
    print(f"time: load {t_load:.1f}s, student prefill {t_student:.2f}s, teacher continue {t_teacher:.2f}s, "
          f"total {out['total_s']:.1f}s; peak RSS {out['peak_rss_mb']:.0f} MB")
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:      # bad input: its one-line message, not a traceback
        sys.exit(f"eval.py: {e}")
