"""train.py: config parsing, checkpoints, resume, NaN handling, and the smoke pipeline."""
import dataclasses
import json
import math
import os
import signal

import pytest
import torch

import train
from conftest import make_teacher_and_jsonl
from plumbing.loop import Checkpoints
from train import get_config, TrainConfig


# --------------------------------------------------------------------------- config

def test_cli_overrides_preset_and_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"distill_steps": 7, "alpha": 0.5}))
    cfg = get_config(["--preset=smoke", str(path), "--alpha=2", "--compile=false"])
    assert (cfg.preset, cfg.distill_steps, cfg.alpha, cfg.compile,
            cfg.lm_dim) == ("smoke", 7, 2.0, False, 32)
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
    # values that make no sense, refused by name before any work
    (["--alpha=-1"], "--alpha must be a finite number >= 0"),
    (["--grad_clip=0"], "--grad_clip must be a finite number > 0"),
    (["--pretrain_lr=nan"], "--pretrain_lr must be a finite number > 0"),
    (["--distill_lr=-1e-3"], "--distill_lr must be a finite number > 0"),
    (["--preset=smoke", "--preset=tiny"], "--preset given twice"),
    (["--kd_chunk=-1"], "--kd_chunk must be >= 0"),
    (["--shuffle_factor=3"], "--shuffle_factor=3 must divide the patch grid 8"),
    (["--lm_heads=3"], "--lm_dim=128 must be divisible by --lm_heads=3"),
    (["--n_entities=99"], "--n_entities must be in"),
    (["--warmup_frac=1"], "--warmup_frac must be in"),
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
        ck.save(step, {"step": step, "config": dataclasses.asdict(cfg), "w": torch.ones(2) * step,
                       "model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "bad_steps": 0})
    assert [os.path.basename(p) for p in ck.paths()] == ["step_0000002.pt", "step_0000003.pt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    assert torch.equal(ck.load(ck.paths()[-1], cfg)["w"], torch.full((2,), 3.0))
    with open(ck.paths()[-1], "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="step_0000003.pt is truncated or corrupt"):
        ck.load(ck.paths()[-1], cfg)
    with pytest.raises(ValueError,
                       match="comes from another config:\n  lm_dim: checkpoint 128 vs run 64"):
        ck.load(ck.paths()[0], dataclasses.replace(cfg, lm_dim=64))


# --------------------------------------------------------------------------- the smoke pipeline

def read_log(out_dir, stage):
    return [json.loads(l) for l in open(os.path.join(out_dir, "log.jsonl"))
            if json.loads(l)["stage"] == stage]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke"))
    models, world, tok = train.run(get_config(["--preset=smoke", f"--out_dir={out}",
                                               "--eval=false"]))
    return out, models, world, tok


def test_smoke_pipeline_checkpoints_reload_and_eval_gives_fractions(smoke_run):
    import eval as evaluation
    from scale.weights import load_hf_lm, load_vlm
    out, models, world, tok = smoke_run
    reloaded = {"teacher": load_hf_lm(os.path.join(out, "teacher")),
                "adapted": load_vlm(os.path.join(out, "adapted")),
                "distilled": load_vlm(os.path.join(out, "distilled-selective-full"))}
    for name, key in (("teacher", "teacher"), ("distilled", "distilled-selective-full")):
        for k, v in models[key].state_dict().items():
            assert torch.equal(v, reloaded[name].state_dict()[k]), (name, k)
    rows = evaluation.evaluate_models(reloaded, world, tok, 32)
    assert set(rows) == {"teacher", "adapted", "distilled"}
    for name, row in rows.items():
        fractions = {k: v for k, v in row.items()          # accuracies (transfer T is <= 1, KLs
                     if not k.startswith(("transfer", "kl_")) or "top1" in k}   # are >= 0)
        assert row and all(0.0 <= v <= 1.0 for v in fractions.values()), (name, row)
        assert all(not v > 1 for k, v in row.items() if k.startswith("transfer"))
    assert "teacher_handoff" in rows["distilled"] and "vision" not in rows["teacher"]
    stages = {r["stage"] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))}
    assert stages == {"pretrain", "align", "adapt", "distill-selective-full"}
    assert all(math.isfinite(r["loss"]) for r in read_log(out, "pretrain"))


def test_adapt_stage_trains_only_vision_during_alignment(smoke_run):
    from scale.weights import load_hf_lm, load_vlm
    out, models, _, _ = smoke_run
    teacher, adapted = load_hf_lm(os.path.join(out,
                                               "teacher")), load_vlm(os.path.join(out, "adapted"))
    # after align + full fine-tune the decoder moved away from the teacher, and KD losses were
    # logged in distill
    assert not torch.equal(teacher.embed.weight, adapted.decoder.embed.weight)
    assert all("kd" in r for r in read_log(out, "distill-selective-full"))


def copy_stage_inputs(src, dst):
    import shutil
    for name in ("teacher", "adapted"):
        shutil.copytree(os.path.join(src, name), os.path.join(dst, name))


def straight_and_other(smoke_run, tmp_path, argv):
    """Two folders holding the smoke run's teacher and adapted model; the first trained straight
    through with argv. -> (straight, other) paths."""
    straight, other = str(tmp_path / "straight"), str(tmp_path / "other")
    for d in (straight, other):
        copy_stage_inputs(smoke_run[0], d)
    train.run(get_config(argv + [f"--out_dir={straight}"]))
    return straight, other


def before_distill_batch(monkeypatch, step, action):
    """Make train.get_batch call action() before it builds batch `step` of the distill stage;
    returns the function that undoes it."""
    real = train.get_batch

    def patched(setup, stage, s, *a, **k):
        if s == step and stage == "distill":
            action()
        return real(setup, stage, s, *a, **k)
    monkeypatch.setattr(train, "get_batch", patched)
    return lambda: monkeypatch.setattr(train, "get_batch", real)


def test_resume_after_a_crash_gives_bit_identical_losses(smoke_run, tmp_path, monkeypatch):
    argv = ["--preset=smoke", "--stage=distill", "--distill_steps=6", "--ckpt_every=2",
            "--eval=false", "--policy=uniform"]
    straight, crashed = straight_and_other(smoke_run, tmp_path, argv)

    def crash():
        raise RuntimeError("killed")            # a crash: no checkpoint but the periodic ones
    undo = before_distill_batch(monkeypatch, 4, crash)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(get_config(argv + [f"--out_dir={crashed}"]))
    undo()
    train.run(get_config(argv + [f"--out_dir={crashed}", "--resume=true"]))

    a, b = read_log(straight, "distill-uniform-full"), read_log(crashed, "distill-uniform-full")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["kd"], r["grad_norm"])
            for r in a] == [(r["loss"], r["kd"], r["grad_norm"]) for r in b]


