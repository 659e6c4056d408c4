"""lm-eval (EleutherAI lm-evaluation-harness, `--model hf`) on a model exported by
tools/export_hf.py agrees with eval.multiple_choice on the same multiple-choice items, fully
offline.

The comparison is exact, not "close enough":
- lm-eval's multiple_choice "acc" = argmax of the SUM of the option's token log-probs;
  eval.multiple_choice = argmax of the MEAN per option token. Every item here has options of equal
  token length (built so), where the two rules pick the same option; so lm-eval's acc and
  per-item choice must equal multiple_choice's. (acc_norm divides by the option's byte length, a
  third
  rule; not compared.)
- Each per-option log-likelihood lm-eval reports (run through transformers' LlamaForCausalLM on
  the exported folder, with lm-eval's own tokenization and batching) must equal the sum of log
  softmax of our Decoder over the same tokens to 1e-4: this catches a wrong export (key map,
  tied head, config, tokenizer files), an off-by-one position, a BOS lm-eval would prepend.
A random model has near-chance accuracy: the point is agreement, item by item. Margins between
the best two options are checked to be far above float noise, so a tie cannot flip one rule.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval",
                              reason="lm-eval not installed (pip install -r requirements-dev.txt)")
pytest.importorskip("transformers", reason="lm-eval's hf model needs transformers")

sys.path.insert(0,
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import export_hf               # noqa: E402

import data                    # noqa: E402
from scale import weights  # noqa: E402
import eval as evaluation      # noqa: E402
from model import Decoder, LMConfig, VLM, VisionConfig   # noqa: E402
from scale.weights import save_vlm   # noqa: E402

WORDS = ("apples bread carrots cheese fish grapes honey nuts rice seeds soup plums forest cave "
         "river desert castle garden mountain lake village meadow red green blue yellow circle "
         "square triangle").split()
CORPUS = [f"Question: what does the {a} {b} eat? Answer: {c} ." for a in WORDS[:8]
          for b in WORDS[8:16]
          for c in WORDS[16:20]] + [" " + " ".join(WORDS)] * 50
TASK = "lingudistill_mc_check"


def make_items(tok, n=16):
    """Items whose options (leading space: the context ends without one) have equal token
    length within an item; lengths 1-3 across items."""
    by_len = {}
    for w in WORDS + [a + b for a in ("re", "un") for b in WORDS]:
        by_len.setdefault(len(tok.encode(" " + w).ids), []).append(" " + w)
    lengths = sorted(k for k, v in by_len.items() if len(v) >= 4)[:3]
    assert lengths and 1 in lengths, f"tokenizer gives option lengths {sorted(by_len)}"
    items = []
    for i in range(n):
        pool = by_len[lengths[i % len(lengths)]]
        opts = [pool[(i + 3 * k) % len(pool)] for k in range(3 + i % 2)]
        if len(set(opts)) < len(opts):
            opts = pool[:3 + i % 2]
        items.append({"context": f"Question: what does the {WORDS[i % 8]} {WORDS[8 + i % 8]} eat? "
                      "Answer:",
                      "options": opts, "answer": i % len(opts)})
    return items


def our_sum_logprobs(decoder, tok, item):
    """Sum of log-probabilities of each option's tokens after the context, by our Decoder."""
    ctx = tok.encode(item["context"]).ids
    out = []
    for opt in item["options"]:
        ids = ctx + tok.encode(opt).ids
        with torch.no_grad():
            logits, _ = decoder(torch.tensor([ids]))
        logp = F.log_softmax(logits[0].float(), -1)
        out.append(sum(float(logp[p - 1, ids[p]]) for p in range(len(ctx), len(ids))))
    return out


def test_lm_eval_matches_multiple_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    torch.manual_seed(0)
    src, out = tmp_path / "student", tmp_path / "export"
    tok = data.train_tokenizer(CORPUS, vocab_size=400)
    lm = LMConfig(vocab_size=tok.get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  ffn_dim=128, max_positions=128)
    vlm = VLM(lm,
              VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
              data.special_id(tok, data.IMAGE_TOKEN))
    with torch.no_grad():                              # sharper random distributions: clear margins
        vlm.decoder.embed.weight.mul_(20)
    save_vlm(vlm, str(src))                                # a student folder as train.py writes it
    weights.save_tokenizer(tok, str(src))
    export_hf.export(str(src), str(out))
    decoder = vlm.decoder.eval()
    tok = data.load_tokenizer(str(out / "tokenizer.json"))

    items = make_items(tok)
    ours = [our_sum_logprobs(decoder, tok, it) for it in items]
    for it, s in zip(items, ours):
        n_tok = {len(tok.encode(o).ids) for o in it["options"]}
        assert len(n_tok) == 1, it                    # equal token lengths: sum and mean pick alike
        top = sorted(s, reverse=True)
        assert top[0] - top[1] > 1e-3, (it, s)             # no near-tie that float noise could flip

    with open(tmp_path / "items.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {tmp_path / 'items.jsonl'}\n"
        f"  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"                       # field names: the raw strings, no templating
        "doc_to_choice: options\n"
        "doc_to_target: answer\n"
        'target_delimiter: ""\n'                          # options carry their own leading space
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    res = simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=[TASK],
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                          device="cpu", batch_size=8, log_samples=True, num_fewshot=0)
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    for a, b in zip(theirs, ours):
        assert a == pytest.approx(b, abs=1e-4)             # same log-likelihood per option

    mc = evaluation.multiple_choice(decoder, tok, items, batch_size=4)
    lm_pred = [max(range(len(t)), key=t.__getitem__) for t in theirs]
    assert lm_pred == mc["pred"]                           # same choice, item by item
    assert res["results"][TASK]["acc,none"] == pytest.approx(mc["acc"])
    assert 0 < mc["acc"] < 1                               # the check is not vacuous
