"""
Packed batches (train.py --pack=true), the throughput path of stages 2-3: several examples end to
end in rows of at most --max_len tokens instead of one padded row each (on a Cauldron-like length
mix, 98 % real tokens instead of 24-35 %). data.collate's padded layout stays the readable
reference; per example the two give the same logits, teacher logits, losses and gradients
(tests/test_pack.py). train.py chooses this layout once at setup: batch_of for the batches,
PackedRows around the student and the teacher, student_prefill / teacher_continue in the steps
(train.variant_step).

Each example's positions restart at 0; attention is block-diagonal (segment_mask) in the
student prefill and in the teacher continuation, where the teacher runs, per example, the tokens
it runs in the padded layout against that example's own student K/V only. The loss side is
padding-free: (1, N) labels for the N response tokens of the batch. This file only lays out
tensors and masks, and runs the two halves of the handoff on them (student_prefill,
teacher_continue: kvshare.py's contract).

The teacher runs, per example, the same tokens as in the padded layout (scope "full": the last
context token and the response without its last token; "image" / "none": every text token but
the last) against that example's own student K/V only: its past keys are the whole row's
student K/V, and the mask lets a query see only its example's shared columns. Student and
teacher logits come out (1, N, V) for the N response tokens of the batch, in row order.
"""
import torch
import torch.nn as nn

import data
import kvshare
from kvshare import student_only_mask
from model import VLM
from scale.cuda import segment_block_mask


