"""The research tools' command lines (tools/toolflags.py): --help / -h exit 0 and describe every
flag with its default; an unknown flag names its closest match; flags the tool sets are refused."""
import os
import subprocess
import sys

import pytest

import experiment
import handoff_study
import real_experiment
import toolflags
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"experiment.py": experiment, "handoff_study.py": handoff_study,
         "real_experiment.py": real_experiment}


@pytest.mark.parametrize("tool,flag", [("experiment.py", "--help"), ("handoff_study.py", "-h"),
                                       ("real_experiment.py", "--help")])
def test_help_exits_0_and_describes_every_flag_with_its_default(tool, flag, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), flag,
                           f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for key, (default, doc) in TOOLS[tool].FLAGS.items():
        assert f"--{key}={default if default != '' else chr(34) * 2}" in proc.stdout
        assert doc and doc in proc.stdout
    assert "--tower=learned" in proc.stdout            # train.py's flags, with their defaults
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool,argv,hint", [
    ("experiment.py", ["--seedz=1"], "did you mean --seed"),
    ("experiment.py", ["--merge_lam=0.5"], "did you mean --merge_lams?"),
    ("handoff_study.py", ["--pipeline=base"], "did you mean --pipelines?"),
    ("real_experiment.py", ["--teachr=x"], "did you mean --teacher?"),
    ("real_experiment.py", ["--towr=oracle"], "did you mean --tower?"),
])
def test_unknown_flag_names_the_closest_match(tool, argv, hint):
    with pytest.raises(ValueError, match="unknown config key") as e:
        toolflags.parse(argv, TOOLS[tool].FLAGS)
    assert hint in str(e.value)


def test_flags_the_tool_sets_are_refused_and_the_rest_go_to_train():
    with pytest.raises(ValueError, match="--seed: set by this tool"):
        experiment.main(["--seed=3"])
    opts, rest = toolflags.parse(["--seeds=4,5", "--preset=smoke", "cfg.json"],
                                 experiment.FLAGS)
    assert opts["seeds"] == "4,5" and opts["jobs"] == "1" and rest == ["--preset=smoke", "cfg.json"]
    with pytest.raises(ValueError, match="--jobs: expected --jobs=value"):
        toolflags.parse(["--jobs"], experiment.FLAGS)
    assert train.get_config(rest[:1]).preset == "smoke"
