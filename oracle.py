"""
The image's words (tiny world only): what the frozen teacher would read if each render were
replaced by its description ("the red circle"). Two uses, neither the method's default:

- train.py --tower=oracle, a positive control for the transfer measure (eval.transfer): image
  tokens that the teacher can read by construction (OracleVLM, below).
- train.py --kv_anchor=W, an alignment that tries to make a LEARNED tower readable: in align
  and adapt, W * words_kv_loss pulls the student's per-layer K/V at the image positions toward
  the frozen teacher's K/V of the image's words (see words_kv_loss).

The oracle tower: for a render of the red circle, the n image tokens are the FROZEN teacher's
input embeddings of the words "the red circle", right-aligned so that they end where the
prompt text begins (as the words would); the slots before them hold the teacher's <eos>
embedding (what precedes every document the teacher was trained on). Plus a bounded learned
perturbation, the ordinary vision tower + projector squashed by tanh:

    tokens = E_teacher[<eos> .. <eos> the red circle]               (fixed: the oracle)
             + EPS * rms(E_teacher) * tanh(projector(vision(image)))   (learned, bounded)

Why learnable and bounded: align and adapt have parameters to train (the decoder is frozen in
align), the model folders keep the standard layout (weights.save_vlm / load_vlm), and the tower
can still carry what the words lack (count, position); tanh and EPS keep every coordinate
within EPS of the embedding scale, so the tokens cannot drift away from the words. At EPS = 0
it is a pure oracle.

Which entity a render shows is looked up, not recognised (image_words): a table from every
render of the world (its training sources and benchmarks, as data.collate turns them into
pixels) to its words. Saved folders hold only the standard VLM; OracleVLM.wrap re-attaches the
oracle after
loading (train.py does, for --tower=oracle).
"""
import hashlib
from typing import NamedTuple

import torch

import data
from model import VLM

# Bound of the learned perturbation, relative to the teacher's embedding RMS. Tiny world seed 0,
# T after align (eval.transfer): 0.97 at EPS = 0 (no training), 0.94 at 0.1, 0.79 at 0.25
# (align uses the room to carry vision, at the words' expense); vision 40 % at 0.1 and 0.25.
EPS = 0.1


def pixel_key(image):
    """A render's identity: a hash of its pixels as data.collate gives them, (3, S, S)."""
    return hashlib.blake2b(image.detach().float().cpu().numpy().tobytes(), digest_size=16).digest()


class Words(NamedTuple):
    ids: torch.Tensor          # (E, n) long: <eos> fill, then the words
    is_word: torch.Tensor      # (E, n) bool: True where ids holds a word, not the fill
    index: dict                # pixel_key -> row
    descs: list                # (E,) the words as text


def image_words(world, tok, n, image_size, flag):
    """The words of every render of `world` (its sources and benchmarks; image examples carry a
    "desc"), as n token ids each, right-aligned so that they end where the prompt text begins
    (as the words would) after <eos> fill (what precedes every document the teacher read).
    Returns Words (ids, is_word, index, descs). flag names the option in errors."""
    eos = data.special_id(tok, data.EOS_TOKEN)
    rows, index = {}, {}
    examples = [ex for exs in world.sources.values() for ex in exs] + world.vision_bench \
        + world.knowledge_bench
    for ex in examples:
        if ex.get("image") is None:
            continue
        desc = ex.get("desc")
        if desc is None:
            raise ValueError(f"{flag}: an image example without a \"desc\" (the words for its "
                             "image)")
        if desc not in rows:
            ids = tok.encode(desc).ids
            if len(ids) > n:
                raise ValueError(f"{flag}: {desc!r} is {len(ids)} tokens, more than the {n} "
                                 "image tokens (lower --shuffle_factor)")
            rows[desc] = [eos] * (n - len(ids)) + ids
        index[pixel_key(data.image_views(ex["image"], image_size)[0][0])] = list(rows).index(desc)
    lengths = torch.tensor([len(tok.encode(d).ids) for d in rows])                # (E,)
    return Words(torch.tensor(list(rows.values())),
                 torch.arange(n) >= n - lengths[:, None], index, list(rows))