def pack_rows(lengths, max_len):
    """Examples of these token lengths -> rows, each a list of example indices (ascending) whose
    lengths sum to at most max_len. As few rows as fit (ceil(total / max_len) if they can), and
    balanced: longest example first into the emptiest row, so the rows, padded to the longest,
    are nearly all real tokens."""
    too_long = [n for n in lengths if n > max_len]
    if too_long:
        raise ValueError(f"an example is {max(too_long)} tokens, longer than the packed row "
                         f"(max_len {max_len})")
    n_rows = -(-sum(lengths) // max_len)
    while True:
        rows, fill = [[] for _ in range(n_rows)], [0] * n_rows
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = min(range(n_rows), key=fill.__getitem__)
            rows[r].append(i)
            fill[r] += lengths[i]
        if max(fill) <= max_len:           # always true by n_rows = len(lengths)
            return [sorted(row) for row in rows]
        n_rows += 1


def batch_of(items, pad, max_len):
    """data.batch_of in the packed layout: encoded examples -> rows of at most max_len tokens."""
    return {**lay_out(data.fit_pairs([it["pair"] for it in items], max_len),
                      [it["views"] for it in items], pad, max_len),
            "grids": [it["grids"] for it in items], "source": [it["source"] for it in items]}


def lay_out(pairs, views, pad, max_len):
    """data.lay_out in the packed layout (pack): the images follow the examples' row order."""
    batch = pack(pairs, pad, max_len)
    flat = [v for i in batch.pop("order") for v in views[i]]
    return {**batch, "images": torch.cat(flat) if flat else None}


def pack(pairs, pad, max_len):
    """[(context_ids, response_ids), ...] -> a PACKED batch: [context_i response_i] end to end in
    rows of L <= max_len columns (pack_rows), positions restarting at 0 per example.
      input_ids, attention_mask, segment_ids (example index, -1 for pads), position_ids (within
          the example), context_mask: (rows, L)
      logit_index (N,): flat index (row * L + column) of the column before each response token
      labels, response_mask (all True), token_example (each token's example): (1, N), row order
      order: the example indices in row order (so the images can follow it)."""
    rows = pack_rows([len(c) + len(r) for c, r in pairs], max_len)
    L = max(sum(len(c) + len(r) for c, r in (pairs[i] for i in row)) for row in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)                # (rows, L)
    seg = torch.full((len(rows), L), -1, dtype=torch.long)                 # (rows, L)
    pos = torch.zeros((len(rows), L), dtype=torch.long)                    # (rows, L)
    ctx = torch.zeros((len(rows), L), dtype=torch.bool)                    # (rows, L)
    labels, logit_index, token_example = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            c, resp = pairs[i]
            n = len(c) + len(resp)
            ids[r, col:col + n] = torch.tensor(c + resp)
            seg[r, col:col + n] = i
            pos[r, col:col + n] = torch.arange(n)
            ctx[r, col:col + len(c)] = True
            labels += resp
            logit_index += range(r * L + col + len(c) - 1, r * L + col + n - 1)
            token_example += [i] * len(resp)
            col += n
    return {"input_ids": ids, "attention_mask": (seg >= 0).long(), "segment_ids": seg,
            "position_ids": pos, "context_mask": ctx,
            "logit_index": torch.tensor(logit_index, dtype=torch.long),           # (N,)
            "labels": torch.tensor([labels]), "response_mask": torch.ones(1, len(labels),
                                                                          dtype=torch.bool),
            "token_example": torch.tensor([token_example]),                       # (1, N)
            "order": [i for row in rows for i in row]}


def segment_mask(q_seg, q_col, k_seg, k_col):
    """The block-diagonal causal mask of packed rows (pack), True = may attend: a query sees the
    keys of its own segment (example) at or before its column. (B, 1, Tq, Tk) booleans, the
    reference; on CUDA (or BLOCK_MASKS = "always") a FlexAttention BlockMask of the same rule,
    which holds no (Tq, Tk) tensor and which model.Attention runs with flex_attention.

    q_seg, q_col: (B, Tq) segment id and column of each query; k_seg, k_col: (B, Tk) of each
    key (past keys first, then the new ones, as Attention concatenates them). A key that no
    query may see gets a segment id no query has; a padding query gets one of its own, so that
    it sees only itself (no all-masked row, no NaN)."""
    if BLOCK_MASKS == "always" or (BLOCK_MASKS == "cuda" and q_seg.is_cuda):
        return segment_block_mask(q_seg, q_col, k_seg, k_col)
    same = q_seg[:, :, None] == k_seg[:, None, :]                              # (B, Tq, Tk)
    return (same & (k_col[:, None, :] <= q_col[:, :, None]))[:, None]


BLOCK_MASKS = "cuda"     # "always" / "never": tests compare the two forms on the CPU


def prefill_mask(seg):
    """The student prefill's mask over packed rows, (rows, 1, L, L): block-diagonal causal, each
    pad column (segment -1) in a segment of its own (-1 - column), so that a pad query sees only
    itself (no all-masked row, no NaN)."""
    col = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    own = torch.where(seg >= 0, seg, -1 - col)                                # (rows, L)
    return segment_mask(own, col, own, col)


def plan_teacher(batch, student_only_ids, scope, teacher_vocab_size=None):
    """What teacher_continue runs on packed rows, computed on the host where the batch is built
    (train.py; the data errors are raised here, before any device work), as batch keys:
    teacher_ids (rows, Lt), the columns it runs gathered left-aligned per row; teacher_positions;
    teacher_logit_index (N,), where its logits predict the response tokens; teacher_q_seg /
    teacher_q_col (rows, Lt) and teacher_k_seg / teacher_k_col, the segments and columns of its
    queries and keys (past = the row's student K/V, scopes full / image; a query sees only its
    example's shared columns), for segment_mask. Returns the batch."""
    ids, seg, pos, ctx = (batch[k] for k in ("input_ids", "segment_ids", "position_ids",
                                             "context_mask"))              # (rows, L) each
    is_image = student_only_mask(ids, student_only_ids)
    rows, L = ids.shape
    real = seg >= 0
    is_image = is_image & real                                              # (rows, L)
    predicts = torch.zeros(rows * L, dtype=torch.bool, device=ids.device)
    predicts[batch["logit_index"]] = True
    predicts = predicts.view(rows, L)          # the column before a response token (rows, L)
    if scope == "full":
        if (is_image & ctx & predicts).any():
            raise ValueError("scope 'full': a context ends with an image (student-only) token; the "
                             "prompt after the image must have at least one text token")
        run, shared = predicts, ctx & ~predicts   # last context token + response[:-1] | the rest
    else:
        run = real & ~is_image & (ctx | predicts)            # every text token but each last one
        shared = is_image if scope == "image" else torch.zeros_like(real)
    # text tokens of the example up to and including each column (rows, L)
    cum = (real & ~is_image).long().cumsum(-1)
    start = torch.arange(L, device=ids.device) - pos                        # example's 1st column
    n_text = cum - torch.where(start > 0, cum.gather(1, (start - 1).clamp(min=0)), 0)
    if scope == "image" and (is_image & (n_text > 0)).any():
        raise ValueError("scope 'image' needs the image tokens before the prompt text in every "
                         "context")
    if scope == "none":                      # positions count the example's text tokens only
        pos = (n_text - 1).clamp(min=0)
    # the run columns of each row, left-aligned: cols (rows, Lt); slot j of row r is valid if
    # j < (number of run columns of row r)
    n_run = run.sum(1)                                                      # (rows,)
    Lt = int(n_run.max())
    cols = torch.argsort((~run).to(torch.int8), dim=1, stable=True)[:, :Lt]  # (rows, Lt)
    slot = torch.arange(Lt, device=ids.device).expand(rows, Lt)
    valid = slot < n_run[:, None]                                           # (rows, Lt)
    new_ids = ids.gather(1, cols).masked_fill(~valid, 0)                    # (rows, Lt)
    if teacher_vocab_size is not None and int(new_ids.max()) >= teacher_vocab_size:
        raise ValueError(f"token id {int(new_ids.max())} is outside the teacher's vocabulary "
                         f"({teacher_vocab_size}); text tokens must lie in the shared prefix (ids "
                         "the teacher must not embed, like image-splitting tokens, belong in "
                         "student_only_ids)")
    new_seg = torch.where(valid, seg.gather(1, cols), -1 - slot)           # pads: their own
    # which new slot each response-predicting column is, as a flat index into rows * Lt
    slot_of = run.long().cumsum(-1) - 1                                     # (rows, L)
    at = batch["logit_index"]
    out_index = (at // L) * Lt + slot_of.reshape(-1)[at]                    # (N,)
    batch.update(teacher_ids=new_ids, teacher_positions=pos.gather(1, cols).masked_fill(~valid, 0),
                 teacher_logit_index=out_index, teacher_q_seg=new_seg, teacher_q_col=cols,
                 teacher_scope=scope)
    if scope == "none":
        batch.update(teacher_k_seg=new_seg, teacher_k_col=cols)
    else:
        never = torch.full_like(seg, torch.iinfo(seg.dtype).min)   # a segment no query has
        col = torch.arange(L, device=ids.device).expand(rows, L)
        batch.update(teacher_k_seg=torch.cat([torch.where(shared, seg, never), new_seg], 1),
                     teacher_k_col=torch.cat([col, cols], 1))             # (rows, L + Lt)
    return batch


class PackedRows(nn.Module):
    """A Decoder or VLM run on packed rows: the mask is given (block-diagonal, segment_mask), the
    positions restart per example, and the logits are taken at logit_index only (N,) ->
    (1, N, V). Wraps the model once at setup (train.py); `module` is the model (runtime's unwrap
    and the checkpoints see through it)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    @property
    def cfg(self):
        return self.decoder.cfg

    @property
    def decoder(self):
        return self.module.decoder if isinstance(self.module, VLM) else self.module

    def forward(self, input_ids, mask, position_ids, logit_index, images=None, past_kv=None,
                use_cache=True):
        x = (self.module.embed(input_ids, images) if isinstance(self.module, VLM)
             else self.module.embed(input_ids))                                   # (rows, L, D)
        x, kv = self.decoder.blocks(x, mask, position_ids, past_kv)
        x = x.reshape(-1, x.shape[-1])[logit_index][None]                         # (1, N, D)
        return self.decoder.lm_head(self.decoder.norm(x)), (kv if use_cache else None)


def student_prefill(student, batch):
    """kvshare.student_prefill on packed rows (student: PackedRows): logits (1, N, V) for the
    batch's N response tokens, K/V (rows, n_kv_heads, L, head_dim)."""
    return student(batch["input_ids"], mask=prefill_mask(batch["segment_ids"]),
                   position_ids=batch["position_ids"], logit_index=batch["logit_index"],
                   images=batch["images"])                                   # (1, N, V), kv


@torch.no_grad()
def teacher_continue(teacher, student_kv, batch, student_only_ids, scope="full"):
    """kvshare.teacher_continue (and its ablation scopes) on packed rows (teacher: PackedRows):
    teacher logits (1, N, V_teacher), detached. What it runs: plan_teacher, on the host (train.py),
    else here. The scope, the frozen teacher and its compatibility are checked at setup."""
    if batch.get("teacher_scope") != scope:                 # tests and tools: plan it here
        batch = plan_teacher(dict(batch), student_only_ids, scope, teacher.cfg.vocab_size)
    mask = segment_mask(batch["teacher_q_seg"], batch["teacher_q_col"], batch["teacher_k_seg"],
                        batch["teacher_k_col"])              # (rows, 1, Lt, [L +] Lt)
    # past (scopes full / image): per layer (K, V), each (rows, n_kv_heads, L, head_dim)
    past = None if scope == "none" else [(k.detach(), v.detach()) for k, v in student_kv]
    logits, _ = teacher(batch["teacher_ids"], mask, batch["teacher_positions"],
                        batch["teacher_logit_index"], past_kv=past, use_cache=False)
    return logits.detach()                                                   # (1, N, V_teacher)


def handoff(student, teacher, batch, student_only_ids, scope="full"):
    """Steps 1-3 on a batch of either layout, for tests and tools: (student logits, teacher
    logits): kvshare's padded reference, or on packed rows ("segment_ids" in the batch) this
    file's, the models wrapped in PackedRows here. train.py chooses its layout once, at setup."""
    if "segment_ids" not in batch:
        student_logits, kv = kvshare.student_prefill(student, batch)
        return student_logits, kvshare.SCOPES[scope](teacher, kv, batch, student_only_ids)
    student_logits, kv = student_prefill(packed_rows(student), batch)
    return student_logits, teacher_continue(packed_rows(teacher), kv, batch, student_only_ids,
                                            scope)


def packed_rows(model):
    """`model` if a PackedRows is in its wrapper chain (e.g. RebasedRoPE(PackedRows(vlm))), else
    PackedRows(model)."""
    m = model
    while not isinstance(m, PackedRows) and hasattr(m, "module"):
        m = m.module
    return model if isinstance(m, PackedRows) else PackedRows(model)
