"""
Multiple-choice files scored by log-likelihood with eval.multiple_choice: lm-eval's MMLU
prompt file, or generic JSON / JSONL questions.

  python tools/mmlu.py --mc=FILE --ckpt=MODEL_FOLDER [--batch_size=16] [--limit=N]

(lm-eval 0.4.13's lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json works as is: README,
"Run on real weights".)
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import eval as evaluation  # noqa: E402
from scale.weights import load_model_folder  # noqa: E402

# Multiple choice from files: lm-eval's MMLU prompt file, or generic JSON / JSONL
#
# Zero-shot format (lm-eval's default MMLU template; the option is the letter, scored by its
# log-likelihood after "Answer:"):
# The following are multiple choice questions (with answers) about {subject}.\n\n   (if a subject is
# known)
#   {question}\nA. {choice 0}\nB. {choice 1}\nC. {choice 2}\nD. {choice 3}\nAnswer:
# options " A", " B", " C", " D" (one token each for byte-level BPE: the space belongs to the
# letter).

LETTERS = "ABCDEFGHIJ"
_MMLU_HEADER = re.compile(r"\s*The following are multiple choice questions \(with answers\) about "
                          r"(.+?)\.\n\n")
_ANSWER = re.compile(r"The answer is \(([A-J])\)")


def mc_item(question, choices, answer, subject=None):
    """-> {"context", "options", "answer", ["subject"]} in the zero-shot format above."""
    header = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
              if subject else "")
    context = header + question.strip() + "".join(f"\n{LETTERS[i]}. {c}" for i,
                                                  c in enumerate(choices)) + "\nAnswer:"
    item = {"context": context, "options": [f" {LETTERS[i]}" for i in range(len(choices))],
            "answer": answer}
    return {**item, "subject": subject} if subject else item


def _split_options(text):
    """"(A) x (B) y ..." or one option per line -> [x, y, ...]: markers must come in order
    A, B, C, ... each after a space or newline, so "E(X) = 37" in an option is not a marker."""
    cuts, k = [0], 1
    while k < len(LETTERS):
        hits = [i + 1
                for i in (text.find(f" ({LETTERS[k]}) ", cuts[-1]),
                          text.find(f"\n({LETTERS[k]}) ", cuts[-1]))
                if i >= 0]
        if not hits:
            break
        cuts.append(min(hits))
        k += 1
    return [text[a + 4:b].strip() for a, b in zip(cuts, cuts[1:] + [len(text)])]


def _parse_mmlu_prompt(subject, text):
    """One subject of lm-eval's flan_cot_fewshot/_cot_prompts.json: a header, then blocks
    "Q: {question}\\n(A) .. (B) .. (C) .. (D) ..\\nA: Let's think step by step. ...
    The answer is (X).". Options sit on the question's last line(s), starting at its last line
    that begins with "(A) "."""
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
            raise ValueError(f"{where}: expected >= 2 options '(A) .. (B) ..' and 'The answer is "
                             f"(X)', found {len(options)} option(s) and "
                             f"{'no' if not answers else 'an'} answer")
        answer = LETTERS.index(answers[-1])
        if answer >= len(options):
            raise ValueError(f"{where}: answer ({answers[-1]}) but only {len(options)} options")
        items.append(mc_item(q_part[3:start], options, answer, topic))
    return items


def _generic_mc(obj):
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    q, choices, ans = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(q, str) or not isinstance(choices,
                                                list) or not 2 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"expected 'question' (str) and 'choices' (2-{len(LETTERS)} strings), "
                         f"found keys {sorted(obj)}")
    if isinstance(ans, str) and len(ans) == 1 and ans in LETTERS:
        ans = LETTERS.index(ans)
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise ValueError(f"'answer' must be a choice index 0..{len(choices) - 1} or a letter, "
                         f"found {obj.get('answer')!r}")
    subject = obj.get("subject")
    return mc_item(q, choices, ans,
                   subject.replace("_", " ") if isinstance(subject, str) and subject else None)


def load_mc_file(path):
    """Multiple-choice items {"context", "options", "answer"[, "subject"]} from
    - lm-eval's MMLU prompt file (lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json): a JSON
      object subject -> few-shot text; each question becomes one zero-shot item (282 in 0.4.13);
    - generic JSON (a list) or JSONL of {"question", "choices": [...], "answer": index or letter,
      "subject"?}.
    A bad entry is a ValueError naming the file and the subject/question or item/line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.start}); expected JSON or JSONL") from None
    try:
        whole, lines = json.loads(text), None
    except json.JSONDecodeError:
        whole, lines = None, [(n, line) for n,
                              line in enumerate(text.splitlines(), 1) if line.strip()]
    items = []
    if isinstance(whole, dict):
        if not whole or not all(isinstance(v, str) for v in whole.values()):
            raise ValueError(f"{path}: expected lm-eval's MMLU prompt shape (subject -> prompt "
                             "text) or a list of "
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
                raise ValueError(
                    f"{path} line {n}: bad JSON ({err.msg}); expected JSON or JSONL") from None
            try:
                items.append(_generic_mc(obj))
            except ValueError as err:
                raise ValueError(f"{path} line {n}: {err}") from None
    else:
        raise ValueError(f"{path}: expected a JSON object, a JSON list or JSONL, found "
                         f"{type(whole).__name__}")
    if not items:
        raise ValueError(f"{path}: no multiple-choice items")
    return items




def main(argv):
    ap = argparse.ArgumentParser(description="Multiple-choice file accuracy of a model folder.")
    ap.add_argument("--mc", help="lm-eval's MMLU prompt file, or JSON / JSONL questions")
    ap.add_argument("--ckpt", help="a model folder with its tokenizer.json")
    ap.add_argument("--batch_size", default="16")
    ap.add_argument("--limit", default=None, help="score the first N items only")
    opts = vars(ap.parse_args(argv))
    if not opts["mc"] or not opts["ckpt"]:
        raise ValueError("expected --mc=FILE and --ckpt=MODEL_FOLDER (with its tokenizer.json)")
    for key in ("batch_size", "limit"):
        if opts[key] is not None and not (opts[key].isdigit() and int(opts[key]) > 0):
            raise ValueError(f"--{key}={opts[key]}: expected a positive integer")
    items = load_mc_file(opts["mc"])
    items = items[:int(opts["limit"])] if opts["limit"] else items
    model = load_model_folder(opts["ckpt"])
    tok = data.load_tokenizer(os.path.join(opts["ckpt"], "tokenizer.json"))
    t0 = time.time()
    r = evaluation.multiple_choice(model, tok, items, batch_size=int(opts["batch_size"]))
    print(f"{opts['mc']}: accuracy {r['acc']:.4f} ({r['correct']}/{r['n']}), n {r['n']}, "
          f"chance {r['chance']:.4f}, {time.time() - t0:.1f}s")
    return r


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:      # bad input: one line, not a traceback
        sys.exit(f"tools/mmlu.py: {e}")
