"""tools/handoff_study.py: the per-layer KV drift, and the whole study at smoke sizes."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

import data  # noqa: E402
import handoff_study  # noqa: E402
import kvshare  # noqa: E402
import train  # noqa: E402
from model import Decoder, vlm_from_teacher  # noqa: E402


def test_kv_drift_zero_for_the_teacher_decoder_positive_after_a_perturbed_k_proj():
    torch.manual_seed(0)
    cfg = train.get_config(["--preset=smoke"])
    world, tok = train.build_data_and_tokenizer(cfg)
    teacher = kvshare.freeze(Decoder(train.lm_config(cfg, tok)))
    student = vlm_from_teacher(teacher, train.vision_config(cfg),
                               tok.token_to_id(data.IMAGE_TOKEN))
    text = handoff_study.text_batches(world, tok, teacher, cfg.image_size)
    drift = handoff_study.kv_drift(student, teacher, text)
    assert drift == {"k": [0.0] * cfg.lm_layers, "v": [0.0] * cfg.lm_layers}
    perturbed = copy.deepcopy(student)
    with torch.no_grad():
        perturbed.decoder.layers[1].attn.k_proj.weight.add_(0.1)
    drift = handoff_study.kv_drift(perturbed, teacher, text)
    assert drift["k"][0] == 0.0 and drift["k"][1] > 0.01          # the perturbed layer's K
    assert drift["v"][1] == 0.0                                   # V of that layer untouched
    assert handoff_study.kv_drift(teacher, teacher, text)["v"] == [0.0] * cfg.lm_layers


def test_study_runs_end_to_end_on_smoke_sizes(tmp_path):
    rows = handoff_study.main(["--preset=smoke", f"--out_dir={tmp_path}"])
    assert set(rows) == {"base / aligned", "base / adapted", "base / distilled",
                         "align x3 / aligned", "align x3 / adapted", "align x3 / distilled",
                         "adapt lr /3 / aligned", "adapt lr /3 / adapted",
                         "adapt lr /3 / distilled", "scope image / distilled"}
    for name, r in rows.items():
        assert all(0.0 <= r[k] <= 1.0 for k in ("acc", "vision", "knowledge_vqa",
                                                 "teacher_handoff", "handoff_image"))
        assert {"transfer", "transfer_seen", "transfer_unseen", "transfer_top1"} <= set(r)
        if name.endswith("aligned"):       # the decoder is the teacher's: no drift, same answers
            assert max(r["drift"]["k"] + r["drift"]["v"]) == 0.0
            assert r["teacher_handoff"] == r["knowledge_vqa"]
    assert (tmp_path / "handoff.md").read_text().startswith("| pipeline / point |")
