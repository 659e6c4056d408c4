"""tools/real_experiment.py: its data (English VQA in chat format, BIG-bench text split into
training and held-out tasks), and the whole experiment end to end with a tiny teacher."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

import bigbench  # noqa: E402
import real_experiment as rx  # noqa: E402
from conftest import make_teacher_and_jsonl  # noqa: E402


def write_task(root, name, examples):
    os.makedirs(root / name, exist_ok=True)
    (root / name / "task.json").write_text(json.dumps({"name": name, "keywords": ["reading"],
                                                       "examples": examples}))


def mc_examples(n, words):
    return [{"input": f"question {i} about {words} ?",
             "target_scores": {f"{words} {i}": 1, f"other {i}": 0, "neither": 0}}
            for i in range(n)]


def text_examples(n, words):
    return [{"input": f"the {words} story number {i} goes on and on for a while", "target":
             f"and it ends with {words} {i}"} for i in range(n)]


@pytest.fixture
def bench_folder(tmp_path):
    root = tmp_path / "bigbench" / "benchmark_tasks"
    for task in bigbench.DEV_TASKS:
        write_task(root, task, mc_examples(4, task))
    train_tasks = [t for t in (f"story_{i}" for i in range(200)) if not rx.held_out_task(t)][:3]
    held = [t for t in (f"story_{i}" for i in range(200)) if rx.held_out_task(t)][:1]
    for t in train_tasks + held:
        write_task(root, t, text_examples(5, t))
    return tmp_path / "bigbench", train_tasks, held


def test_vision_example_asks_in_english_in_chat_format():
    ex = {"image": None, "prompt": "<image> is coloured", "response": " red .",
          "source": "colour"}
    out = rx.vision_example(ex)
    assert out["prompt"] == ("<|im_start|>user\n<image>What colour is the shape in the image?"
                             "<|im_end|>\n<|im_start|>assistant\n")
    assert out["response"] == "red" and out["source"] == "colour"


def test_transfer_items_put_the_image_words_where_the_image_was():
    import eval as ev
    ex = {"image": None, "prompt": "<image> is shaped", "response": " circle .",
          "source": "shape", "desc": "the red circle"}
    items = rx.transfer_items([ex, {**ex, "source": "count", "response": " 2 ."}])
    assert len(items) == 1 and items[0]["split"] == "shape"      # count: the words don't say
    assert items[0]["response"] == " circle"
    assert ev.oracle_example(items[0])["prompt"] == (
        "<|im_start|>user\nthe red circle. What shape is in the image?"
        "<|im_end|>\n<|im_start|>assistant\nIt is a")


def test_text_example_splits_at_a_quarter_of_the_words():
    out = rx.text_example("one two three four five six seven eight nine ten eleven twelve")
    assert out == {"image": None, "prompt": "one two three", "response":
                   " four five six seven eight nine ten eleven twelve", "source": "text"}
    assert rx.text_example("a b c d")["prompt"] == "a b c"      # at least 3 words, 1 left


def test_build_data_keeps_held_out_tasks_out_of_training(bench_folder, tmp_path):
    source, train_tasks, held = bench_folder
    paths, heldout = rx.build_data(tmp_path / "data", str(source), n_vision=3)
    text = (tmp_path / "data" / "text.jsonl").read_text()
    assert all(t in text for t in train_tasks) and not any(t in text for t in held)
    assert heldout and all(held[0] in h for h in heldout)
    assert not any(d in text or any(d in h for h in heldout) for d in bigbench.DEV_TASKS)
    vision = [json.loads(line) for line in open(paths[0])]
    assert len(vision) == 3 * len(rx.QUESTIONS)
    assert all(os.path.isfile(tmp_path / "data" / v["image"]) for v in vision)


def test_experiment_end_to_end_with_a_tiny_teacher(bench_folder, tmp_path, monkeypatch):
    source, _, _ = bench_folder
    teacher_dir, _, _ = make_teacher_and_jsonl(tmp_path)
    # like SmolLM2's folder: its own token is EOS and pad (no ids appended past the teacher's)
    (teacher_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    out = tmp_path / "real"
    argv = [f"--teacher={teacher_dir}", "--seeds=0,1", f"--out_dir={out}",
            f"--bigbench={source}", "--items=3", "--merge_lams=0.5", "--align_steps=2",
            "--adapt_steps=2", "--distill_steps=2", "--batch_size=4", "--max_len=400"]
    rx.main(argv)
    result = json.loads((out / "real.json").read_text())
    names = {"teacher", "adapted", *rx.experiment.VARIANTS, "merge λ=0.5"}
    assert len(result["per_seed"]) == 2 and set(result["mean"]) == names
    for row in result["per_seed"][0].values():
        assert 0 <= row["acc"] <= 1 and row["ppl"] > 1 and row["kl"] >= 0
    rows = result["per_seed"][0]
    recovery = rows["adapted"]["recovery"]   # 0, or NaN if nothing dropped
    assert recovery == 0 or math.isnan(recovery)
    assert rows["teacher"]["kl"] == 0 and rows["adapted"]["kl"] > 0      # the primary metric
    for name in ("adapted", "LinguDistill", "merge λ=0.5"):          # T on the vision prompts
        r = rows[name]
        assert {f"transfer_{s}" for s in rx.TRANSFER_LEADS} <= set(r)
        assert r["kl_blind"] > 0 and r["transfer"] == pytest.approx(
            1 - r["kl_handoff"] / r["kl_blind"])
    assert "transfer" not in rows["teacher"]
    # text-replay KD on this data is the same run as the text-only teacher / LinguDistill
    assert rows["text-replay KD (own text)"] == rows["text-only teacher KD"]
    assert rows["text-replay KD (student KV)"] == rows["LinguDistill"]
    assert not (out / "seed0" / "distilled-text-replay-kd-own-text").exists()
    assert rows["teacher"]["recovery_kl"] == 1 and rows["adapted"]["recovery_kl"] == 0
    assert rows["LinguDistill"]["recovery_kl"] == pytest.approx(
        1 - rows["LinguDistill"]["kl"] / rows["adapted"]["kl"])
    assert "LinguDistill − merge λ=0.5" in result["paired"]        # every merge, not only one
    paired = result["paired"]["LinguDistill − CE-only"]
    assert set(paired) == {"recovery_kl", "recovery", "vision"}
    assert "| difference | KL recovery | dev recovery | vision | KL recovery per seed |" in \
        (out / "real.md").read_text()
    assert (out / "real.md").read_text().startswith("seeds [0, 1]")
    assert "Holm-adjusted over the family" in (out / "real.md").read_text()
    assert "LinguDistill − CE-only | recovery_kl" in result["p_holm"]
    assert "transfer_shuffled" in rows["LinguDistill"]           # the null on the vision prompts
    # a re-run reads the finished seeds back instead of training again
    before = (out / "seed0.json").stat().st_mtime_ns
    rx.main(argv)
    assert (out / "seed0.json").stat().st_mtime_ns == before
    # --results_dir: the finished results copied to a tracked folder, then read back from there
    # alone by a run in a fresh --out_dir, which trains and evaluates nothing
    kept = tmp_path / "docs_seeds_real"
    rx.main(argv + [f"--results_dir={kept}"])
    assert sorted(p.name for p in kept.iterdir()) == ["seed0.json", "seed1.json",
                                                      "settings.json", "teacher.json"]
    nothing = lambda *a, **k: pytest.fail("a finished seed was run again")     # noqa: E731
    monkeypatch.setattr(rx, "run_seed", nothing)
    monkeypatch.setattr(rx, "evaluate", nothing)
    fresh = [a if not a.startswith("--out_dir") else f"--out_dir={tmp_path / 'fresh'}"
             for a in argv]
    rx.main(fresh + [f"--results_dir={kept}"])
    again = json.loads((tmp_path / "fresh" / "real.json").read_text())
    assert again["per_seed"] == result["per_seed"] and again["paired"] == result["paired"]
    with pytest.raises(ValueError, match="settings.json: .*--items differ"):
        rx.main(fresh + [f"--results_dir={kept}", "--items=2"])
    monkeypatch.undo()
    # an interrupted seed keeps the rows it measured: only the missing model is measured again
    kept = json.loads((out / "seed1" / "rows.json").read_text())
    assert set(kept) == names - {"teacher", "text-replay KD (own text)",      # the aliases
                                 "text-replay KD (student KV)"}
    kept["LinguDistill"]["ppl"] = -1.0                    # a marker no measurement can give
    del kept["merge λ=0.5"]
    (out / "seed1" / "rows.json").write_text(json.dumps(kept))
    (out / "seed1.json").unlink()
    rx.main(argv)
    again = json.loads((out / "seed1.json").read_text())
    assert again["LinguDistill"]["ppl"] == -1.0 and again["merge λ=0.5"]["ppl"] > 1
    # the folder's results are never mixed with another setting's: refused before any work
    for changed in ("--items=2", "--adapt_lr=1e-3"):
        flag = changed.split("=")[0]
        with pytest.raises(ValueError, match=f"settings.json: .*{flag} differ"):
            rx.main(argv + [changed])
    assert json.loads((out / "seed1.json").read_text()) == again


def test_bad_flags_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--teacher"):
        rx.parse_args(["--teacher=" + str(tmp_path / "missing")])
    teacher_dir, _, _ = make_teacher_and_jsonl(tmp_path)
    with pytest.raises(ValueError, match="--variants"):
        rx.parse_args([f"--teacher={teacher_dir}", "--variants=LinguDistill,nope"])
    with pytest.raises(ValueError, match="--merge_lams"):
        rx.parse_args([f"--teacher={teacher_dir}", "--merge_lams=1.5"])
    with pytest.raises(ValueError, match="unknown config key"):
        rx.parse_args([f"--teacher={teacher_dir}", "--no_such_flag=1"])


@pytest.mark.parametrize("tool,argv,message", [
    ("real_experiment.py", ["--teacher=no/such/folder"], "--teacher='no/such/folder'"),
    ("handoff_study.py", ["--only=nope"], "--only='nope'"),
    ("handoff_study.py", ["--pipelines=base,nope"], "--pipelines='base,nope'"),
])
def test_tool_bad_flags_exit_with_one_line(tool, argv, message, tmp_path):
    """Bad flags of the research tools: one line naming the flag on stderr, exit status 1,
    before any work (nothing written to --out_dir)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", tool), *argv,
                           f"--out_dir={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: ") and message in lines[0]
    assert not out.exists()


