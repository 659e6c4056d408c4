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

Student-only ids: the ids the teacher never embeds, because they mean something only to the
student: the <image> placeholders and, with nanoVLM's image splitting, the <|global_image|> and
<row_r_col_c> tokens that frame each view (ids past the teacher's vocabulary, 49152+ for
SmolLM2). Their columns behave like image columns everywhere: the teacher reads their K/V
(scope "full" and "image" share them all), never runs them, and scope "none" drops them.
Callers pass VLM.student_only_ids (an int, a single image token id, is accepted too).

What is checked where: check_compatible and freeze at setup; the data (ids the teacher can
embed, a text token ending every context) on the host where the batch is built
(plumbing.checks.check_handoff_batch). The functions below hold the math. Other layouts and
options are composed from outside, chosen once at setup: packed rows (scale/pack.py), a student
with another RoPE base (scale/rope.py).
"""
import torch

from model import positions_from_mask


def check_compatible(teacher_cfg, student_cfg, rebase_rope=False):
    """The teacher can only read the student's KV if its attention has the same shape and
    the same RoPE. One error lists every difference. Run once, at setup (train.py, eval.py,
    the tools). rebase_rope=True accepts different RoPE bases: the shared K is then re-rotated
    to the teacher's base (scale/rope.py, chosen at setup)."""
    names = ("n_layers", "n_kv_heads", "head_dim") + (() if rebase_rope else ("rope_theta",))
    diffs = [f"{name}: teacher {getattr(teacher_cfg, name)} vs student {getattr(student_cfg, name)}"
             + (" (--rebase_rope=true re-rotates the shared K to the teacher's base)"
                if name == "rope_theta" else "")
             for name in names if getattr(teacher_cfg, name) != getattr(student_cfg, name)]
    if diffs:
        raise ValueError("teacher and student decoders are incompatible for KV sharing:\n  "
                         + "\n  ".join(diffs))


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


def student_prefill(student, batch):
    """Step 1: response logits (B, R, V) and every layer's (K, V), (B, n_kv_heads, P+R, head_dim).
    The logits of columns P-1 .. P+R-1 are computed, R + 1 of them; the first R predict the R
    response tokens (the last column predicts nothing and is dropped)."""
    P, R = batch["context_len"], batch["labels"].shape[1]
    images = {} if batch["images"] is None else {"images": batch["images"]}  # a Decoder: none
    logits, kv = student(batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=True, logits_start=P - 1, **images)     # columns P-1 ..
    return logits[:, :R], kv                                                  # (B, R, V)


def student_only_mask(ids, student_only_ids):
    """True where ids is one of student_only_ids (VLM.student_only_ids, one int, or a tensor)."""
    only = [student_only_ids] if isinstance(student_only_ids, int) else student_only_ids
    return torch.isin(ids, torch.as_tensor(only, dtype=ids.dtype, device=ids.device))


def teacher_ids(ids, mask, student_only_ids):
    """The ids the teacher embeds, (B, P+R): 0 at student-only ids, pads and each row's last real
    token (no new token is predicted from it, and a student's EOS may not be in the teacher's
    vocabulary), whose outputs are never scored; and the student-only columns, (B, P+R) bool."""
    is_image = student_only_mask(ids, student_only_ids)                              # (B, P+R)
    last_real = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    return ids.masked_fill(is_image | ~mask.bool() | last_real, 0), is_image


# Worked example of teacher_continue, one row, P = 4, R = 3 (T = P + R = 7 columns), mask
# 0 1 1 1 1 1 0:
#
#     column     0    1      2      3      4        5       6
#     student    pad  <img>  <img>  eats   apples   <eos>   pad
#     position   0    0      1      2      3        4       4     (real tokens before it)
#     past       K/V  K/V    K/V                                   the student's; pad masked out
#     teacher                       eats   apples   0              runs columns 3..5
#     predicts                      apples <eos>    (pad)          the R response tokens
#
# The past is columns 0..P-2; the teacher re-runs the last context token (column P-1) itself, so
# that the first response token gets a KD target. Each new query attends to the past minus pads
# and causally to the new tokens; <img> is never embedded (student-only), and the last real
# token (here <eos>) runs as id 0: its output predicts a pad and is never scored.

@torch.no_grad()
def teacher_continue(teacher, student_kv, batch, student_only_ids):
    """Steps 2-3, scope "full" (the paper): the frozen teacher's logits (B, R, V_teacher) for the R
    response tokens, detached, continuing from the student's context K/V (worked example above)."""
    if teacher.training:
        raise ValueError("teacher_continue: the teacher must be frozen (call kvshare.freeze)")
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["context_len"]  # (B, P+R)
    T = ids.shape[1]                                     # P + R; the last column is never input
    text_ids, _ = teacher_ids(ids, mask, student_only_ids)                          # (B, P+R)
    past = [(k[:, :, :P - 1].detach(), v[:, :, :P - 1].detach()) for k, v in student_kv]
    logits, _ = teacher(text_ids[:, P - 1:T - 1], attention_mask=mask[:, :T - 1],
                        position_ids=positions_from_mask(mask)[:, P - 1:T - 1], past_kv=past)
    return logits.detach()                                                    # (B, R, V_teacher)


# ----------------------------------------------------------------------------------------
# The ablation scopes (--scope): the teacher gets less of the student

@torch.no_grad()
def teacher_on_text(teacher, student_kv, batch, student_only_ids):
    """Scope "none", the text-only teacher: it reads the text columns alone, no student KV."""
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["context_len"]
    text_ids, is_image = teacher_ids(ids, mask, student_only_ids)
    T, text_mask = ids.shape[1], mask * (~is_image)                                # (B, P+R)
    logits, _ = teacher(text_ids[:, :T - 1], attention_mask=text_mask[:, :T - 1],
                        position_ids=positions_from_mask(text_mask)[:, :T - 1],
                        logits_start=P - 1)
    return logits.detach()                                                    # (B, R, V_teacher)


@torch.no_grad()
def teacher_after_image(teacher, student_kv, batch, student_only_ids):
    """Scope "image": the past is the student's K/V at image columns only; the teacher re-runs
    every text column itself. A past key is visible to every new query, so images come first."""
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["context_len"]
    text_ids, is_image = teacher_ids(ids, mask, student_only_ids)
    T, text_mask = ids.shape[1], mask * (~is_image)                                # (B, P+R)
    # past: per layer (K, V), each (B, n_kv_heads, P, head_dim); its mask: image columns only
    past = [(k[:, :, :P].detach(), v[:, :, :P].detach()) for k, v in student_kv]
    past_mask = mask[:, :P] * is_image[:, :P]                                       # (B, P)
    logits, _ = teacher(text_ids[:, :T - 1],
                        attention_mask=torch.cat([past_mask, text_mask[:, :T - 1]], 1),
                        position_ids=positions_from_mask(mask)[:, :T - 1], past_kv=past,
                        logits_start=P - 1)
    return logits.detach()                                                    # (B, R, V_teacher)


SCOPES = {"full": teacher_continue, "image": teacher_after_image, "none": teacher_on_text}
