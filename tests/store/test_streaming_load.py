"""Loading costs what it keeps: a run's checkpoint (``load_trained``) and a Hugging Face folder
(``load_hf``) are read tensor by tensor into a model built on the meta device, in the file's own
dtype: the same values as reading the whole file and loading its state dict, the optimizer state
never read, and peak memory while loading near the model's bytes (measured in a fresh process;
the old path held the file's tensors next to a second, float32 model: 2-4x)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moekit.config import LMConfig, MoEConfig
from moekit.models.lm import MoETransformer
from moekit.train.checkpoint import MODEL, OPTIM, CheckpointError, read_checkpoint, save_checkpoint
from moekit.train.trainer import load_trained

PROBE = """
import json, sys, torch
import moekit.interop.stored, moekit.train.trainer
from moekit.config import LMConfig
with torch.device("meta"):
    torch.nn.Embedding(2, 2)  # the meta device's first init loads ~100 MB of torch modules: not the load's
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
base = status("VmRSS")
if sys.argv[1] == "hf":
    model = moekit.interop.load_hf(sys.argv[2])
else:
    model = moekit.train.trainer.load_trained(sys.argv[2], LMConfig.from_dict(json.loads(sys.argv[3])))
kept = sum(t.nbytes for t in model.state_dict().values())
print(json.dumps(dict(grew=status("VmHWM") - base, kept=kept, dtype=str(model.embed.weight.dtype))))
"""


def peak_over_kept(*args: str) -> tuple[float, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env={"PYTHONPATH": src}, check=True
    )
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["grew"] / d["kept"], d["dtype"]


def lm_cfg(dim=64, experts=16, layers=3) -> LMConfig:
    moe = MoEConfig(dim=dim, hidden_dim=2 * dim, num_experts=experts, top_k=2, num_shared_experts=1, router="sigmoid")
    return LMConfig(vocab_size=257, dim=dim, n_layers=layers, n_heads=4, max_seq_len=64, moe=moe)


def trained_file(tmp_path, cfg: LMConfig) -> tuple[Path, MoETransformer]:
    """A checkpoint as a run writes it: model, AdamW state (2x the model), routing buffers."""
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16))).loss.backward()
    opt.step()
    for m in model.moe_layers:
        m.router.bias_E.normal_()
        m.expert_usage.uniform_()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model, opt, meta={"step": 1})
    return path, model


def test_load_trained_reads_every_tensor_into_place_and_no_optimizer_state(tmp_path):
    cfg = lm_cfg()
    path, ref = trained_file(tmp_path, cfg)
    got = load_trained(tmp_path, cfg)
    want = ref.state_dict()
    assert set(got.state_dict()) == set(want)
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(got.rope_cos, ref.rope_cos)  # non-persistent buffers rebuilt
    # the optimizer state is not read: damaging it leaves inference loading unaffected ...
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    key = next(k for k in tensors if k.startswith(OPTIM))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        read_checkpoint(path)  # (a resume would refuse it)
    assert torch.equal(load_trained(tmp_path, cfg).embed.weight, ref.embed.weight)
    # ... while a damaged model tensor is named
    key = MODEL + "blocks.1.ffn.experts.w_up"
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"corrupt: tensor 'model\.blocks\.1\.ffn\.experts\.w_up' does not match"):
        load_trained(tmp_path, cfg)


def test_load_trained_names_what_does_not_fit(tmp_path):
    cfg = lm_cfg()
    trained_file(tmp_path, cfg)
    with pytest.raises(CheckpointError, match=r"does not fit this model: .*'embed\.weight' has shape \(257, 64\)"):
        load_trained(tmp_path, LMConfig(**{**cfg.to_dict(), "dim": 32, "moe": lm_cfg(dim=32).moe}))
    with pytest.raises(CheckpointError, match=r"does not fit this model: unexpected blocks\.2\.attn"):
        load_trained(tmp_path, LMConfig(**{**cfg.to_dict(), "n_layers": 2, "moe": cfg.moe}))
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_trained(tmp_path, cfg)


@pytest.mark.slow
def test_load_trained_peaks_near_the_model_not_the_file(tmp_path):
    """The file holds the model and 2x its bytes of AdamW state; loading grows the process by
    about the model (was: the whole file next to a randomly initialised model, ~4x)."""
    cfg = lm_cfg(dim=256, experts=32, layers=4)  # ~70 MB of float32 model, ~210 MB of file
    trained_file(tmp_path, cfg)
    ratio, dtype = peak_over_kept("run", str(tmp_path), json.dumps(cfg.to_dict()))
    assert dtype == "torch.float32" and ratio < 1.3, ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_hugging_face_folder_loads_in_its_own_dtype_near_its_size(tmp_path, dtype):
    pytest.importorskip("transformers", reason="needs Hugging Face transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
    from test_hf import build, ids

    from moekit.interop import load_hf

    hf = build("olmoe", hidden_size=256, intermediate_size=512, num_experts=32, num_hidden_layers=4)
    hf = hf.to(dtype)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20MB")
    got, ref = load_hf(tmp_path / "hf"), load_hf(hf)  # read into place / from the in-memory model
    assert got.embed.weight.dtype == dtype
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(got(ids()).logits, ref(ids()).logits)
    wide = load_hf(tmp_path / "hf", dtype=torch.float64)
    assert wide.embed.weight.dtype == torch.float64 and torch.equal(wide.embed.weight, ref.embed.weight.double())
    ratio, got_dtype = peak_over_kept("hf", str(tmp_path / "hf"))
    assert got_dtype == str(dtype) and ratio < 1.3, ratio
