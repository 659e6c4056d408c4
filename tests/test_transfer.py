"""The transfer measure (eval.transfer) and the oracle-tower control (tools/oracle.py,
--tower=oracle)."""
import math
import types

import pytest
import torch

import data
import eval as evaluation
import kvshare
import train
from tools import oracle           # the module train.py and eval.py use (its OracleVLM class)
from model import Decoder, VisionConfig, vlm_from_teacher
from scale.weights import load_model_folder, save_vlm


def test_transfer_is_one_for_the_oracle_and_zero_for_blind_on_hand_made_distributions():
    oracle_logits, blind = torch.randn(6, 11), torch.randn(6, 11)
    splits = ["seen", "unseen"] * 3
    same = evaluation.transfer_from_logits(oracle_logits, oracle_logits, blind, splits)
    assert same["transfer"] == same["transfer_seen"] == same["transfer_unseen"] == 1.0
    assert same["transfer_top1"] == 1.0 and same["kl_handoff"] == 0.0 and same["kl_blind"] > 0
    none = evaluation.transfer_from_logits(oracle_logits, blind, blind, splits)
    assert none["transfer"] == none["transfer_seen"] == 0.0
    assert none["transfer_top1"] == float((blind.argmax(-1) == oracle_logits.argmax(-1)).float()
                                          .mean())
    # halfway in log space is in between; a ratio of MEANS over prompts, not a mean of ratios
    half = evaluation.transfer_from_logits(oracle_logits, (oracle_logits + blind) / 2, blind)
    assert 0 < half["transfer"] < 1
    lo, lh, lb = (torch.log_softmax(x, -1) for x in (oracle_logits, (oracle_logits + blind) / 2,
                                                      blind))
    kl = lambda q: (lo.exp() * (lo - q)).sum(-1)
    assert half["transfer"] == pytest.approx(1 - float(kl(lh).mean() / kl(lb).mean()), abs=1e-6)
    # no information in the words: T is undefined, not a number
    assert math.isnan(evaluation.transfer_from_logits(blind, oracle_logits, blind)["transfer"])


def smoke_world():
    cfg = train.get_config(["--preset=smoke"])
    world, tok = train.build_data_and_tokenizer(cfg)
    return cfg, world, tok


def test_transfer_is_one_when_the_image_tokens_are_the_descriptions_own_embeddings():
    """Identity: the student is the teacher's decoder and its image tokens are the teacher's
    embeddings of the description's tokens (oracle tower, no perturbation, exactly as many image
    tokens as description tokens): the handoff IS the teacher reading the words."""
    # 48 px / patch 4 / shuffle 4: 3 x 3 = 9 image tokens; the items whose words are 9 tokens
    teacher, vision, items, tok = identity_setup()
    student = vlm_from_teacher(teacher, vision, tok.token_to_id(data.IMAGE_TOKEN), 4)
    only = types.SimpleNamespace(sources={}, vision_bench=[], knowledge_bench=items)
    student = oracle.OracleVLM.wrap(student, teacher, only, tok, eps=0.0)
    assert student.n_image_tokens == 9
    out = evaluation.transfer(student, teacher, items, tok, image_size=48)
    assert out["kl_blind"] > 0.01
    assert out["transfer"] == pytest.approx(1.0, abs=1e-4)
    assert out["transfer_top1"] == 1.0
    # a student whose image tokens say nothing useful transfers far less
    plain = vlm_from_teacher(teacher, vision, tok.token_to_id(data.IMAGE_TOKEN), 4)
    assert evaluation.transfer(plain, teacher, items, tok, image_size=48)["transfer"] < 0.9


def test_oracle_tower_is_bounded_round_trips_and_refuses_unknown_images(tmp_path):
    cfg, world, tok = smoke_world()
    teacher = kvshare.freeze(Decoder(train.lm_config(cfg, tok)))
    student = train.initial_student(cfg, teacher, tok)
    wrapped = oracle.OracleVLM.wrap(student, teacher, world, tok)
    assert wrapped.state_dict().keys() == student.state_dict().keys()   # a plain VLM's folder
    b = data.collate(world.knowledge_bench[:4], tok, wrapped.n_image_tokens, cfg.image_size)
    with torch.no_grad():
        torch.nn.init.normal_(wrapped.projector.proj.weight, std=10.0)  # a saturated tower
        feats = wrapped.image_features(b["images"])                    # (4, n, D)
    rows = [wrapped.descs.index(it["desc"]) for it in world.knowledge_bench[:4]]
    delta = (feats - wrapped.tokens[rows]).abs()
    assert 0 < float(delta.max()) <= oracle.EPS * wrapped.scale + 1e-6
    ids = tok.encode(world.knowledge_bench[0]["desc"]).ids            # right-aligned words
    emb = teacher.embed.weight[ids]
    assert torch.equal(wrapped.tokens[rows[0], -len(ids):], emb)
    save_vlm(wrapped, tmp_path / "m")
    again = oracle.OracleVLM.wrap(load_model_folder(tmp_path / "m"), teacher, world, tok)
    with torch.no_grad():
        assert torch.equal(again.image_features(b["images"]), feats)
    with pytest.raises(ValueError, match="tower=oracle"):
        wrapped.image_features(torch.zeros_like(b["images"]))


