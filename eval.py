"""
Evaluation: does LinguDistill restore language without costing vision? Metrics only; the
multi-seed experiment and real-benchmark file readers live in tools/.

  python eval.py --ckpt=out/distilled-selective-full [--teacher=out/teacher]

Metrics
- multiple choice by log-likelihood (HellaSwag/ARC style): the option with the highest
  mean log-probability per token (length-normalised; the EOS after it is not scored) wins;
- VQA exact match of greedy generation. Computed in one teacher-forced pass: greedy decoding
  reproduces the reference answer (+ EOS) exactly iff the argmax at every answer position
  is the reference token, so the two are the same number;
- perplexity on text;
- teacher-through-handoff (diagnostic): the frozen teacher answering knowledge VQA from the
  student's image KV (kvshare.teacher_continue). If it is at chance, KD on image-grounded
  sources cannot help.
- transfer T (does the teacher see the image?): how much of what the image's words would tell
  the teacher reaches it through the handoff, 1 = all, 0 = nothing (see `transfer`).
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import data
import world
import kvshare
from scale import tiles
from tools import oracle
from model import VLM, Decoder
from plumbing.checks import check_teacher_tokenizer
from plumbing.files import read_json
from plumbing.loop import unwrap
from scale.weights import load_model_folder


def batches(examples, tok, model, image_size, batch_size, device):
    """data.collate over consecutive slices of `examples` in `model`'s image layout (image
    tokens per view, image splitting; none for a text-only Decoder), moved to `device`."""
    n_image_tokens = model.n_image_tokens if isinstance(model, VLM) else 0
    splitting = getattr(model, "image_splitting", None)
    for i in range(0, len(examples), batch_size):
        b = tiles.collate(examples[i:i + batch_size], tok, n_image_tokens, image_size,
                          splitting)
        yield {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


def response_logits(model, batch):
    """(B, R, V) float32 logits predicting each response token (VLM or text-only Decoder)."""
    return kvshare.student_prefill(model, batch)[0].float()


def _mc_rows(items):
    """Every (context, option) pair as one data.collate example (the option is the response)."""
    return [{"image": None, "prompt": it["context"], "response": opt, "source": "mc"}
            for it in items for opt in it["options"]]


def _option_scores(logits, batch):
    """Mean log-probability of each row's option tokens: the response columns without the EOS
    that data.collate appends after them. logits (B, R, V) predict the R response tokens."""
    logp = F.log_softmax(logits.float(), -1)                                # (B, R, V)
    logp = logp.gather(-1, batch["labels"][..., None])[..., 0]              # (B, R)
    scored = batch["response_mask"].clone()
    last = scored.sum(1) - 1                                                # the EOS column
    scored[torch.arange(scored.shape[0], device=scored.device), last] = False
    return ((logp * scored).sum(1) / scored.sum(1).clamp(min=1)).tolist()


def _plain_scores(model, tok, items, batch_size, image_size, device):
    """Every (context, option) pair is one data.collate row, run over context + option."""
    scores = []
    for b in batches(_mc_rows(items), tok, model, image_size, batch_size, device):
        scores += _option_scores(response_logits(model, b), b)
    return scores


@torch.no_grad()
def multiple_choice(model, tok, items, batch_size=64, image_size=32, scorer=None):
    """Items {"context", "options", "answer", ["split"]}: every (context, option) pair is one
    row of data.collate; an option's score is the mean log-probability of its tokens (not the
    EOS after it); the highest score wins (ties -> the first option).
    Returns {"acc", "acc_<split>" per split, "n", "correct", "chance", "pred", "scores"}
    (scores: per item, the score of each option).

    scorer: another function computing the same option scores as _plain_scores (the reference),
    with its signature, for a text-only model (a model.Decoder); e.g. tools/bigbench.py's
    shared_context_scores, which runs each context once. A VLM always takes the plain path."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        use = scorer if scorer is not None and isinstance(unwrap(model), Decoder) else _plain_scores
        scores = use(model, tok, items, batch_size, image_size, device)
    finally:
        model.train(was_training)
    per_item, k = [], 0
    for it in items:
        per_item.append(scores[k:k + len(it["options"])])
        k += len(it["options"])
    pred = [max(range(len(s)), key=s.__getitem__) for s in per_item]
    per_split = {}
    for p, it in zip(pred, items):
        per_split.setdefault(it.get("split"), []).append(p == it["answer"])
    correct = sum(p == it["answer"] for p, it in zip(pred, items))
    out = {"acc": correct / max(1, len(items)), "n": len(items), "correct": correct,
           "chance": sum(1 / len(it["options"]) for it in items) / max(1, len(items)),
           "pred": pred, "scores": per_item}
    out.update({f"acc_{s}": sum(v) / len(v) for s, v in per_split.items() if s is not None})
    return out


