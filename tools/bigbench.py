"""
BIG-bench multiple-choice tasks as items for eval.multiple_choice, read straight from the `bigbench`
sdist on PyPI (it ships every JSON task):

  pip download --no-deps bigbench==1.0.0 -d .weights   # .weights/bigbench-1.0.0.tar.gz, 358 MB
  python tools/bigbench.py --tasks=dev --ckpt=FOLDER [--limit=N] [--source=TAR_OR_FOLDER]
  [--batch_size=16]
                           [--bigbench_spaces]

--tasks=dev (DEV_TASKS) or a comma list of task names; FOLDER is a Hugging Face LM folder or our
VLM folder (its decoder is scored) with its tokenizer.json. Prints accuracy, chance and n per task.
Scoring uses eval.multiple_choice(scorer=shared_context_scores): the decoder is text-only, so each
item's context (BIG-bench's are long, its options short) is run once and every option continues
from its K/V; the same scores as the plain per-(context, option) path up to float rounding, and faster.
--batch_size is then items per slice (one prefill of their contexts, one continuation of
all their options).

Source: the .tar.gz (members streamed with tarfile; nothing extracted to disk) or an extracted
folder (any folder with a benchmark_tasks/ under it, or benchmark_tasks/ itself). A task is
bigbench/benchmark_tasks/<task>/task.json. Programmatic tasks (task.py) are not read.

Prompt (zero-shot, BIG-bench's own default_format_fn, bigbench/api/json_task.py):
    context = task_prefix + example_input_prefix + input
              [+ choice_prefix + choice_prefix.join(choices in BIG-bench's permuted order)]
              + example_output_prefix
    options = the target_scores keys, in file order (BIG-bench appends the target tokens to
              the input tokens with no separator; eval.multiple_choice also tokenizes context and
              option separately, so with --bigbench_spaces the token sequences are the same)
One change, on by default (--bigbench_spaces turns it off): trailing spaces of the context
(BIG-bench's "\nA: " ends in one) move to the front of every option, as lm-eval's _encode_pair
does. The text is the same; the tokens differ: a byte-level BPE attaches a space to the word
after it, so "A:" + " Paris" is the natural tokenization, while BIG-bench's "A: " + "Paris"
puts a lone " " token before a space-less word, a sequence pretrained models rarely see.
Defaults as in BIG-bench: example_input_prefix "\\nQ: ", example_output_prefix "\\nA: ",
choice_prefix "\\n  choice: ", append_choices_to_input true. Choices listed in the input follow
BIG-bench's order exactly: numpy RandomState(42).permutation(sorted(choices)) per example.
Exact duplicate examples are dropped (as BIG-bench does). --limit takes the first N in file order.

Answer: the index of the option with the highest target score. An example where several options
share the highest score is SKIPPED (counted in the load report): a single-answer accuracy would
have to call one of equally good options wrong. (BIG-bench takes the first one as its generative
"target" and grades multiple choice with partial credit: the target score of the chosen option.)
Each item keeps its "scores" list, so that grade can be computed too (bigbench_grade).

Normalisation: eval.multiple_choice picks the option with the highest MEAN log-probability per
option
token (length-normalised). BIG-bench's multiple_choice_grade picks the highest SUM of
log-probabilities (absolute_normalization; the softmax over options it applies by default does
not change the argmax). The two differ when options have different token lengths.

Subtasks: a task.json without "examples" is a parent; its examples are the task.json files one
folder down (BIG-bench's rule), named "<task>:<subfolder>". A task.json with examples wins over
subfolders.

Evaluation honesty: RESERVED_TASKS are never read. read_tasks refuses them (ReservedTaskError)
before it opens anything; training_text skips dev and reserved members by their path, before
reading their bytes (a .tar.gz is one gzip stream, so their compressed bytes are decompressed
in passing, never parsed). Task names here are lower-case folder names.
"""
import argparse
import json
import os
import re
import sys
import tarfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import eval as ev  # noqa: E402
from scale.weights import load_model_folder  # noqa: E402

DEV_TASKS = ("social_iqa", "phrase_relatedness", "physics", "disambiguation_qa")
RESERVED_TASKS = ("movie_recommendation", "date_understanding", "understanding_fables",
                  "emoji_movie", "timedial",
                  "strategyqa", "sports_understanding", "hindu_knowledge", "winowhy",
                  "causal_judgment")
