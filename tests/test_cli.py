"""Every command a user runs explains itself: `--help` and `-h` exit 0 and describe every flag;
train.py's help comes from TrainConfig's own comments; an unknown flag names its closest match."""
import os
import runpy
import subprocess
import sys
from dataclasses import fields

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["train.py", "eval.py"] + sorted(
    os.path.join("tools", f) for f in os.listdir(os.path.join(ROOT, "tools"))
    if f.endswith(".py")
    and f not in ("chat.py", "toolflags.py", "oracle.py"))   # modules the tools / train.py import


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command, tmp_path, monkeypatch, capsys):
    """Run as `python COMMAND --help` / `-h` would (runpy, in this process: fast)."""
    monkeypatch.chdir(tmp_path)
    for flag in ("--help", "-h"):
        monkeypatch.setattr(sys, "argv", [command, flag])
        try:
            runpy.run_path(os.path.join(ROOT, command), run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), (command, flag, e.code)
        out = capsys.readouterr().out
        assert "usage" in out.lower() and len(out.splitlines()) >= 3, (command, flag, out)
    assert os.listdir(tmp_path) == []                       # asking for help writes nothing


def test_help_as_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "-h"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--distill_steps=300" in r.stdout, r.stderr


def test_train_help_lists_every_flag_with_its_default_and_comment(capsys):
    train.main(["--help"])
    out = capsys.readouterr().out
    for f in fields(train.TrainConfig):
        line = next(l for l in out.splitlines() if l.strip().startswith(f"--{f.name}="))
        assert len(line.split(maxsplit=1)) == 2, f"--{f.name} has no description: {line!r}"
    assert "--distill_steps=300" in out and "--compile=false" in out


def test_unknown_flag_names_its_closest_match():
    with pytest.raises(ValueError, match=r"unknown config key --distil_steps; did you mean "
                                         r"--distill_steps\?"):
        train.get_config(["--distil_steps=3"])
    with pytest.raises(ValueError, match="unknown config key --zzz; see --help"):
        train.get_config(["--zzz=1"])


def test_the_example_config_file_is_valid():
    cfg = train.get_config([os.path.join(ROOT, "configs", "example.json")])
    assert cfg.distill_steps == 600 and cfg.variant == "selective-600"
