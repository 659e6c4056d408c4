r"""
Layer-wise KV-cache handoff from the student VLM to the frozen text-only teacher
(LinguDistill, README "How LinguDistill works here", steps 1-3).

Batch layout (data.collate), B examples, P context columns, R response columns:

      column:  0 ........................ P-1 | P .................. P+R-1
      row 0 :  pad pad [img img img] prompt   | answer answer <eos> pad
      row 1 :  [img img img] prompt prompt    | answer <eos> pad   pad
               \________ context ____________/ \_______ response ______/
               left-padded, so every context    right-padded
               ends at column P-1

Positions come from the attention mask (number of real tokens before a column), so
padding never shifts an example. Logits at column t predict the token at t+1: the R
logits at columns P-1 .. P+R-2 predict the R response tokens.

1. student_prefill: one student forward over all P+R columns -> response logits and every
   layer's (K, V) (K after RoPE), shape (B, n_kv_heads, P+R, head_dim).
2. teacher_continue, scope "full": the teacher takes the student's K/V of context columns
   0..P-2 as its past_key_values and runs R tokens, the last context token and the
   response without its final token, at the positions continuing each example's context.
   It attends to the shared KV (minus pads) and causally to itself. (The last context
   token is re-run by the teacher so that the first response token gets a KD target: a
   teacher running only the response tokens would have none for it.)
   scope "image": only image-column K/V come from the student; the teacher computes its
   own K/V for the prompt text (needs the image before the prompt text).
   scope "none": the teacher reads the text alone, no image KV ("text-only teacher").
The teacher is frozen (eval, no grad); its logits are detached.

Packed batches (--pack=true): pack.student_prefill / pack.teacher_continue, the same contract
on rows of several examples end to end; distill_forward picks the pair for a batch.

Student-only ids: the ids the teacher never embeds, because they mean something only to the
student: the <image> placeholders and, with nanoVLM's image splitting, the <|global_image|> and
<row_r_col_c> tokens that frame each view (ids past the teacher's vocabulary, 49152+ for
SmolLM2). Their columns behave like image columns everywhere: the teacher reads their K/V
(scope "full" and "image" share them all), never runs them, and scope "none" drops them.
Callers pass VLM.student_only_ids (an int, a single image token id, is accepted too).
"""
import torch

import pack
from model import (check, check_teacher_vocab, apply_rope, positions_from_mask, rope_cos_sin,
                   student_only_mask)

SCOPES = ("full", "image", "none")


def check_compatible(teacher_cfg, student_cfg, rebase_rope=False):
    """The teacher can only read the student's KV if its attention has the same shape and
    the same RoPE. One error lists every difference. Run once, at setup (train.py, eval.py,
    the tools); teacher_continue itself re-checks only what the KV tensors can tell.
    rebase_rope=True accepts different RoPE bases: the shared K is then re-rotated to the
    teacher's base (rebase_rope_k, distill_forward(rebase_from=...))."""
    names = ("n_layers", "n_kv_heads", "head_dim") + (() if rebase_rope else ("rope_theta",))
    diffs = [f"{name}: teacher {getattr(teacher_cfg, name)} vs student {getattr(student_cfg, name)}"
             + (" (--rebase_rope=true re-rotates the shared K to the teacher's base)"
                if name == "rope_theta" else "")
             for name in names if getattr(teacher_cfg, name) != getattr(student_cfg, name)]
    if diffs:
        raise ValueError("teacher and student decoders are incompatible for KV sharing:\n  "
                         + "\n  ".join(diffs))


def check_shared_vocab(teacher_tokenizer, student_tokenizer):
    """KD compares the first min(V_teacher, V_student) logits; both tokenizers must map those
    ids to the same tokens (tokenizers.Tokenizer objects)."""
    n = min(teacher_tokenizer.get_vocab_size(), student_tokenizer.get_vocab_size())
    bad = [i for i in range(n)
           if teacher_tokenizer.id_to_token(i) != student_tokenizer.id_to_token(i)]
    if bad:
        examples = ", ".join(f"id {i}: teacher {teacher_tokenizer.id_to_token(i)!r} vs student "
                             f"{student_tokenizer.id_to_token(i)!r}" for i in bad[:5])
        raise ValueError(f"tokenizers disagree on {len(bad)} of the {n} shared ids ({examples})")
    return n


