"""train.py: config parsing, checkpoints, resume, NaN handling, and the smoke pipeline."""
import json
import math
import os

import pytest
import torch

import train
from train import get_config, Checkpoints, TrainConfig


# --------------------------------------------------------------------------- config

def test_cli_overrides_preset_and_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"distill_steps": 7, "alpha": 0.5}))
    cfg = get_config(["--preset=smoke", str(path), "--alpha=2", "--compile=false"])
    assert (cfg.preset, cfg.distill_steps, cfg.alpha, cfg.compile, cfg.lm_dim) == ("smoke", 7, 2.0, False, 32)
    assert get_config([]).preset == "tiny"


@pytest.mark.parametrize("argv,message", [
    (["--lr=3"], "unknown config key --lr"),
    (["--alpha=big"], "--alpha: expected float, got 'big'"),
    (["--compile=yes"], "--compile: expected true/false"),
    (["--policy=half"], "--policy='half'; expected one of"),
    (["--scope=teacher"], "--scope='teacher'; expected one of"),
    (["--preset=huge"], "--preset='huge'; expected one of"),
    (["--batch_size=0"], "--batch_size must be >= 1"),
    (["--alpha"], "expected --alpha=value"),
    (["missing.json"], "config file missing.json"),
])
def test_bad_config_is_a_clear_error(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        get_config(argv)


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 1}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\]"):
        get_config([str(path)])


# --------------------------------------------------------------------------- checkpoints

def test_checkpoints_are_atomic_keep_last_and_reject_corrupt_files(tmp_path):
    cfg = TrainConfig()
    ck = Checkpoints(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        ck.save(step, {"step": step, "config": train.asdict(cfg), "w": torch.ones(2) * step})
    assert [os.path.basename(p) for p in ck.paths()] == ["step_0000002.pt", "step_0000003.pt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    assert torch.equal(ck.load(ck.paths()[-1], cfg)["w"], torch.full((2,), 3.0))
    with open(ck.paths()[-1], "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="step_0000003.pt is truncated or corrupt"):
        ck.load(ck.paths()[-1], cfg)
    with pytest.raises(ValueError, match="comes from another config:\n  lm_dim: checkpoint 128 vs run 64"):
        ck.load(ck.paths()[0], train.replace(cfg, lm_dim=64))
