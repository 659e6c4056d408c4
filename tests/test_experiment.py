"""tools/experiment.py: the weight-merging baseline, the paired t-intervals, the report, and
one seed end to end on the smoke preset."""
import json
import math
import sys

import pytest
import torch

import experiment
from model import Decoder, LMConfig, VisionConfig, vlm_from_teacher


# --------------------------------------------------------------------------- merging

def tiny_pair():
    """A teacher (vocab 20) and an 'adapted' VLM grown from it (vocab 21: <image> = 20) whose
    every parameter has then moved away from the teacher's."""
    teacher = Decoder(LMConfig(vocab_size=20, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                               ffn_dim=32, max_positions=64))
    vlm = vlm_from_teacher(teacher, VisionConfig(image_size=8, patch_size=4, dim=8, n_layers=1,
                                                 n_heads=2, mlp_dim=16), image_token_id=20)
    with torch.no_grad():
        for p in vlm.parameters():
            p.add_(torch.randn_like(p))
    return vlm, teacher


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(state, model):
    now = model.state_dict()
    assert state.keys() == now.keys()
    assert all(torch.equal(state[k], now[k]) for k in state)


def test_merge_endpoints_and_midpoint():
    vlm, teacher = tiny_pair()
    vlm_before, teacher_before = snapshot(vlm), snapshot(teacher)
    t_params = dict(teacher.named_parameters())

    m0 = experiment.merge_toward_teacher(vlm, teacher, 0.0)
    assert_same(vlm_before, m0)                                     # lam = 0: exactly adapted
    assert m0.decoder.embed.weight.data_ptr() != vlm.decoder.embed.weight.data_ptr()

    m1 = experiment.merge_toward_teacher(vlm, teacher, 1.0)
    for name, p in m1.decoder.named_parameters():                   # lam = 1: the teacher ...
        t = t_params[name]
        assert torch.equal(p[:t.shape[0]], t), name
    assert torch.equal(m1.decoder.embed.weight[20], vlm.decoder.embed.weight[20])   # not <image>
    for part in ("vision", "projector"):                            # adapted vision + projector
        for (n, p), (_, q) in zip(getattr(m1, part).named_parameters(),
                                  getattr(vlm, part).named_parameters()):
            assert torch.equal(p, q), f"{part}.{n}"
    assert m1.decoder.lm_head.weight is m1.decoder.embed.weight     # the tie survives

    half = experiment.merge_toward_teacher(vlm, teacher, 0.5)
    v_params = dict(vlm.decoder.named_parameters())
    for name, p in half.decoder.named_parameters():
        t, a = t_params[name], v_params[name]
        torch.testing.assert_close(p[:t.shape[0]], (a[:t.shape[0]] + t) / 2)

    assert_same(vlm_before, vlm)                                    # inputs untouched
    assert_same(teacher_before, teacher)


@pytest.mark.parametrize("ffn_dim", [24, 48])          # fewer rows than the student's, or more
def test_merge_refuses_a_teacher_of_another_shape(ffn_dim):
    vlm, _ = tiny_pair()
    other = Decoder(LMConfig(vocab_size=20, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                             ffn_dim=ffn_dim, max_positions=64))
    with pytest.raises(ValueError, match=r"merge: decoder parameter layers\.0\.mlp\.gate_proj"):
        experiment.merge_toward_teacher(vlm, other, 0.5)


# --------------------------------------------------------------------------- statistics

def test_t_interval_hand_worked():
    t = experiment.t_interval([1.0, 2.0, 3.0])        # mean 2, s = 1, t_{0.975,2} = 4.303
    assert t["mean"] == 2.0 and t["sd"] == pytest.approx(1.0)
    assert t["half_width"] == pytest.approx(4.303 / math.sqrt(3))      # 2.484
    assert (t["lo"], t["hi"]) == pytest.approx((2 - 2.4844, 2 + 2.4844), abs=1e-4)
    one = experiment.t_interval([0.05])
    assert one["half_width"] is None
    assert experiment.format_interval(one) == "+5.0 (n=1, no interval)"
    assert experiment.format_interval(experiment.t_interval([0.01, 0.02, 0.03])) == \
        "+2.0 ± 2.5 [-0.5, +4.5]"