def freeze(teacher, dtype=None):
    """Eval mode and no gradients: the teacher is never updated (only the student learns).

    dtype (e.g. torch.bfloat16): also cast the teacher's weights to it, once, in place. A
    frozen fp32 teacher run under bf16 autocast has every weight re-cast to bf16 on every
    forward; a teacher held in bf16 does not (and takes half the memory). teacher_continue
    accepts student KV of any floating dtype (see there). None keeps the current dtype."""
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError("freeze: dtype must be a floating torch.dtype or None, found "
                             f"{dtype!r}")
        teacher.to(dtype)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def student_prefill(student, batch, keep_kv=True):
    """Step 1: response logits (B, R, V); every layer's (K, V), (B, n_kv, P+R, hd), if keep_kv."""
    P, R = batch["context_len"], batch["labels"].shape[1]
    images = {} if batch["images"] is None else {"images": batch["images"]}
    logits, kv = student(batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=keep_kv, logits_start=P - 1, **images)   # columns P-1 ..
    return logits[:, :R], kv                                                  # (B, R, V)


@torch.no_grad()
def teacher_continue(teacher, student_kv, batch, student_only_ids, scope="full"):
    """Steps 2-3: teacher logits (B, R, V_teacher) of the response tokens, detached. Student-only
    ids are read as KV, never embedded; student_kv fp32 or bf16 (Attention casts it)."""
    if scope not in SCOPES:
        raise ValueError(f"share scope {scope!r}; expected one of {SCOPES}")
    if teacher.training:
        raise ValueError("teacher_continue: the teacher must be frozen (call kvshare.freeze)")
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["context_len"]  # (B, P+R)
    is_image = student_only_mask(ids, student_only_ids)                              # (B, P+R)
    # never embedded: student-only ids, pads, a row's last real token (an EOS it may not have)
    last_real = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    text_ids = ids.masked_fill(is_image | ~mask.bool() | last_real, 0)              # (B, P+R)
    check_teacher_vocab(teacher, text_ids)
    if scope != "full":
        return (teacher_on_text if scope == "none" else teacher_after_image)(
            teacher, student_kv, text_ids, mask, is_image, P)
    check_kv_shapes(teacher, student_kv)
    check(~is_image[:, P - 1].any(), "scope 'full': a context ends with an image (student-only) "
          "token; the prompt after the image must have at least one text token")
    T = ids.shape[1]                                     # P + R; the last column is never input
    # past: the student's K/V of context columns 0..P-2, (B, n_kv_heads, P-1, hd) per layer; new:
    # the last context token + the response but its last, at the positions continuing each context
    past = [(k[:, :, :P - 1].detach(), v[:, :, :P - 1].detach()) for k, v in student_kv]
    logits, _ = teacher(text_ids[:, P - 1:T - 1], attention_mask=mask[:, :T - 1],
                        position_ids=positions_from_mask(mask)[:, P - 1:T - 1], past_kv=past)
    return logits.detach()                                                    # (B, R, V_teacher)


def check_kv_shapes(teacher, student_kv):
    """What the KV tensors show of check_compatible (layers, KV heads, head size)."""
    k, c = student_kv[0][0], teacher.cfg                   # k: (B, n_kv_heads, P+R, head_dim)
    diffs = [f"{name}: teacher {ours} vs student {theirs}" for name, ours, theirs in (
        ("n_layers", c.n_layers, len(student_kv)), ("n_kv_heads", c.n_kv_heads, k.shape[1]),
        ("head_dim", teacher.head_dim, k.shape[3])) if ours != theirs]
    if diffs:
        raise ValueError("teacher and student decoders are incompatible for KV sharing:\n  "
                         + "\n  ".join(diffs))


def teacher_on_text(teacher, student_kv, text_ids, mask, is_image, P):
    """Scope "none", the text-only teacher: it reads the text columns alone, no student KV."""
    T, text_mask = text_ids.shape[1], mask * (~is_image)                           # (B, P+R)
    logits, _ = teacher(text_ids[:, :T - 1], attention_mask=text_mask[:, :T - 1],
                        position_ids=positions_from_mask(text_mask)[:, :T - 1],
                        logits_start=P - 1)
    return logits.detach()                                                    # (B, R, V_teacher)