def test_text_replay_variants_are_aliases_of_the_same_config_here():
    base = ["--kd_sources=text", "--seed=0"]
    aliases = rx.variant_aliases(base, list(rx.experiment.VARIANTS))
    assert aliases == {"text-replay KD (own text)": "text-only teacher KD",
                       "text-replay KD (student KV)": "LinguDistill"}
    assert rx.variant_aliases(base, ["text-replay KD (own text)", "CE-only"]) == {}
    assert rx.effective_flags(["--a=1", "--b=2", "--a=3", "x"]) == (("a", "3"), ("b", "2"))


def test_strong_tasks_and_their_recovery():
    bench = {"a": [{"options": ["x", "y"]}] * 4, "b": [{"options": ["x", "y", "z", "w"]}] * 4}
    teacher = {"acc_a": 0.55, "acc_b": 0.40}             # a: 5 above chance 50; b: 15 above 25
    assert rx.strong_tasks(teacher, bench) == ["b"]
    assert rx.strong_tasks(teacher, bench, margin=0.05) == ["a", "b"]
    rows = {"teacher": dict(teacher), "adapted": {"acc_a": 0.5, "acc_b": 0.20},
            "LinguDistill": {"acc_a": 0.5, "acc_b": 0.35}}
    rx.add_strong(rows, ["b"])
    assert rows["LinguDistill"]["acc_strong"] == 0.35
    assert rows["LinguDistill"]["recovery_strong"] == pytest.approx(0.75)
    assert rows["adapted"]["recovery_strong"] == 0.0
    assert "acc_strong" not in rx.add_strong({"teacher": {}}, [])["teacher"]


def test_settings_written_before_a_new_train_flag_still_match(tmp_path):
    """A train flag added after a results folder was written counts there as its default value."""
    current = rx.settings(rx.train.get_config([]), {"items": 60, "teacher": "smollm2-135m"})
    older = json.loads(json.dumps(current))
    del older["train"]["fused_loss"]                        # a folder from before --fused_loss
    (tmp_path / "settings.json").write_text(json.dumps(older))
    rx.check_settings(str(tmp_path), current)               # accepted
    changed = rx.settings(rx.train.get_config(["--fused_loss=true"]),
                          {"items": 60, "teacher": "smollm2-135m"})
    with pytest.raises(ValueError, match="--fused_loss differ"):
        rx.check_settings(str(tmp_path), changed)