def test_ctrl_c_saves_and_out_dir_plus_resume_alone_reproduces_the_run(smoke_run, tmp_path,
                                                                      monkeypatch, capsys):
    """SIGINT in the middle of a stage: the step finishes, a checkpoint is saved, main() exits
    with one line giving the resume command; `--out_dir=X --resume=true` alone (the run's config
    is read from X/run_config.json) then reproduces the uninterrupted run's losses."""
    argv = ["--preset=smoke", "--stage=distill", "--distill_steps=6", "--ckpt_every=100",
            "--eval=false", "--policy=uniform", "--kd=jsd"]
    straight, stopped = straight_and_other(smoke_run, tmp_path, argv)
    # what SIGINT does here (default, or ignored when the suite runs in the background)
    handler_before = signal.getsignal(signal.SIGINT)
    # Ctrl-C while step 3 is being prepared
    undo = before_distill_batch(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as e:
        train.main(argv + [f"--out_dir={stopped}"])
    assert str(e.value) == (f"train.py: interrupted: distill-uniform-full stopped at step 3 of 6; "
                            f"checkpoint saved in {stopped}/ckpt/distill-uniform-full. Resume "
                            f"with: python train.py --out_dir={stopped} --resume=true")
    assert os.listdir(os.path.join(stopped, "ckpt", "distill-uniform-full")) == ["step_0000003.pt"]
    assert not os.path.exists(os.path.join(stopped, "distilled-uniform-full"))
    undo()
    train.run(get_config([f"--out_dir={stopped}", "--resume=true"]))
    a, b = read_log(straight, "distill-uniform-full"), read_log(stopped, "distill-uniform-full")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["kd"], r["grad_norm"])
            for r in a] == [(r["loss"], r["kd"], r["grad_norm"]) for r in b]
    assert signal.getsignal(signal.SIGINT) is handler_before                # handler restored