DEFAULT_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              ".weights", "bigbench-1.0.0.tar.gz")
DEFAULTS = {"example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "choice_prefix": "\n  choice: ", "append_choices_to_input": True, "task_prefix": ""}
BIGBENCH_SEED = 42               # json_task.JsonTask(random_seed=42): the choice order in the input
# training_text skips tasks with any of these keywords: not English prose
NON_LANGUAGE_KEYWORDS = ("non-language", "visual reasoning", "non-English", "low-resource language",
                         "multilingual",
                         "translation", "computer code", "arithmetic", "numerical response",
                         "mathematics")
MAX_MEMBER_BYTES = 20 << 20   # training_text skips larger task.json (ASCII art, base64 images, ...)

_MEMBER = re.compile(r"(?:^|/)benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")


class ReservedTaskError(ValueError):
    pass


def check_not_reserved(tasks):
    bad = [t for t in tasks if t.split(":")[0] in RESERVED_TASKS]
    if bad:
        raise ReservedTaskError(f"{bad} {'is a' if len(bad) == 1 else 'are'} reserved BIG-bench "
                                "task(s): held out for the final evaluation, never read during "
                                "development")


def parse_member(path):
    """'.../benchmark_tasks/<task>/task.json' -> (task, None); '.../<task>/<sub>/task.json' ->
    (task, sub);
    anything else -> None."""
    m = _MEMBER.search(path.replace(os.sep, "/"))
    return (m.group(1), m.group(2)) if m else None


def _iter_files(source, keep):
    """(task, sub, read) for every task.json under source whose (task, sub) keep() accepts;
    read() returns the parsed JSON. keep() is called on the path before anything is read."""
    if os.path.isdir(source):
        roots = [source] if os.path.basename(os.path.normpath(source)) == "benchmark_tasks" else \
            [os.path.join(d, "benchmark_tasks") for d, subs,
             _ in os.walk(source) if "benchmark_tasks" in subs]
        if not roots:
            raise FileNotFoundError(f"{source}: no benchmark_tasks/ folder under it")
        for root in roots:
            for task in sorted(os.listdir(root)):
                cands = [(None, os.path.join(root, task, "task.json"))]
                if os.path.isdir(os.path.join(root, task)):
                    cands += [(s, os.path.join(root, task, s, "task.json"))
                              for s in sorted(os.listdir(os.path.join(root, task)))]
                for sub, path in cands:
                    if os.path.isfile(path) and keep(task, sub, os.path.getsize(path)):
                        yield task, sub, lambda p=path: _load_json(open(p, "rb").read(), p)
        return
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: not found (pip download --no-deps bigbench==1.0.0 -d "
                                ".weights)")
    with tarfile.open(source, "r:*") as tar:            # streams: members in archive order
        for member in tar:
            parsed = parse_member(member.name) if member.isfile() else None
            if parsed and keep(parsed[0], parsed[1], member.size):
                yield parsed[
                    0], parsed[1], lambda m=member: _load_json(tar.extractfile(m).read(), m.name)


def _load_json(raw, where):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def format_example(example, task_json, seed=BIGBENCH_SEED, move_spaces=True):
    """One BIG-bench example -> {"context", "options", "answer", "scores"} (see the module
    docstring), or None if several options share the highest score. move_spaces: trailing
    spaces of the context move to the front of every option (same text). ValueError if it has no
    target_scores or no option scores above the others."""
    ts = example.get("target_scores")
    if not isinstance(ts, dict) or len(ts) < 2 or not isinstance(example.get("input"), str):
        raise ValueError("expected 'input' (str) and 'target_scores' (>= 2 options), found keys "
                         f"{sorted(example)}")
    opt = {k: task_json.get(k, v) for k, v in DEFAULTS.items()}
    text = example["input"]
    if opt["append_choices_to_input"]:
        order = np.random.RandomState(seed=seed).permutation(sorted(ts))
        text = text + opt["choice_prefix"] + opt["choice_prefix"].join(order)
    options, scores = list(ts), [float(v) for v in ts.values()]
    best = max(scores)
    if best <= min(scores):
        raise ValueError(f"no option scores above the others: {ts}")
    if scores.count(best) > 1:
        return None
    prefix = str(opt["task_prefix"]) + opt["example_input_prefix"]
    context = prefix + text + opt["example_output_prefix"]
    if move_spaces:
        stripped = context.rstrip(" ")
        options, context = [context[len(stripped):] + o for o in options], stripped
    return {"context": context, "options": options, "answer": scores.index(best), "scores": scores}


def task_items(task_json, name, move_spaces=True):
    """Items of one task.json that has examples (duplicates dropped as BIG-bench does) and the
    number of examples skipped (tied best options, or not multiple choice)."""
    items, seen, skipped = [], set(), 0
    for i, ex in enumerate(task_json["examples"]):
        key = json.dumps(ex, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if "target_scores" not in ex:
            skipped += 1
            continue
        try:
            it = format_example(ex, task_json, move_spaces=move_spaces)
        except ValueError as e:
            raise ValueError(f"{name}: example {i}: {e}") from None
        if it is None:
            skipped += 1
        else:
            items.append({**it, "task": name})
    return items, skipped


def read_tasks(tasks, source=DEFAULT_SOURCE, limit=None, move_spaces=True):
    """{task: items} for the named tasks (multiple choice), in the order given, and a report
    {task: {"n", "skipped", "subtasks"}}. Refuses reserved tasks before opening the source; a
    missing task or one with no multiple-choice examples is a ValueError."""
    tasks = list(dict.fromkeys(tasks))
    check_not_reserved(tasks)
    files = {}
    for task, sub, read in _iter_files(source, lambda t, s, size: t in tasks):
        files.setdefault(task, {})[sub] = read()
    out, report = {}, {}
    for task in tasks:
        found = files.get(task)
        if not found or None not in found:
            raise ValueError(f"{source}: no task {task!r} (benchmark_tasks/{task}/task.json)")
        top = found[None]
        if "examples" in top:
            parts = [(task, top)]
        else:
            parts = [(f"{task}:{s}", found[s]) for s in sorted(k for k in found if k is not None)
                     if "examples" in found[s]]
            if not parts:
                raise ValueError(f"{task}: task.json has no 'examples' and no subtask folder with "
                                 "examples")
        items, skipped = [], 0
        for name, tj in parts:
            its, sk = task_items(tj, name, move_spaces)
            items += its
            skipped += sk
        if not items:
            raise ValueError(f"{task}: no multiple-choice examples (target_scores)")
        out[task] = items[:limit] if limit else items
        report[task] = {"n": len(out[task]), "skipped": skipped,
                        "subtasks": len(parts) if parts[0][0] != task else 0}
    return out, report


def training_text(source=DEFAULT_SOURCE, max_per_task=200, exclude=(), keep_task=None):
    """Language-intensive training text from BIG-bench: for every JSON task that is neither in
    DEV_TASKS nor in RESERVED_TASKS (nor in `exclude`) and has none of NON_LANGUAGE_KEYWORDS,
    up to max_per_task documents "<input> <correct answer>" (the unique best target_scores
    option, or the first "target" string of a generative example). Prefixes and listed choices
    are not included; duplicates are dropped. Returns ([text, ...], {task: count}). Excluded tasks
    are skipped by path,
    never read. keep_task(task) -> bool, if given, also selects tasks by name (before reading), e.g.
    to split the tasks into training text and held-out text."""
    banned = set(DEV_TASKS) | set(RESERVED_TASKS) | {t.split(":")[0] for t in exclude}
    keep_task = keep_task or (lambda task: True)
    texts, counts, seen = [], {}, set()
    for task, sub, read in _iter_files(source, lambda t, s, size: t not in banned and keep_task(t)
                                       and size <= MAX_MEMBER_BYTES):
        tj = read()
        if "examples" not in tj or set(tj.get("keywords", ())) & set(NON_LANGUAGE_KEYWORDS):
            continue
        n = 0
        for ex in tj["examples"]:
            if counts.get(task, 0) + n >= max_per_task:     # a parent task's subtasks share the cap
                break
            q = ex.get("input")
            ans = None
            ts = ex.get("target_scores")
            if isinstance(ts, dict) and ts:
                best = max(ts.values())
                if list(ts.values()).count(best) == 1:
                    ans = next(k for k, v in ts.items() if v == best)
            elif isinstance(ex.get("target"), str):
                ans = ex["target"]
            elif isinstance(ex.get("target"),
                            list) and ex["target"] and isinstance(ex["target"][0], str):
                ans = ex["target"][0]
            text = f"{q.strip()} {ans.strip()}" if isinstance(q,
                                                              str) and q.strip() and ans else None
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                n += 1
        counts[task] = counts.get(task, 0) + n
    return texts, {t: c for t, c in counts.items() if c}


def bigbench_grade(items, pred):
    """BIG-bench's multiple_choice_grade for predictions: mean target score of the chosen
    option, and its chance level (mean over items of the mean target score)."""
    grade = sum(it["scores"][p] for it, p in zip(items, pred)) / max(1, len(items))
    chance = sum(sum(it["scores"]) / len(it["scores"]) for it in items) / max(1, len(items))
    return grade, chance


def load_model_and_tokenizer(folder):
    """A Hugging Face LM folder or our VLM folder (-> its decoder), and data.load_tokenizer of its
    tokenizer.json."""
    model = load_model_folder(folder)
    model = getattr(model, "decoder", model)                 # a VLM is scored by its decoder
    return model, data.load_tokenizer(os.path.join(folder, "tokenizer.json"))


def shared_context_scores(model, tok, items, batch_size, image_size, device):
    """eval._plain_scores' scores with each item's context run once (a text-only Decoder; pass
    as eval.multiple_choice(..., scorer=shared_context_scores)): faster on BIG-bench's long
    contexts with short options; batch_size is then items per slice.

    Per slice of batch_size items, all their (context, option) rows are laid out by data.collate
    as in the plain path: P context columns, left-padded, so the rows of one item share columns
    0..P-2. Those columns run once per item (its first row), keeping the per-layer K/V; every row
    then continues from its item's K/V over columns P-1..P+R-2, the last context token and the
    option, as kvshare.teacher_continue does (positions from the attention mask), and is scored
    like the plain path."""
    scores = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        rows = ev._mc_rows(chunk)
        b = next(ev.batches(rows, tok, model, image_size, len(rows), device))
        ids, mask, P = b["input_ids"], b["attention_mask"], b["context_len"]        # (N, P+R)
        T = ids.shape[1]
        item_of = torch.tensor([j for j, it in enumerate(chunk) for _ in it["options"]],
                               device=device)                                      # (N,)
        first = torch.tensor([0] + [len(it["options"]) for it in chunk[:-1]],
                             device=device).cumsum(0)                  # each item's first row
        past = None
        if P > 1:         # per layer (K, V), each (N, n_kv_heads, P-1, head_dim); no logits
            _, kv = model(ids[first, :P - 1], attention_mask=mask[first, :P - 1], use_cache=True,
                          logits_start=P - 1)
            past = [(k.index_select(0, item_of), v.index_select(0, item_of)) for k, v in kv]
        logits, _ = model(ids[:, P - 1:T - 1], attention_mask=mask[:, :T - 1], past_kv=past)
        scores += ev._option_scores(logits, b)                                # logits (N, R, V)
    return scores


def main(argv):
    p = argparse.ArgumentParser(description="Score a model on BIG-bench multiple-choice tasks "
                                "by log-likelihood, offline.", epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="dev", help="dev (the dev tasks) or a comma list of task "
                   "names; reserved tasks are refused (default: dev)")
    p.add_argument("--ckpt", required=True, metavar="FOLDER",
                   help="a Hugging Face LM folder or one of our model folders")
    p.add_argument("--limit", default=None, type=int, help="the first N items of each task")
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help=f"the bigbench sdist .tar.gz or its extracted folder (default: "
                        f"{DEFAULT_SOURCE})")
    p.add_argument("--batch_size", default="16", help="items per batch (default: 16)")
    p.add_argument("--bigbench_spaces", action="store_true",
                   help="keep BIG-bench's trailing context spaces (default: moved to the options)")
    opts = vars(p.parse_args(argv))
    tasks = DEV_TASKS if opts["tasks"] == "dev" else tuple(t for t in opts["tasks"].split(",") if t)
    check_not_reserved(tasks)
    t0 = time.time()
    by_task, report = read_tasks(tasks, opts["source"],
                                 int(opts["limit"]) if opts["limit"] else None,
                                 move_spaces=not opts["bigbench_spaces"])
    t_read = time.time() - t0
    model, tok = load_model_and_tokenizer(opts["ckpt"])
    print(f"read {len(by_task)} task(s) in {t_read:.1f}s; model {opts['ckpt']} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'task':<22} {'acc':>6} {'chance':>7} {'n':>5} {'skipped':>7} {'bb grade':>8} "
          f"{'time':>6}")
    for task, items in by_task.items():
        t1 = time.time()
        r = ev.multiple_choice(model, tok, items, int(opts["batch_size"]),
                               scorer=shared_context_scores)
        grade, _ = bigbench_grade(items, r["pred"])
        print(f"{task:<22} {100 * r['acc']:6.1f} {100 * r['chance']:7.1f} {r['n']:5d} "
              f"{report[task]['skipped']:7d} {100 * grade:8.1f} {time.time() - t1:5.1f}s")
    print(f"total {time.time() - t0:.1f}s wall (mean log-prob per option token; bb grade = target "
          "score of the pick)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"bigbench.py: {e}")
