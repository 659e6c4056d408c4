"""
A positive control for the transfer measure (eval.transfer), tiny world only: train.py
--tower=oracle. Not the method's default: it shows what the KV handoff does when its
precondition, a teacher that can read the student's image tokens, holds by construction.

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

Which entity a render shows is looked up, not recognised: a table from every render of the
world (its training sources and benchmarks, as data.collate turns them into pixels) to its
words. Saved folders hold only the standard VLM; OracleVLM.wrap re-attaches the oracle after
loading (train.py does, for --tower=oracle).
"""
import hashlib

import torch

import data
from scale import tiles
from model import VLM

# Bound of the learned perturbation, relative to the teacher's embedding RMS. Tiny world seed 0,
# T after align (eval.transfer): 0.97 at EPS = 0 (no training), 0.94 at 0.1, 0.79 at 0.25
# (align uses the room to carry vision, at the words' expense); vision 40 % at 0.1 and 0.25.
EPS = 0.1


def pixel_key(image):
    """A render's identity: a hash of its pixels as data.collate gives them, (3, S, S)."""
    return hashlib.blake2b(image.detach().float().cpu().numpy().tobytes(), digest_size=16).digest()


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
        n, S = out.n_image_tokens, vlm.vision.cfg.image_size
        emb = teacher.embed.weight.detach().float()                                # (V_t, D)
        eos = data.special_id(tok, data.EOS_TOKEN)
        rows, index = {}, {}
        examples = [ex for exs in world.sources.values() for ex in exs] + world.vision_bench \
            + world.knowledge_bench
        for ex in examples:
            if ex.get("image") is None:
                continue
            desc = ex.get("desc")
            if desc is None:
                raise ValueError("--tower=oracle: an image example without a \"desc\" (the "
                                 "words for its image)")
            if desc not in rows:
                ids = tok.encode(desc).ids
                if len(ids) > n:
                    raise ValueError(f"--tower=oracle: {desc!r} is {len(ids)} tokens, more than "
                                     f"the {n} image tokens (lower --shuffle_factor)")
                rows[desc] = [eos] * (n - len(ids)) + ids
            index[pixel_key(tiles.image_views(ex["image"], S)[0][0])] = list(rows).index(desc)
        ids = torch.tensor(list(rows.values()))                                    # (E, n)
        out.register_buffer("tokens", emb[ids], persistent=False)                  # (E, n, D)
        out.index, out.eps = index, EPS if eps is None else eps
        out.scale = float(emb.pow(2).mean().sqrt())               # the embeddings' RMS
        out.descs = list(rows)
        return out.to(next(vlm.parameters()).device).train(vlm.training)

    def image_features(self, images):
        """images (N, 3, S, S) -> (N, n_image_tokens, D): the oracle tokens of each render
        plus the bounded learned perturbation."""
        try:
            rows = [self.index[pixel_key(x)] for x in images]
        except KeyError:
            raise ValueError("--tower=oracle: an image that is not one of the world's renders "
                             "(the oracle knows only those)") from None
        base = self.tokens[torch.tensor(rows, device=self.tokens.device)]         # (N, n, D)
        learned = torch.tanh(self.projector(self.vision(images)))                  # (N, n, D)
        return base + self.eps * self.scale * learned