def test_resume_alone_reads_the_run_config_explicit_flags_build_their_own(smoke_run, tmp_path):
    """--out_dir + --resume (+ run keys) alone: the run's saved config. Any other flag (as the
    experiment tools pass, several variants in one folder): the config those flags give."""
    out, _, _, _ = smoke_run
    copy_stage_inputs(out, tmp_path)
    argv = ["--preset=smoke", "--eval=false", f"--out_dir={tmp_path}", "--stage=distill"]
    train.run(get_config(argv + ["--policy=none", "--variant=ce"]))     # run_config: policy none
    assert get_config(argv + ["--resume=true"]).policy == "selective"
    alone = get_config([f"--out_dir={tmp_path}", "--resume=true", "--distill_steps=5"])
    assert (alone.policy, alone.variant, alone.preset, alone.distill_steps) == ("none", "ce",
                                                                            "smoke", 5)


def test_resume_refuses_a_checkpoint_from_another_config(smoke_run, tmp_path):
    out, _, _, _ = smoke_run
    copy_stage_inputs(out, tmp_path)
    argv = ["--preset=smoke", "--stage=distill", "--eval=false", f"--out_dir={tmp_path}"]
    train.run(get_config(argv))
    with pytest.raises(ValueError,
                       match="comes from another config:\n  alpha: checkpoint 1.0 vs run 0.5"):
        train.run(get_config(argv + ["--resume=true", "--alpha=0.5"]))


def test_non_finite_losses_are_skipped_counted_and_stop_the_run(smoke_run, tmp_path, monkeypatch):
    out, _, _, _ = smoke_run
    copy_stage_inputs(out, tmp_path)
    real = train.distill.distill_loss
    calls = {"n": 0}
    def nan_on_second_step(*a, **kw):
        calls["n"] += 1
        res = real(*a, **kw)
        if calls["n"] == 2 or calls["n"] >= 4:
            res["loss"] = res["loss"] * float("nan")
        return res
    monkeypatch.setattr(train.distill, "distill_loss", nan_on_second_step)
    argv = ["--preset=smoke", "--stage=distill", "--eval=false", f"--out_dir={tmp_path}",
            "--distill_steps=4", "--max_bad_steps=1"]
    with pytest.raises(RuntimeError,
                       match=r"2 steps with non-finite loss or gradients \(limit "
                       r"--max_bad_steps=1\)"):
        train.run(get_config(argv))
    log = read_log(str(tmp_path), "distill-selective-full")
    assert [r["step"] for r in log] == [1, 3] and log[-1]["bad_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in log)


# --------------------------------------------------------------------------- DDP (gloo, CPU)

def _ddp_worker(rank, world_size, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train.run(get_config(argv))
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process_with_double_batch(smoke_run, tmp_path):
    """Global KD normaliser across ranks and micro-batches: 2 ranks x batch 2 x 2 micro-batches
    must train like 1 process x batch 4 x 2 micro-batches (same examples, same losses)."""
    out, _, _, _ = smoke_run
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    for d in (ddp, single):
        copy_stage_inputs(out, d)
    argv = ["--preset=smoke", "--stage=distill", "--distill_steps=3", "--grad_accum=2",
            "--eval=false"]
    torch.multiprocessing.spawn(_ddp_worker,
                                args=(2, free_port(),
                                      argv + ["--batch_size=2", f"--out_dir={ddp}"]),
                                nprocs=2)
    train.run(get_config(argv + ["--batch_size=4", f"--out_dir={single}"]))
    a, b = read_log(ddp, "distill-selective-full"), read_log(single, "distill-selective-full")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert b[0]["kd"] > 0


def test_checkpoints_are_saved_from_the_unwrapped_module():
    from model import Decoder, LMConfig
    m = Decoder(LMConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8))
    compiled = torch.compile(m)                     # lazy: nothing is compiled until it is called
    assert train.unwrap(compiled) is m
    assert not any(k.startswith(("_orig_mod.", "module."))
                   for k in train.unwrap(compiled).state_dict())


# --------------------------------------------------------------------------- real-checkpoint path

def test_teacher_folder_and_jsonl_data_run_adapt_and_distill(tmp_path):
    """--teacher_path (an HF folder whose tokenizer has no <image>) + --data_path (LLaVA JSONL):
    the same stage code runs; the student's vocabulary grows for the new ids, old ids keep
    the teacher's embedding rows, and KD applies to --kd_sources only."""
    from scale.weights import load_hf_lm
    teacher_dir, teacher, _ = make_teacher_and_jsonl(tmp_path)
    out = tmp_path / "out"
    models, _, tok2 = train.run(get_config([
        "--preset=smoke", f"--teacher_path={teacher_dir}",
        f"--data_path={tmp_path / 'train.jsonl'}",
        "--kd_sources=knowledge_vqa,text_qa", f"--out_dir={out}", "--eval=false"]))
    student = models["distilled-selective-full"]
    assert student.decoder.cfg.vocab_size == tok2.get_vocab_size() > teacher.cfg.vocab_size
    assert tok2.token_to_id("<image>") >= teacher.cfg.vocab_size
    reloaded = load_hf_lm(teacher_dir)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k,
               v in models["teacher"].state_dict().items())
    log = read_log(str(out), "distill-selective-full")
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    assert {r["stage"]
            for r in map(json.loads,
                         open(out / "log.jsonl"))} == {"align", "adapt", "distill-selective-full"}


