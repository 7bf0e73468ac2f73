"""`--microbatches M`: each step's batch in M equal parts, gradients accumulated (one process; the
layouts under torchrun are checked in tests/parallel)."""

import json

from tiny import tiny_cfgs

from moekit.train import run_train
from moekit.train.trainer import METRICS


def rows(path):
    return [json.loads(ln) for ln in open(path / METRICS)]


def test_microbatches_take_the_steps_of_the_whole_batch(tmp_path):
    """A dense model's run in 2 microbatches is the whole batch's run, step for step (its loss is a
    sum over tokens, divided by the whole batch's count); the MoE's first step too, its loads summed
    over the microbatches (its later steps differ a little: the auxiliary losses are each
    microbatch's own)."""
    model, whole = tiny_cfgs(steps=4)
    _, parts = tiny_cfgs(steps=4, microbatches=2)
    run_train(tmp_path / "whole", model, whole, progress=False, plots=False)
    run_train(tmp_path / "parts", model, parts, progress=False, plots=False)
    a, b = rows(tmp_path / "whole" / "dense"), rows(tmp_path / "parts" / "dense")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * x["grad_norm"]
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-5
    a, b = rows(tmp_path / "whole" / "moe"), rows(tmp_path / "parts" / "moe")
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-6
    assert a[0]["tokens_per_expert"] == b[0]["tokens_per_expert"]
    assert sum(map(sum, b[0]["tokens_per_expert"])) == 2 * 4 * 32 * 2  # layers x rows x tokens x top-k
    assert abs(a[0]["aux_loss"] - b[0]["aux_loss"]) < 0.05 * a[0]["aux_loss"]  # the microbatches' mean
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-2