def _exact_match(logits, batch):
    hit = (logits.argmax(-1) == batch["labels"]) | ~batch["response_mask"]
    return hit.all(1).tolist()


@torch.no_grad()
def vqa_accuracy(model, items, tok, image_size=32, batch_size=64):
    """Exact match of greedy generation (see the module docstring) over VQA examples."""
    device = next(model.parameters()).device
    hits = []
    for b in batches(items, tok, model, image_size, batch_size, device):
        hits += _exact_match(response_logits(model, b), b)
    return sum(hits) / max(1, len(hits))


@torch.no_grad()
def teacher_handoff_accuracy(student, teacher, items, tok, image_size=32, scope="full",
                             batch_size=64):
    """Exact match of the frozen teacher's greedy answer when it reads the student's KV."""
    device = next(student.parameters()).device
    hits = []
    for b in batches(items, tok, student, image_size, batch_size, device):
        _, kv = kvshare.student_prefill(student, b)
        teacher_logits = kvshare.SCOPES[scope](teacher, kv, b, student.student_only_ids)
        hits += _exact_match(teacher_logits.float(), b)
    return sum(hits) / max(1, len(hits))


def transfer_from_logits(oracle, handoff, blind, splits=None, shuffled=None):
    """The transfer measure from three next-token logit sets of the frozen teacher over the same
    N prompts, each (N, V): oracle (the image replaced by its words, on the teacher's own text),
    handoff (continuing from the student's KV, scope full), blind (no image, scope none).

      T = 1 - mean_n KL(p_oracle || p_handoff) / mean_n KL(p_oracle || p_blind)

    (a ratio of means over prompts): 1 when the handoff gives the teacher what the words give
    it, 0 when it gives no more than no image at all, < 0 when it misleads; nan when the words
    tell the teacher nothing (mean KL to blind = 0). top1: how often the handoff's argmax is
    the oracle's. splits (N labels, e.g. "seen"/"unseen"): the same per split, keys suffixed
    "_<split>". transfer_top1_blind: the same agreement for the blind teacher.

    shuffled (N, V), optional: the null, the teacher continuing from the same student's KV of
    the same prompts with each image replaced by another entity's (shuffled_items). Adds
    transfer_shuffled = 1 - mean KL(p_oracle || p_shuffled) / mean KL(p_oracle || p_blind),
    transfer_gap = transfer - transfer_shuffled (> 0: the handoff carries *this* image's
    information, not just "an image"), kl_shuffled and transfer_top1_shuffled.
    Returns {"transfer", "transfer_top1", "kl_handoff", "kl_blind", ...}."""
    named = {"handoff": handoff, "blind": blind, **({"shuffled": shuffled}
                                                     if shuffled is not None else {})}
    lo = F.log_softmax(oracle.float(), -1)                                           # (N, V)
    logp = {k: F.log_softmax(x.float(), -1) for k, x in named.items()}              # (N, V)
    p = lo.exp()
    kl = {k: (p * (lo - lq)).sum(-1) for k, lq in logp.items()}                      # (N,)
    top1 = {k: (lq.argmax(-1) == lo.argmax(-1)).float() for k, lq in logp.items()}  # (N,)
    groups = {"": torch.ones_like(top1["handoff"], dtype=torch.bool)}
    for s in sorted(set(splits or [])):
        groups[f"_{s}"] = torch.tensor([x == s for x in splits], device=lo.device)
    out = {}
    for suffix, g in groups.items():
        mean = {k: float(v[g].mean()) for k, v in kl.items()}
        ratio = (lambda k: 1 - mean[k] / mean["blind"]) if mean["blind"] > 0 else \
            (lambda k: float("nan"))
        out[f"transfer{suffix}"] = ratio("handoff")
        out[f"transfer_top1{suffix}"] = float(top1["handoff"][g].mean())
        out[f"kl_handoff{suffix}"], out[f"kl_blind{suffix}"] = mean["handoff"], mean["blind"]
        out[f"transfer_top1_blind{suffix}"] = float(top1["blind"][g].mean())
        if "shuffled" in mean:
            out[f"transfer_shuffled{suffix}"] = ratio("shuffled")
            out[f"transfer_gap{suffix}"] = out[f"transfer{suffix}"] - ratio("shuffled")
            out[f"kl_shuffled{suffix}"] = mean["shuffled"]
            out[f"transfer_top1_shuffled{suffix}"] = float(top1["shuffled"][g].mean())
    return out