def teacher_after_image(teacher, student_kv, text_ids, mask, is_image, P):
    """Scope "image": the past is the student's K/V at image columns only; the teacher re-runs
    every text column itself. A past key is visible to every new query, so images come first."""
    check_kv_shapes(teacher, student_kv)
    T, text_mask = text_ids.shape[1], mask * (~is_image)                           # (B, P+R)
    check(~((text_mask[:, :P].cumsum(-1) > 0) & is_image[:, :P]).any(),
          "scope 'image' needs the image tokens before the prompt text in every context")
    # past: per layer (K, V), each (B, n_kv_heads, P, head_dim); its mask: image columns only
    past = [(k[:, :, :P].detach(), v[:, :, :P].detach()) for k, v in student_kv]
    past_mask = mask[:, :P] * is_image[:, :P]                                       # (B, P)
    logits, _ = teacher(text_ids[:, :T - 1],
                        attention_mask=torch.cat([past_mask, text_mask[:, :T - 1]], 1),
                        position_ids=positions_from_mask(mask)[:, :T - 1], past_kv=past,
                        logits_start=P - 1)
    return logits.detach()                                                    # (B, R, V_teacher)


def distill_forward(student, teacher, batch, student_only_ids, scope="full", need_teacher=True,
                    rebase_from=None):
    """Steps 1-3: (student logits, teacher logits or None), padded (above) or packed (pack.py, the
    same contract): the one place the layout is chosen. rebase_from: see rebase_rope_kv."""
    prefill, continue_ = ((pack.student_prefill, pack.teacher_continue) if "segment_ids" in batch
                          else (student_prefill, teacher_continue))
    student_logits, kv = prefill(student, batch, need_teacher and scope != "none")
    if rebase_from is not None and kv is not None:       # the shared K, to the teacher's base
        kv = rebase_rope_kv([(k.detach(), v) for k, v in kv], batch, rebase_from,
                            teacher.cfg.rope_theta)
    return student_logits, (continue_(teacher, kv, batch, student_only_ids, scope)
                            if need_teacher else None)


# ----------------------------------------------------------------------------------------
# Beyond the paper: the handoff across RoPE bases (--rebase_rope)

def rebase_rope_k(k, positions, head_dim, theta_from, theta_to):
    """K stored after RoPE with base theta_from -> K as RoPE with base theta_to stores it.

    RoPE turns each frequency pair (i, i + head_dim/2) of K by the angle position * theta^(-2i/d),
    a rotation, so it can be undone and redone exactly: rotate back by the student's angles
    (apply_rope with -sin), forward by the teacher's, with model.py's own cos/sin tables (so the
    result is what the teacher's Attention computes from the same pre-RoPE K, up to float
    rounding). V carries no position and is unchanged.
    k: (B, n_kv_heads, T, head_dim); positions: (B, T), the RoPE position of each column."""
    if theta_from == theta_to:
        return k
    cos_from, sin_from = rope_cos_sin(positions, head_dim, theta_from, torch.float32)
    cos_to, sin_to = rope_cos_sin(positions, head_dim, theta_to, torch.float32)
    unrotated = apply_rope(k.float(), cos_from, -sin_from)                  # (B, nkv, T, hd)
    return apply_rope(unrotated, cos_to, sin_to).to(k.dtype)


def rebase_rope_kv(student_kv, batch, theta_from, theta_to):
    """Every layer's (K, V) of student_prefill with K re-based (rebase_rope_k) at the batch's
    positions: from the attention mask (the padded layout) or position_ids (packed rows)."""
    if theta_from == theta_to:
        return student_kv
    positions = (batch["position_ids"] if "segment_ids" in batch
                 else positions_from_mask(batch["attention_mask"]))                 # (B, P+R)
    head_dim = student_kv[0][0].shape[-1]
    return [(rebase_rope_k(k, positions, head_dim, theta_from, theta_to), v)
            for k, v in student_kv]