def test_train_tower_oracle_runs_and_the_flag_is_checked(tmp_path):
    out = tmp_path / "run"
    models, world, tok = train.run(train.get_config(
        ["--preset=smoke", f"--out_dir={out}", "--tower=oracle"]))
    assert isinstance(models["adapted"], oracle.OracleVLM)
    # a later distill run from the saved folder re-attaches the oracle
    models, _, _ = train.run(train.get_config(["--preset=smoke", f"--out_dir={out}",
                                               "--tower=oracle", "--stage=distill",
                                               "--variant=again"]))
    assert isinstance(models["distilled-again"], oracle.OracleVLM)
    rows = evaluation.evaluate_models(models, world, tok, 32)
    assert "transfer" in rows["distilled-again"]
    assert "transfer T" in evaluation.format_table(rows)
    # eval.py on the saved folder re-attaches the oracle too
    table = evaluation.evaluate_folder(str(out / "distilled-again"))
    assert "transfer T" in table
    with pytest.raises(ValueError, match="--teacher=FOLDER"):
        evaluation.evaluate_folder(str(out / "distilled-again"), str(tmp_path / "none"))
    with pytest.raises(ValueError, match="--tower"):
        train.get_config(["--preset=smoke", "--tower=nope"])
    with pytest.raises(ValueError, match="--tower=oracle"):
        train.get_config(["--preset=smoke", "--tower=oracle", f"--student_path={tmp_path}"])