def test_t_quantiles():
    assert experiment.t975(1) == 12.706 and experiment.t975(30) == 2.042
    assert experiment.t975(31) == pytest.approx(2.0395, abs=1e-3)    # beyond the table
    assert experiment.t975(1000) == pytest.approx(1.9623, abs=1e-3)
    with pytest.raises(ValueError):
        experiment.t975(0)


def fake_seed(ld_lang, ce_lang, vision_025, k):
    """One seed's rows: the drop is 40 points, so recovery = (lang - 0.5) / 0.4."""
    def row(lang, vision=None):
        r = {"acc": lang, "acc_unseen": lang - 0.1, "recovery": (lang - 0.5) / 0.4}
        if vision is not None:
            r["vision"], r["knowledge_vqa"] = vision, vision - 0.3
            r.update(transfer=vision - 1, transfer_seen=vision - 0.9, transfer_unseen=vision - 1.1,
                     transfer_top1=vision / 2)
        return r
    return {"teacher": row(0.9), "adapted": row(0.5, 0.80),
            "CE-only": row(ce_lang, 0.80 + k), "uniform KD": row(0.70, 0.60),
            "text-only teacher KD": row(0.60, 0.80), "LinguDistill": row(ld_lang, 0.80),
            "merge λ=0.25": row(0.55, vision_025), "merge λ=0.5": row(0.62, 0.795),
            "merge λ=0.75": row(0.75, 0.50)}