def lookup(index, images, flag):
    """images (N, 3, S, S) -> (N,) rows of image_words' ids, by their pixels."""
    try:
        return torch.tensor([index[pixel_key(x)] for x in images])
    except KeyError:
        raise ValueError(f"{flag}: an image that is not one of the world's renders (only those "
                         "have words)") from None


def words_kv_loss(student_kv, batch, teacher, words, image_token_id):
    """The --kv_anchor term of one batch (padded layout, one view per image). The frozen teacher
    reads the batch with every image's n tokens replaced by its words (image_words), giving the
    K/V the handoff would carry if the image were text; the loss is the relative squared error
    of the student's per-layer K and V at each image position against those, averaged with equal
    weight over the positions that hold words and those that hold the <eos> fill (the fill is
    most of the n positions and the easiest to match; the words are what the teacher reads):

        e_p = ||S_p - T_p||^2 / ||T_p||^2  per layer, K or V and image position p
        loss = mean over layers and {K, V} of (mean_{p: word} e_p + mean_{p: fill} e_p) / 2

    student_kv: kvshare.student_prefill's per-layer (K, V), each (B, H_kv, L, d); words: what
    image_words returns. Gradients reach the student only."""
    input_ids = batch["input_ids"]
    slots = input_ids == image_token_id                                            # (B, L)
    rows = lookup(words.index, batch["images"], "--kv_anchor").to(input_ids.device)
    text = input_ids.masked_scatter(slots, words.ids.to(input_ids.device)[rows])   # the words
    is_word = words.is_word.to(input_ids.device)[rows].flatten()                   # (N * n,)
    with torch.no_grad():
        _, teacher_kv = teacher(text, attention_mask=batch["attention_mask"], use_cache=True)
    terms = []
    for pair_s, pair_t in zip(student_kv, teacher_kv):
        for s, t in zip(pair_s, pair_t):                                           # K, then V
            s, t = s.transpose(1, 2)[slots].float(), t.transpose(1, 2)[slots].float()
            e = (s - t).pow(2).sum((1, 2)) / t.pow(2).sum((1, 2))                  # (N * n,)
            terms.append(torch.stack([e[m].mean() for m in (is_word, ~is_word) if m.any()])
                         .mean())
    return torch.stack(terms).mean()


class OracleVLM(VLM):
    """A VLM whose image tokens are the teacher's embeddings of the image's words (see the
    module docstring). tokens: (n_entries, n_image_tokens, D), a non-persistent buffer, so
    state_dict() is a plain VLM's; index: pixel_key -> row of tokens."""

    @classmethod
    def wrap(cls, vlm, teacher, world, tok, eps=None):
        """An OracleVLM with `vlm`'s weights (a copy) for the images of `world` (world.World,
        whose image examples carry a "desc"), reading `teacher`'s input embeddings. eps: the
        perturbation's bound (None: EPS)."""
        if vlm.image_splitting is not None or vlm.view_token_ids:
            raise ValueError("--tower=oracle: one view per image only (no --image_splitting)")
        out = cls(vlm.decoder.cfg, vlm.vision.cfg, vlm.image_token_id, vlm.projector.factor)
        out.load_state_dict(vlm.state_dict())
        emb = teacher.embed.weight.detach().float()                                # (V_t, D)
        words = image_words(world, tok, out.n_image_tokens, vlm.vision.cfg.image_size,
                            "--tower=oracle")
        out.index, out.descs = words.index, words.descs
        out.register_buffer("tokens", emb[words.ids], persistent=False)            # (E, n, D)
        out.eps = EPS if eps is None else eps
        out.scale = float(emb.pow(2).mean().sqrt())               # the embeddings' RMS
        return out.to(next(vlm.parameters()).device).train(vlm.training)

    def image_features(self, images):
        """images (N, 3, S, S) -> (N, n_image_tokens, D): the oracle tokens of each render
        plus the bounded learned perturbation."""
        base = self.tokens[lookup(self.index, images, "--tower=oracle").to(self.tokens.device)]
        learned = torch.tanh(self.projector(self.vision(images)))                  # (N, n, D)
        return base + self.eps * self.scale * learned