def test_held_out_perplexity_and_kl_from_teacher():
    """eval.held_out_scores: kl 0 for the teacher itself; for another model, the mean over the
    scored tokens (all but each text's first word) of KL(p_teacher || p_model), and the
    perplexity, by hand."""
    cfg, world, tok = smoke_world()
    teacher = kvshare.freeze(Decoder(train.lm_config(cfg, tok)))
    texts = [it["context"] + it["options"][it["answer"]] for it in world.language_bench[:5]]
    same = evaluation.held_out_scores(teacher, texts, tok, teacher=teacher)
    assert same["kl"] == pytest.approx(0, abs=1e-6)
    other = Decoder(train.lm_config(cfg, tok)).eval()
    scores = evaluation.held_out_scores(other, texts, tok, batch_size=2, teacher=teacher)
    kl = scores["kl"]
    nll, total, n = 0.0, 0.0, 0
    with torch.no_grad():
        for t in texts:
            head, rest = t.split(" ", 1)                # context: the first word; response:
            first = len(tok.encode(head).ids)           # the rest + <eos> (data.encode_example)
            ids = torch.tensor([tok.encode(head).ids + tok.encode(" " + rest).ids
                                + [data.special_id(tok, data.EOS_TOKEN)]])
            lt = torch.log_softmax(teacher(ids)[0][0, first - 1:-1], -1)
            lo = torch.log_softmax(other(ids)[0][0, first - 1:-1], -1)
            total += float((lt.exp() * (lt - lo)).sum())
            nll -= float(lo.gather(-1, ids[0, first:, None]).sum())
            n += ids.shape[1] - first
    assert kl > 0.01
    assert kl == pytest.approx(total / n, rel=1e-4)
    assert scores["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    alone = evaluation.held_out_scores(other, texts, tok)                        # no teacher
    assert set(alone) == {"ppl"} and alone["ppl"] == pytest.approx(scores["ppl"], rel=1e-5)


# --------------------------------------------------------------------------- the shuffled null

def test_transfer_from_logits_with_the_shuffled_null_on_hand_made_distributions():
    oracle_logits, handoff, blind = torch.randn(6, 11), torch.randn(6, 11), torch.randn(6, 11)
    splits = ["seen", "unseen"] * 3
    same = evaluation.transfer_from_logits(oracle_logits, handoff, blind, splits, shuffled=handoff)
    assert same["transfer_shuffled"] == same["transfer"]                # no image information
    assert same["transfer_gap"] == 0.0 and same["transfer_gap_unseen"] == 0.0
    assert same["kl_shuffled"] == same["kl_handoff"]
    nothing = evaluation.transfer_from_logits(oracle_logits, oracle_logits, blind, splits,
                                              shuffled=blind)
    assert nothing["transfer"] == 1.0 and nothing["transfer_shuffled"] == 0.0
    assert nothing["transfer_gap"] == 1.0 and nothing["transfer_gap_seen"] == 1.0
    top1_blind = float((blind.argmax(-1) == oracle_logits.argmax(-1)).float().mean())
    assert nothing["transfer_top1_blind"] == top1_blind
    assert nothing["transfer_top1_shuffled"] == top1_blind
    assert "transfer_shuffled" not in evaluation.transfer_from_logits(oracle_logits, handoff, blind)


def test_shuffled_items_is_a_fixed_derangement_of_the_entities():
    _, world, _ = smoke_world()
    items = world.bench("knowledge_bench")
    shuffled = evaluation.shuffled_items(items)
    assert shuffled == evaluation.shuffled_items(items)                 # fixed
    by_desc = {}
    for it in items:
        by_desc.setdefault(it["desc"], it["image"])
    for a, b in zip(items, shuffled):
        assert (b["prompt"], b["response"], b["split"], b["desc"]) == \
            (a["prompt"], a["response"], a["split"], a["desc"])          # the same item ...
        assert b["image_desc"] != a["desc"]                             # ... another entity's
        assert b["image"] is by_desc[b["image_desc"]]                   # image
    assert {it["image_desc"] for it in shuffled} == set(by_desc)        # every image used
    with pytest.raises(ValueError, match="two or more"):
        evaluation.shuffled_items([it for it in items if it["desc"] == items[0]["desc"]])


def identity_setup():
    """The identity tests' teacher (any weights, far from uniform outputs), vision config and
    items (9-token descriptions)."""
    cfg, world, tok = smoke_world()
    teacher = Decoder(train.lm_config(cfg, tok))
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 1.0)
    kvshare.freeze(teacher)
    vision = VisionConfig(image_size=48, patch_size=4, dim=32, n_layers=1, n_heads=2, mlp_dim=64)
    items = [it for it in world.knowledge_bench if len(tok.encode(it["desc"]).ids) == 9]
    assert len(items) >= 2 and len({it["desc"] for it in items}) >= 2
    return teacher, vision, items, tok


def test_shuffled_null_equals_t_when_the_image_carries_nothing_and_is_below_t_for_the_oracle():
    teacher, vision, items, tok = identity_setup()
    image_id = tok.token_to_id(data.IMAGE_TOKEN)

    class ImageBlindVLM(type(vlm_from_teacher(teacher, vision, image_id, 4))):
        """Image tokens that ignore the image: a fixed learned-looking constant."""
        def image_features(self, images):
            base = torch.linspace(-1, 1, self.n_image_tokens * self.decoder.cfg.dim)
            return base.view(1, self.n_image_tokens, -1).expand(images.shape[0], -1, -1)

    plain = vlm_from_teacher(teacher, vision, image_id, 4)
    blind = ImageBlindVLM(plain.decoder.cfg, plain.vision.cfg, plain.image_token_id,
                          plain.projector.factor)
    blind.load_state_dict(plain.state_dict())
    out = evaluation.transfer(blind, teacher, items, tok, image_size=48)
    assert out["transfer_shuffled"] == out["transfer"]
    assert out["transfer_gap"] == 0.0 and out["kl_shuffled"] == out["kl_handoff"]

    only = types.SimpleNamespace(sources={}, vision_bench=[], knowledge_bench=items)
    student = oracle.OracleVLM.wrap(vlm_from_teacher(teacher, vision, image_id, 4), teacher, only,
                                    tok, eps=0.0)
    out = evaluation.transfer(student, teacher, items, tok, image_size=48)
    assert out["transfer"] == pytest.approx(1.0, abs=1e-4)
    assert out["transfer"] > out["transfer_shuffled"] + 0.5            # another entity's words
    assert out["kl_shuffled"] > out["kl_handoff"]
    assert out["transfer_gap"] == pytest.approx(out["transfer"] - out["transfer_shuffled"])
    assert evaluation.transfer(student, teacher, items, tok, image_size=48, null=False).keys() \
        == {k for k in out if "shuffled" not in k and "gap" not in k}
