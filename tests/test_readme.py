"""README's example commands run as written (at smoke size: the out/ they read is made by
`train.py --preset=smoke` in a temporary folder)."""
import os
import re
import shlex
import subprocess
import sys

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(heading):
    """The commands of the first ```bash block after `heading`, continuation lines joined,
    comments dropped."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading):], re.S).group(1)
    block = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if shlex.split(line, comments=True)]


def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.run(train.get_config(["--preset=smoke", "--eval=false"]))       # out/, as README's run
    commands = readme_block("## Examples")
    assert len(commands) >= 4
    for argv in commands:
        assert argv[0] == "python" and argv[1].endswith(".py"), argv
        r = subprocess.run([sys.executable, os.path.join(ROOT, argv[1]), *argv[2:]],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (argv, r.stderr[-3000:])
    assert os.path.isfile(tmp_path / "examples" / "colour.png")


def readme_text():
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_the_file_table_gives_each_file_its_line_count():
    rows = re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", readme_text(), re.M)
    assert {name for name, _ in rows} >= {"train.py", "kvshare.py", "distill.py", "model.py", "data.py"}
    for name, lines in rows:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert sum(1 for _ in f) == int(lines), f"README: {name} has {lines} lines"


def test_the_step_pseudocode_names_functions_that_exist():
    import importlib
    code = re.search(r"\*\*One distill step, as the code runs it\*\*.*?```python\n(.*?)```",
                     readme_text(), re.S).group(1)
    names = re.findall(r"\b((?:plumbing|scale)\.\w+|train|data|kvshare|distill|model)\.([\w.]+)",
                       code)
    assert len(names) >= 8
    for module, path in names:
        obj = importlib.import_module(module)
        for part in path.split("."):
            obj = getattr(obj, part)          # AttributeError: README names a function that is gone
        assert callable(obj), (module, path)


def test_the_reference_step_calls_the_method_by_name():
    """README's pseudocode is the code: train.distill_step calls the three functions it names."""
    import inspect
    source = inspect.getsource(train.distill_step)
    for call in ("kvshare.student_prefill(", "kvshare.teacher_continue(", "distill.distill_loss("):
        assert call in source, call