def test_report_with_merges():
    per_seed = [fake_seed(0.70, 0.60, 0.81, 0.0), fake_seed(0.74, 0.62, 0.80, 0.02),
                fake_seed(0.78, 0.64, 0.82, 0.01)]
    mean, std = experiment.aggregate(per_seed)
    assert mean["LinguDistill"]["acc"] == pytest.approx(0.74)
    assert std["LinguDistill"]["acc"] == pytest.approx((0.0032 / 3) ** 0.5)     # population std
    # λ=0.75 has the best language but vision 50 < 79; λ=0.5 (79.5 >= 80 - 1) beats λ=0.25
    assert experiment.best_merge(mean) == "merge λ=0.5"
    text, result = experiment.report([0, 1, 2], ["--preset=smoke"], per_seed, 1.0)
    diffs = result["paired_differences"]
    assert list(diffs) == ["LinguDistill − CE-only", "LinguDistill − text-only teacher KD",
                           "LinguDistill − uniform KD", "LinguDistill − merge λ=0.5"]
    ce = diffs["LinguDistill − CE-only"]["recovery"]               # (0.10, 0.12, 0.14) / 0.4
    assert ce["diffs"] == pytest.approx([0.25, 0.30, 0.35])
    assert ce["half_width"] == pytest.approx(4.303 * 0.05 / math.sqrt(3))
    assert diffs["LinguDistill − CE-only"]["vision"]["mean"] == pytest.approx(-0.01)
    assert result["best_merge"] == "merge λ=0.5"
    for needle in ("| merge λ=0.25 |", "| merge λ=0.75 |", "Best merge at equal or better vision",
                   "merge λ=0.5 (language 62.0, vision 79.5 there)",
                   "| difference | recovery | lang unseen | knowledge VQA | vision |",
                   "| LinguDistill − CE-only | +30.0 ± 12.4 [+17.6, +42.4] | "
                   "+12.0 ± 5.0 [+7.0, +17.0] | -1.0 ± 2.5 [-3.5, +1.5] | -1.0 ± 2.5",
                   "| LinguDistill − merge λ=0.5 |", "Per seed (0 / 1 / 2)",
                   "| model | T | T seen | T unseen | top-1 |",
                   "| CE-only | -0.19 ± 0.01 | -0.09 ± 0.01 | -0.29 ± 0.01 | 40.5 ± 0.4 |",
                   "| LinguDistill | 70.0 / 74.0 / 78.0 | 80.0 / 80.0 / 80.0 | "
                   "50.0 / 60.0 / 70.0 |"):
        assert needle in text, needle

    for s in per_seed:                                   # no merge within 1 point of vision
        s["merge λ=0.5"]["vision"] = 0.78
        s["merge λ=0.25"]["vision"] = 0.70
    text, result = experiment.report([0, 1, 2], [], per_seed, 1.0)
    assert result["best_merge"] is None and "No merge has mean vision >= 79.0" in text
    assert "LinguDistill − merge" not in text
    diffs = experiment.paired_differences(per_seed, mean, every_merge=True)   # real_experiment's
    assert [d for d in diffs if "merge" in d] == [f"LinguDistill − merge λ={x}"
                                                  for x in ("0.25", "0.5", "0.75")]
    assert "the merges below are compared at lower vision" in experiment.format_differences(
        diffs, experiment.aggregate(per_seed)[0])

    text, result = experiment.report([0], [], per_seed[:1], 1.0)            # one seed
    assert "| LinguDistill − CE-only | +25.0 (n=1, no interval) | +10.0 (n=1, no interval)" in text


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    mean, std = experiment.aggregate([fake_seed(0.70, 0.60, 0.81, 0.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib fails
    assert experiment.plot(mean, std, str(tmp_path / "p.png")) is None
    assert not (tmp_path / "p.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (the plot is skipped)")
    mean, std = experiment.aggregate([fake_seed(0.70, 0.60, 0.81, 0.0)])
    path = str(tmp_path / "p.png")
    assert experiment.plot(mean, std, path) == path
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- end to end

def test_run_seed_smoke_end_to_end(tmp_path):
    argv = ["--preset=smoke", "--pretrain_steps=2", "--align_steps=1", "--adapt_steps=1",
            "--distill_steps=1", "--device=cpu"]
    rows = experiment.run_seed(0, argv, str(tmp_path), merge_lams=(0.25, 0.5, 0.75))
    assert list(rows) == ["teacher", "adapted", "CE-only", "uniform KD", "text-only teacher KD",
                          "LinguDistill", "text-replay KD (own text)",
                          "text-replay KD (student KV)", "merge λ=0.25", "merge λ=0.5",
                          "merge λ=0.75"]
    for name, row in rows.items():
        assert {"acc", "acc_seen", "acc_unseen", "recovery", "val_acc", "val_recovery"} <= \
            set(row), name
        if name != "teacher":
            assert {"vision", "knowledge_vqa", "teacher_handoff", "transfer_shuffled",
                    "transfer_gap", "kl_shuffled", "transfer_top1_blind", "val_vision"} <= \
                set(row), name
    if rows["teacher"]["acc"] > rows["adapted"]["acc"]:
        assert rows["adapted"]["recovery"] == 0.0 and rows["teacher"]["recovery"] == 1.0
    else:                                                # no drop: recovery is undefined
        assert all(math.isnan(r["recovery"]) for r in rows.values())
    assert (tmp_path / "seed0" / "distilled-lingudistill").is_dir()
    for name in ("text-replay-kd-own-text", "text-replay-kd-student-kv"):
        cfg = json.loads((tmp_path / "seed0" / f"distilled-{name}" / "train_config.json")
                         .read_text())
        assert cfg["kd_sources"] == "text_qa" and cfg["policy"] == "selective"
        assert cfg["scope"] == ("none" if name.endswith("own-text") else "full")


def test_finished_seeds_are_read_back_and_teachers_shared(tmp_path, monkeypatch):
    """A finished seed of the same flags is read back, not trained again; --teachers_from
    copies the same seed's teacher and skips stage 1, giving the teacher stage 1 would give."""
    argv = ["--preset=smoke", "--pretrain_steps=2", "--align_steps=1", "--adapt_steps=1",
            "--distill_steps=1", "--device=cpu"]
    first, shared = tmp_path / "a", tmp_path / "b"
    experiment.experiment([0], argv, str(first), merge_lams=())
    stored = (first / "seed0.json").read_text()
    with monkeypatch.context() as m:                       # nothing may train the second time
        m.setattr(experiment, "run_seed", lambda *a: pytest.fail("seed 0 trained again"))
        experiment.experiment([0], argv, str(first), merge_lams=())
    assert (first / "seed0.json").read_text() == stored
    with pytest.raises(FileNotFoundError, match="--teachers_from=.*no teacher of seed 1"):
        experiment.run_seed(1, argv, str(shared), merge_lams=(), teachers_from=str(first))

    text = experiment.experiment([0], argv, str(shared), merge_lams=(), teachers_from=str(first))
    teacher = "seed0/teacher/model.safetensors"
    assert (shared / teacher).read_bytes() == (first / teacher).read_bytes()
    assert not (shared / "seed0" / "ckpt" / "pretrain").exists()           # no stage 1 here
    assert (first / "seed0" / "ckpt" / "pretrain").exists()
    rows_a = json.loads(stored)["rows"]
    rows_b = json.loads((shared / "seed0.json").read_text())["rows"]
    assert rows_b["teacher"] == rows_a["teacher"] and rows_b == rows_a    # same seed, same run
    assert "| LinguDistill − CE-only |" in text


def test_main_rejects_bad_merge_lams():
    with pytest.raises(ValueError, match=r"--merge_lams=1\.5: expected numbers in \[0, 1\]"):
        experiment.main(["--merge_lams=1.5"])
    with pytest.raises(ValueError, match="--merge_lams=a"):
        experiment.main(["--merge_lams=a"])


# --------------------------------------------------------------------------- issue 31

def test_variant_slugs_keep_the_old_folder_names():
    assert [experiment.slug(n) for n in experiment.VARIANTS] == [
        "ce-only", "uniform-kd", "text-only-teacher-kd", "lingudistill",
        "text-replay-kd-own-text", "text-replay-kd-student-kv"]
    assert experiment.variant_flags("text-replay KD (own text)", "text") == [
        "--policy=selective", "--scope=none", "--kd_sources=text"]


def test_t_pvalue_against_closed_forms_and_holm_by_hand():
    assert experiment.t_pvalue(1.0, 1) == pytest.approx(0.5)          # Cauchy: P(|T| > 1)
    for t in (0.5, 2.0, 4.303):                                       # df = 2 closed form
        assert experiment.t_pvalue(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert experiment.t_pvalue(2.262, 9) == pytest.approx(0.05, abs=2e-4)     # the t table
    assert experiment.t_pvalue(0.0, 5) == pytest.approx(1.0)
    assert experiment.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == \
        pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert experiment.holm({"a": 0.5, "b": 0.9}) == pytest.approx({"a": 1.0, "b": 1.0})
    t = experiment.t_interval([1.0, 2.0, 3.0])                        # t = 2 / (1 / sqrt 3)
    assert experiment.paired_pvalue(t) == pytest.approx(experiment.t_pvalue(2 * 3 ** 0.5, 2))
    assert experiment.paired_pvalue(experiment.t_interval([0.1])) is None
    stats = pytest.importorskip("scipy.stats", reason="scipy is optional (a cross-check)")
    for t, df in ((2.5, 4), (0.3, 9), (10.0, 30), (-3.0, 7)):
        assert experiment.t_pvalue(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)


def replay_seed(gain, gap, k):
    """One seed's rows with both text-replay forms: LinguDistill's recovery is theirs + gain,
    its T - T_shuffled is gap (+ a little seed noise k)."""
    def row(lang, vision=0.8, t=0.5, t_shuf=0.5):
        r = {"acc": lang, "acc_unseen": lang, "recovery": (lang - 0.5) / 0.4, "vision": vision,
             "knowledge_vqa": 0.5, "val_vision": vision, "val_acc": lang}
        r.update(transfer=t, transfer_shuffled=t_shuf, transfer_gap=t - t_shuf,
                 transfer_top1=0.5, transfer_top1_shuffled=0.4, transfer_top1_blind=0.3,
                 kl_handoff=0.1, kl_blind=0.2, kl_shuffled=0.15)
        return r
    return {"teacher": {"acc": 0.9, "acc_unseen": 0.9, "recovery": 1.0},
            "adapted": row(0.5), "CE-only": row(0.6 + k),
            "LinguDistill": row(0.7 + k, t=0.5 + gap + k / 10, t_shuf=0.5),
            "text-replay KD (own text)": row(0.7 - 0.4 * gain + k + k * k),
            "text-replay KD (student KV)": row(0.7 - 0.4 * gain + k - k * k)}


def test_report_has_the_null_the_holm_family_and_the_rule():
    ks = [0.0, 0.01, -0.01, 0.02, -0.02, 0.005, -0.005, 0.015, -0.015, 0.0]
    per_seed = [replay_seed(0.10, 0.3, k) for k in ks]
    text, result = experiment.report(list(range(10)), [], per_seed, 1.0)
    assert result["rule"]["verdict"] == "the handoff adds something"
    for needle in ("| LinguDistill − text-replay KD (own text) |",
                   "| LinguDistill − text-replay KD (student KV) |",
                   "Holm-adjusted over the family of all",
                   "| model | T | T_shuffled | top-1 handoff | top-1 shuffled | top-1 blind |",
                   "| KL(o‖h) | KL(o‖b) | KL(o‖s) |", "| T − T_shuffled, LinguDistill |",
                   "The pre-stated rule (RESULTS.md): the handoff adds something.",
                   "here ± is the interval's half-width"):
        assert needle in text, needle
    assert result["p_holm"]["LinguDistill − text-replay KD (own text) | recovery"] < 0.05
    m = len([p for p in result["p_values"].values() if p is not None])
    assert f"all {m} intervals" in text
    # no T gap: the rule says nothing is added, though the language gain is there
    flat = [replay_seed(0.10, 0.0, k) for k in ks]
    for s, k in zip(flat, ks):                  # T - T_shuffled around 0
        s["LinguDistill"]["transfer_gap"] = k
    assert experiment.report(list(range(10)), [], flat, 1.0)[1]["rule"]["verdict"] == \
        "the handoff adds nothing measurable"
    # the vision cost decides too: 5 points lower vision fails "equal vision"
    costly = [replay_seed(0.10, 0.3, k) for k in ks]
    for s in costly:
        s["LinguDistill"]["vision"] = 0.75 + ks[0]
    assert experiment.report(list(range(10)), [], costly, 1.0)[1]["rule"]["verdict"] == \
        "the handoff adds nothing measurable"
    verdict = experiment.report([0, 1, 2], [], per_seed[:3], 1.0)[1]["rule"]["verdict"]
    assert verdict == "not decided (n = 3 < 10, the rule's n)"


def test_best_merge_is_chosen_on_the_validation_split():
    per_seed = [fake_seed(0.70, 0.60, 0.81, 0.0)]
    for s in per_seed:                          # on validation λ=0.25 is the one at equal vision
        for n, r in s.items():
            r["val_vision"], r["val_acc"] = r.get("vision", 0), r["acc"]
        s["merge λ=0.5"]["val_vision"] = 0.70
    mean, _ = experiment.aggregate(per_seed)
    assert experiment.best_merge(mean) == "merge λ=0.25"
    assert "chosen on the validation split" in experiment.format_differences(
        experiment.paired_differences(per_seed, mean), mean)


def test_main_takes_a_variant_subset_and_refuses_unknown_ones_and_kd_sources(tmp_path):
    with pytest.raises(ValueError, match="--variants=nope: expected a comma list of ce-only"):
        experiment.main(["--variants=nope"])
    with pytest.raises(ValueError, match="--kd_sources: set by this tool itself"):
        experiment.main(["--kd_sources=text_qa"])
    argv = ["--preset=smoke", "--pretrain_steps=2", "--align_steps=1", "--adapt_steps=1",
            "--distill_steps=1", "--device=cpu"]
    experiment.main([f"--out_dir={tmp_path}", "--seeds=0", "--merge_lams=",
                     "--variants=lingudistill,text-replay-kd-own-text"] + argv)
    rows = json.loads((tmp_path / "seed0.json").read_text())
    assert rows["variants"] == ["LinguDistill", "text-replay KD (own text)"]
    assert list(rows["rows"]) == ["teacher", "adapted", "LinguDistill",
                                  "text-replay KD (own text)"]