def shuffled_items(items):
    """The shuffled-image null: the same items (prompts, responses, splits), each image replaced
    by the image of an item about another entity. A fixed derangement of the entities: the
    distinct "desc"s in order of first appearance, each item taking the image of the first item
    of the next desc (cyclically), so no item keeps its own entity's image. Needs >= 2 entities."""
    descs = list(dict.fromkeys(it["desc"] for it in items))
    if len(descs) < 2:
        raise ValueError(f"shuffled_items: {len(descs)} entity in the items; the null needs two "
                         "or more")
    first = {}
    for it in items:
        first.setdefault(it["desc"], it["image"])
    nxt = {d: descs[(i + 1) % len(descs)] for i, d in enumerate(descs)}
    return [{**it, "image": first[nxt[it["desc"]]], "image_desc": nxt[it["desc"]]}
            for it in items]


def oracle_example(item):
    """The item as the teacher's own text: its <image> replaced by the image's words,
    "<image> eats" -> "the red circle eats" (items need a "desc", as world.py's have)."""
    if "desc" not in item or data.IMAGE_TOKEN not in item["prompt"]:
        raise ValueError(f"transfer: item {item['prompt']!r} needs an {data.IMAGE_TOKEN} in its "
                         "prompt and a \"desc\" (the words for its image)")
    return {"image": None, "prompt": item["prompt"].replace(data.IMAGE_TOKEN, item["desc"]),
            "response": item["response"], "source": "oracle"}


