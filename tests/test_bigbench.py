"""tools/bigbench.py on synthetic BIG-bench task.json files (a folder and a tiny .tar.gz)
written here: no download."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

sys.path.insert(0,
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import bigbench as bb          # noqa: E402

PLAIN = {"name": "plain_mc", "canary": "x", "description": "d", "keywords": ["multiple choice"],
         "examples": [{"input": "2 + 2 =", "target_scores": {"3": 0, "4": 1, "5": 0}},
                      {"input": "The sky is", "target_scores": {"green": 0, "blue": 1}},
                      {"input": "2 + 2 =", "target_scores": {"3": 0, "4": 1, "5": 0}},   # duplicate
                      {"input": "Tied", "target_scores": {"a": 1, "b": 1, "c": 0}}]}       # skipped
PREFIXED = {"name": "prefixed", "canary": "x", "description": "d", "keywords": ["common sense"],
            "task_prefix": "Answer the question.\n", "example_input_prefix": "\nSentence: ",
            "example_output_prefix": "\nAnswer: ", "choice_prefix": "\n - ",
            "append_choices_to_input": True,
            "examples": [{"input": "Cats are",
                          "target_scores": {"plants": 0.0, "animals": 1.0, "rocks": 0.25}}]}
NO_CHOICES = {"name": "no_choices", "canary": "x", "description": "d", "keywords": ["common sense"],
              "task_prefix": "P:", "append_choices_to_input": False,
              "examples": [{"input": "Fire is", "target_scores": {"cold": 0, "hot": 1}}]}
PARENT = {"name": "parent", "canary": "x", "description": "d", "keywords": ["common sense"]}
SUB_A = {"name": "a", "canary": "x", "description": "d", "keywords": ["common sense"],
         "examples": [{"input": "Ice is", "target_scores": {"cold": 1, "hot": 0}}]}
SUB_B = {"name": "b", "canary": "x", "description": "d", "keywords": ["common sense"],
         "examples": [{"input": "Snow is", "target_scores": {"white": 1, "black": 0}},
                      {"input": "Grass is", "target": "green"}]}
NONLANG = {"name": "ascii_art", "canary": "x", "description": "d", "keywords": ["non-language"],
           "examples": [{"input": "#### ##", "target_scores": {"cat": 1, "dog": 0}}]}
DEV = {"name": "social_iqa", "canary": "x", "description": "d", "keywords": ["social reasoning"],
       "examples": [{"input": "DEV SECRET question",
                     "target_scores": {"DEV SECRET answer": 1, "no": 0}}]}
RESERVED = {"name": "winowhy", "canary": "x", "description": "d", "keywords": ["common sense"],
            "examples": [{"input": "RESERVED SECRET question",
                          "target_scores": {"RESERVED SECRET answer": 1, "no": 0}}]}

FILES = {"plain_mc/task.json": PLAIN, "prefixed/task.json": PREFIXED,
         "no_choices/task.json": NO_CHOICES,
         "parent/task.json": PARENT, "parent/a/task.json": SUB_A, "parent/b/task.json": SUB_B,
         "ascii_art/task.json": NONLANG, "social_iqa/task.json": DEV, "winowhy/task.json": RESERVED}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bb") / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"
    for rel, obj in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj))
    return str(root.parent.parent.parent)


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bbtar") / "bigbench-1.0.0.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for rel, obj in FILES.items():
            raw = json.dumps(obj).encode()
            info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/" + rel)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_parse_member_paths():
    assert bb.parse_member(
        "bigbench-1.0.0/bigbench/benchmark_tasks/physics/task.json") == ("physics", None)
    assert bb.parse_member(
        "x/benchmark_tasks/arithmetic/1_digit/task.json") == ("arithmetic", "1_digit")
    assert bb.parse_member("x/benchmark_tasks/physics/data/Questions.tsv") is None
    assert bb.parse_member("x/benchmark_tasks/a/b/c/task.json") is None


def test_default_format_answer_index_dedup_and_ties(folder):
    items, report = bb.read_tasks(["plain_mc"], folder)
    # duplicate dropped, tie skipped
    assert report["plain_mc"] == {"n": 2, "skipped": 1, "subtasks": 0}
    first = items["plain_mc"][0]
    order = np.random.RandomState(42).permutation(["3", "4", "5"])        # BIG-bench's listed order
    listed = "".join("\n  choice: " + c for c in order)
    assert first["context"] == "\nQ: 2 + 2 =" + listed + "\nA:"           # trailing space moved ...
    assert first["options"] == [" 3", " 4", " 5"] and first["answer"] == 1     # ... to every option
    assert first["task"] == "plain_mc" and first["scores"] == [0.0, 1.0, 0.0]
    verbatim, _ = bb.read_tasks(["plain_mc"], folder, move_spaces=False)
    assert verbatim["plain_mc"][0]["context"] == first["context"] + " "
    assert verbatim["plain_mc"][0]["options"] == ["3", "4", "5"]
    assert items[
        "plain_mc"][1]["answer"] == 1 and items["plain_mc"][1]["options"] == [" green", " blue"]


def test_task_prefixes_and_partial_scores(folder):
    (it,), = bb.read_tasks(["prefixed"], folder)[0].values()
    order = np.random.RandomState(42).permutation(["animals", "plants", "rocks"])
    assert it[
        "context"] == "Answer the question.\n\nSentence: Cats are" + "".join(
            "\n - " + c for c in order) + \
        "\nAnswer:"
    assert it["options"] == [" plants", " animals", " rocks"] and it["answer"] == 1
    # partial credit, BIG-bench's chance
    assert bb.bigbench_grade([it], [2]) == (0.25, pytest.approx(1.25 / 3))
    (it,), = bb.read_tasks(["no_choices"], folder)[0].values()
    assert it[
        "context"] == "P:\nQ: Fire is\nA:" and it[
            "options"] == [" cold", " hot"] and it["answer"] == 1


def test_subtasks_and_limit(folder):
    items, report = bb.read_tasks(["parent"], folder)
    # generative example skipped
    assert [it["task"] for it in items["parent"]] == ["parent:a", "parent:b"]
    assert report["parent"] == {"n": 2, "skipped": 1, "subtasks": 2}
    assert len(bb.read_tasks(["plain_mc"], folder, limit=1)[0]["plain_mc"]) == 1


def test_tarball_reads_the_same(folder, tarball):
    names = ["plain_mc", "prefixed", "parent"]
    assert bb.read_tasks(names, tarball) == bb.read_tasks(names, folder)


def test_reserved_tasks_are_refused_before_opening_anything(folder, monkeypatch):
    opened = []
    monkeypatch.setattr(bb, "_iter_files", lambda *a, **k: opened.append(a) or iter(()))
    for name in ("winowhy", "date_understanding", "winowhy:sub"):
        with pytest.raises(bb.ReservedTaskError, match="reserved"):
            bb.read_tasks(["plain_mc", name], folder)
    assert not opened
    with pytest.raises(bb.ReservedTaskError):
        bb.read_tasks(["winowhy"], "/no/such/source")                     # refused, not "not found"
    with pytest.raises(bb.ReservedTaskError, match="causal_judgment"):
        bb.main(["--tasks=physics,causal_judgment", "--ckpt=/nowhere"])
    assert set(bb.RESERVED_TASKS).isdisjoint(bb.DEV_TASKS) and len(bb.RESERVED_TASKS) == 10


def test_missing_task_is_an_error(folder):
    with pytest.raises(ValueError, match="no task 'nope'"):
        bb.read_tasks(["nope"], folder)


@pytest.mark.parametrize("which", ["folder", "tarball"])
def test_training_text_excludes_dev_and_reserved(which, folder, tarball, monkeypatch):
    source = folder if which == "folder" else tarball
    real_load = bb._load_json
    loaded = []
    monkeypatch.setattr(bb, "_load_json", lambda raw,
                        where: loaded.append(str(where)) or real_load(raw, where))
    texts, counts = bb.training_text(source)
    joined = "\n".join(texts)
    assert "SECRET" not in joined and not any("social_iqa" in p or "winowhy" in p for p in loaded)
    assert ("2 + 2 = 4" in texts and "Cats are animals" in texts and "Grass is green" in texts
            and "Ice is cold" in texts)
    assert "#### ## cat" not in texts                                         # non-language keyword
    # tie skipped, duplicate once
    assert counts == {"plain_mc": 2, "prefixed": 1, "no_choices": 1, "parent": 3}
    texts, counts = bb.training_text(source, exclude=("plain_mc",), max_per_task=1)
    assert "plain_mc" not in counts and counts["parent"] == 1