def test_real_checkpoint_config_errors(tmp_path):
    with pytest.raises(ValueError, match="--preset=paper needs --teacher_path"):
        get_config(["--preset=paper"])
    with pytest.raises(ValueError, match="--teacher_path=nowhere: no such file or folder"):
        get_config(["--teacher_path=nowhere"])
    with pytest.raises(ValueError, match="--data_path needs --teacher_path"):
        get_config([f"--data_path={tmp_path}"])
    with pytest.raises(ValueError, match="with --teacher_path the teacher is given"):
        get_config([f"--teacher_path={tmp_path}", "--stage=pretrain"])


def test_command_line_bad_input_exits_with_the_message_not_a_traceback(tmp_path):
    import subprocess
    import sys
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv, message in ((["--alpha=x"], "--alpha: expected float"),
                          ([f"--data_path={bad}", f"--teacher_path={tmp_path}", "--stage=distill"],
                           "data.jsonl line 2")):
        r = subprocess.run([sys.executable, os.path.join(root, "train.py"), *argv], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_image_splitting_trains_with_tiles_and_grid_tokens(tmp_path):
    """--image_splitting=true: the student gets the grid / global-image tokens (student-only ids
    the teacher never embeds) and every image becomes a global view + tiles (here 32-px tiles,
    square images resized to 64 px -> a 2x2 grid + the global view), through align, adapt and
    distill."""
    teacher_dir, teacher, jsonl = make_teacher_and_jsonl(tmp_path)
    models, _, tok = train.run(get_config([
        "--preset=smoke", f"--teacher_path={teacher_dir}", f"--data_path={jsonl}",
        "--kd_sources=knowledge_vqa,text_qa", "--image_splitting=true", "--image_max_side=64",
        "--num_workers=0", f"--out_dir={tmp_path / 'out'}", "--eval=false"]))
    student = models["distilled-selective-full"]
    assert student.image_splitting is not None and len(student.view_token_ids) == 65
    assert min(student.view_token_ids) >= teacher.cfg.vocab_size
    assert set(student.student_only_ids) >= {student.image_token_id, *student.view_token_ids}
    log = read_log(str(tmp_path / "out"), "distill-selective-full")
    assert len(log) == 3 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in log)


def test_kd_sources_in_the_tiny_world_set_the_gate_and_nothing_else(smoke_run, monkeypatch):
    """--kd_sources=text_qa (text-replay KD, issue 31): the distill stage's source gate gives KD
    to text_qa only; without it, to the language kinds (knowledge_vqa, text_qa) as before; the
    stage mixtures (which sources adapt trains on) do not move."""
    import distill
    import world as tinyworld
    out, _, world, _ = smoke_run
    tables = []
    real = distill.table_from_kinds
    monkeypatch.setattr(distill, "table_from_kinds",
                        lambda kinds, *a: tables.append(real(kinds, *a)) or tables[-1])
    for extra in ([], ["--kd_sources=text_qa"]):
        train.run(get_config(["--preset=smoke", f"--out_dir={out}", "--eval=false",
                              "--stage=distill", "--distill_steps=1",
                              f"--variant=gate{len(tables)}"] + extra))
    default, text_only = tables
    assert default == {s: float(k == "language") for s, k in tinyworld.SOURCE_KINDS.items()}
    assert text_only == {s: float(s == "text_qa") for s in tinyworld.SOURCE_KINDS}
    replay = train.build_data_and_tokenizer(get_config(["--preset=smoke",
                                                        "--kd_sources=text_qa"]))[0]
    for stage in ("align", "adapt", "distill"):
        assert train.stage_mixture(replay, stage) == train.stage_mixture(world, stage)