@torch.no_grad()
def transfer(student, teacher, items, tok, image_size=32, batch_size=64, null=True):
    """Does the frozen teacher see the image? For each item (an image example with a "desc",
    e.g. world.knowledge_bench: "<image> eats" on a render of the red circle), the teacher's
    distribution over the first response token three ways: p_oracle on "the red circle eats"
    (its own text), p_handoff from the student's KV (kvshare scope "full"), p_blind from the
    prompt text alone (scope "none"), and with `null` p_shuffled, the handoff from the same
    student's KV with each image another entity's (shuffled_items; skipped with fewer than two
    entities). Returns transfer_from_logits(...), per "split" too if the items have one."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    oracle_rows = [oracle_example(it) for it in items]
    null = null and len({it["desc"] for it in items}) > 1
    handoff, blind, oracle, shuffled = [], [], [], []
    try:
        for b in batches(items, tok, student, image_size, batch_size, device):
            _, kv = kvshare.student_prefill(student, b)
            for scope, out in (("full", handoff), ("none", blind)):
                logits = kvshare.SCOPES[scope](teacher, kv, b, student.student_only_ids)
                out.append(logits[:, 0].float())                                    # (B, V)
        for b in batches(shuffled_items(items) if null else [], tok, student, image_size,
                         batch_size, device):
            _, kv = kvshare.student_prefill(student, b)
            logits = kvshare.teacher_continue(teacher, kv, b, student.student_only_ids)
            shuffled.append(logits[:, 0].float())                                   # (B, V)
    finally:
        student.train(was_training)
    for b in batches(oracle_rows, tok, teacher, image_size, batch_size, device):
        oracle.append(response_logits(teacher, b)[:, 0])                            # (B, V)
    splits = [it["split"] for it in items] if all("split" in it for it in items) else None
    return transfer_from_logits(torch.cat(oracle), torch.cat(handoff), torch.cat(blind), splits,
                                torch.cat(shuffled) if null else None)


@torch.no_grad()
def held_out_scores(model, texts, tok, batch_size=32, teacher=None):
    """Language on held-out texts, each text's first word the context and the rest scored
    (texts without a space are skipped), in one pass: {"ppl": exp(mean next-token NLL)}, and
    with a teacher also "kl": the mean per-token KL(p_teacher || p_model) in nats, how far the
    model's next-token distributions have moved from the teacher's (0 for the teacher) — a
    metric that registers partial damage and recovery where a benchmark may sit at chance.
    Ids past the teacher's vocabulary (the student's own) have teacher probability 0."""
    device = next(model.parameters()).device
    examples = [{"image": None, "prompt": t.split(" ", 1)[0], "response": " " + t.split(" ", 1)[1],
                 "source": "text"} for t in texts if " " in t]
    nll, kl, n = 0.0, 0.0, 0
    for b in batches(examples, tok, model, 32, batch_size, device):
        logits, mask = response_logits(model, b), b["response_mask"]               # (B, R, V)
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
        nll += float((loss * mask.flatten()).sum())
        n += int(mask.sum())
        if teacher is not None:
            lt = F.log_softmax(response_logits(teacher, b), -1)                   # (B, R, V_t)
            lm = F.log_softmax(logits, -1)[..., :lt.shape[-1]]
            kl += float(((lt.exp() * (lt - lm)).sum(-1) * mask).sum())
    return {"ppl": math.exp(nll / max(1, n)),
            **({"kl": kl / max(1, n)} if teacher is not None else {})}


# ----------------------------------------------------------------------------------------
# The table: every model on the tiny world's benchmarks

def bench(tiny, name, part="test"):
    """Benchmark `name` of the tiny world in `part` (world.World.bench: "test", "val" or "all");
    a world without the validation split (RealData, a test's stand-in) has only test items."""
    return tiny.bench(name, part) if hasattr(tiny, "bench") else getattr(tiny, name)


def evaluate_models(models, tiny, tok, image_size, teacher=None, part="test"):
    """One row per model on the tiny world `tiny`: language MC (overall, seen/unseen), vision
    VQA, knowledge VQA, and for every VLM the teacher-through-handoff diagnostic and the
    transfer measure on knowledge VQA (`transfer`'s keys: transfer, transfer_seen, ..., the
    shuffled-image null's transfer_shuffled, transfer_gap, kl_shuffled). part: the benchmark
    items, "test" (what results report) or "val" (the validation split settings are chosen on),
    world.World.bench."""
    language, vision, knowledge = (bench(tiny, n, part) for n in
                                   ("language_bench", "vision_bench", "knowledge_bench"))
    teacher = teacher or models.get("teacher")
    if teacher is not None:
        kvshare.freeze(teacher)
    rows = {}
    for name, model in models.items():
        if isinstance(model, VLM) and teacher is not None:
            kvshare.check_compatible(teacher.cfg, model.decoder.cfg)
        model.eval()
        mc = multiple_choice(model, tok, language, image_size=image_size)
        row = {k: v for k, v in mc.items() if k.startswith("acc")}
        if isinstance(model, VLM):
            row["vision"] = vqa_accuracy(model, vision, tok, image_size)
            row["knowledge_vqa"] = vqa_accuracy(model, knowledge, tok, image_size)
            if teacher is not None:
                row["teacher_handoff"] = teacher_handoff_accuracy(
                    model, teacher, knowledge, tok, image_size)
                row.update(transfer(model, teacher, knowledge, tok, image_size))
        rows[name] = row
    return rows


def recovery(rows, name):
    """The share of the language the adaptation lost that `name` won back:
    (name - adapted) / (teacher - adapted) on the language benchmark (rows: evaluate_models)."""
    teacher, adapted = rows["teacher"]["acc"], rows["adapted"]["acc"]
    return (rows[name]["acc"] - adapted) / (teacher - adapted) if teacher > adapted else float("nan")


COLUMNS = [("acc", "language"), ("acc_seen", "lang seen"), ("acc_unseen", "lang unseen"),
           ("vision", "vision"), ("knowledge_vqa", "knowledge VQA"),
           ("teacher_handoff", "teacher via handoff"), ("transfer", "transfer T"),
           ("recovery", "recovery")]


def format_table(rows, std=None, columns=COLUMNS, plain=("ppl", "transfer")):
    """Markdown table; `std` (same shape as rows) adds ± columns for multi-seed means.
    columns: (key, header) pairs, shown if any row has the key; keys in `plain` are printed as
    they are (e.g. perplexity), the others as percentages."""
    cols = [(k, h) for k, h in columns if any(k in r for r in rows.values())]
    lines = ["| model | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for k, _ in cols:
            scale, digits = (1, 2) if k in plain else (100, 1)
            if k not in r:
                cells.append("—")
            elif std is not None:
                cells.append(f"{scale * r[k]:.{digits}f} ± {scale * std[name][k]:.{digits}f}")
            else:
                cells.append(f"{scale * r[k]:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_folder(folder, teacher_folder=None):
    """Rebuild the tiny world a model folder was trained in (its train_config.json) and
    evaluate the model there; the teacher defaults to the `teacher` folder beside it."""
    cfg = read_json(os.path.join(folder, "train_config.json"))
    if cfg.get("data_path"):
        raise ValueError(f"{folder} was trained on --data_path={cfg['data_path']}, which has no "
                         "built-in benchmarks; use tools/mmlu.py or tools/bigbench.py")
    tiny = world.build_world(cfg["seed"], n_entities=cfg["n_entities"],
                            image_size=cfg["image_size"])
    tok = data.load_tokenizer(os.path.join(folder, "tokenizer.json"))
    flag = "--teacher" if teacher_folder else "the teacher folder beside --ckpt"
    teacher_folder = teacher_folder or os.path.join(os.path.dirname(os.path.abspath(folder)),
                                                    "teacher")
    if os.path.isdir(teacher_folder):
        check_teacher_tokenizer(teacher_folder, tok, flag)      # the one check train.py runs too
    teacher = load_model_folder(teacher_folder) if os.path.isdir(teacher_folder) else None
    name, model = os.path.basename(os.path.normpath(folder)), load_model_folder(folder)
    if cfg.get("tower") == "oracle":                 # a control's folder: re-attach the oracle
        if teacher is None:
            raise ValueError(f"{folder} was trained with --tower=oracle, whose image tokens come "
                             "from the teacher: give --teacher=FOLDER")
        model = oracle.OracleVLM.wrap(model, teacher, tiny, tok)
    rows = evaluate_models({name: model}, tiny, tok, cfg["image_size"], teacher=teacher)
    held_out = [it["context"] + it["options"][it["answer"]] for it in bench(tiny, "language_bench")]
    return (format_table(rows) + "\nperplexity on the language benchmark's correct sentences: "
            f"{held_out_scores(model, held_out, tok)['ppl']:.3f}")


def main(argv):
    p = argparse.ArgumentParser(description="Evaluate a model folder train.py wrote on the tiny "
                                "world it was trained in (its train_config.json): the table row "
                                "and the perplexity of the language benchmark's answers.")
    p.add_argument("--ckpt", required=True, metavar="FOLDER",
                   help="a model folder written by train.py (teacher/, adapted/, distilled-*/)")
    p.add_argument("--teacher", default=None, metavar="FOLDER",
                   help="the frozen teacher for the handoff column (default: teacher/ beside "
                        "--ckpt)")
    args = p.parse_args(argv)
    print(evaluate_folder(args.ckpt, args.teacher))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: {e}")
