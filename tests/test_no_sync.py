"""The distill step has no shape that depends on tensor values (no host sync on a GPU): one
padded and one packed micro-batch, built and set up exactly as train.py does (stage_batches,
distill_setup), run forward + loss + backward under a dispatch mode that records every op whose
output shape depends on values (nonzero, boolean indexing, masked_select, unique) or that reads
a value to the host (item / bool / float of a tensor). Bad data is found on the host instead,
where the batch is built."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import train
from model import Decoder

VALUE_DEPENDENT = {"nonzero", "nonzero_static", "argwhere", "masked_select", "unique",
                   "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "_local_scalar_dense", "is_nonzero", "item", "repeat_interleave"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class ValueDependentOps(TorchDispatchMode):
    """Records the name of every op that needs tensor values on the host to know its output."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in INDEXING and any(
            torch.is_tensor(t) and t.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for t in a)
        if name in VALUE_DEPENDENT or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_the_detector_can_fail():
    x, mask = torch.randn(4, 3, requires_grad=True), torch.tensor([True, False, True, False])
    with ValueDependentOps() as mode:
        x[mask].sum().backward()
        float(x.detach().sum())
    assert "index" in mode.found and "_local_scalar_dense" in mode.found, mode.found


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("scope", ["full", "none"])
def test_one_distill_micro_batch_has_no_value_dependent_shape(tmp_path, packed, scope):
    cfg = train.get_config(["--preset=smoke", f"--out_dir={tmp_path}", f"--pack={packed}",
                            f"--scope={scope}"])
    world, tok = train.build_data_and_tokenizer(cfg)
    setup = train.TrainingSetup(cfg, train.Devices("cpu"), world, tok)
    teacher = Decoder(train.lm_config(cfg, tok))
    student = train.initial_student(cfg, teacher, tok)
    model, step_fn, args = train.distill_setup(setup, teacher, student)
    assert step_fn is (train.variant_step if packed or scope != "full" else train.distill_step)
    micro_batches = next(train.stage_batches(setup, "distill", student, 0, args))   # host
    counts = train.token_counts(micro_batches)
    assert counts["kd"] > 0 and counts["ce"] > 0
    with ValueDependentOps() as mode:
        out = step_fn(model, micro_batches[0], counts, args)    # forward, loss, backward
    assert mode.found == [], f"value-dependent ops in the step: {sorted(set(mode.found))}"
    assert torch.isfinite(out["loss"]) and student.decoder.embed.weight.grad is not None


def test_a_response_with_an_image_placeholder_is_refused_where_it_is_encoded():
    tok = data.train_tokenizer(["a b c d eats apples"], vocab_size=262)
    ex = {"image": None, "prompt": "a eats", "response": " <image> apples", "source": "text_qa"}
    with pytest.raises(ValueError, match="source 'text_qa': its response contains '<image>'"):
        data.encode_example(ex, tok, 4)
