"""Hugging Face folders with their experts in an expert store: every family's logits bit-identical
to the all-in-memory load_hf (fp32 and bf16), the same greedy tokens at the smallest budget, the
per-expert and the stacked (transformers 5) layouts, sharded folders, and clear errors."""

import pytest
import torch

pytest.importorskip("transformers", reason="interop tests need Hugging Face transformers")

from test_hf import FAMILIES, build, ids  # noqa: E402 - after the importorskip

from moekit.interop import load_hf  # noqa: E402
from moekit.store import StoredExperts, expert_pools, store_stats  # noqa: E402


def expert_bytes(model, dtype) -> int:
    m = model.cfg.moe
    return 3 * m.dim * m.hidden_dim * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_family_equals_the_all_in_memory_load(family, dtype, tmp_path):
    hf = build(family).to(dtype)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # several shards
    ref = load_hf(tmp_path / "hf")
    layers = len(ref.moe_layers)
    budget = ref.cfg.moe.top_k * expert_bytes(ref, dtype)  # the least there is: one layer's top_k, shared
    mk = load_hf(tmp_path / "hf", expert_memory=budget)
    assert layers > 1 and all(isinstance(m.experts, StoredExperts) for m in mk.moe_layers)
    assert all(m.experts.slots == ref.cfg.moe.top_k for m in mk.moe_layers)
    x = ids()
    with torch.no_grad():
        assert torch.equal(mk(x[:1, :1]).logits, ref(x[:1, :1]).logits)  # one token: its experts fit, exact
        full, full_ref = mk(x).logits, ref(x).logits
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # 24 tokens' experts outnumber the slots: chunks, summed apart
    torch.testing.assert_close(full, full_ref, rtol=tol, atol=tol)
    prompt = x[:1, :5]
    assert torch.equal(mk.generate(prompt, 20, temperature=0.0), ref.generate(prompt, 20, temperature=0.0))
    assert store_stats(mk).misses > 0


def test_stacked_layout_and_mixtral_names_are_read(tmp_path):
    """A folder whose experts are stacked (``experts.gate_up_proj``), written by hand in
    transformers 5's in-memory layout, loads as the per-expert one does."""
    from safetensors.torch import load_file, save_file

    hf = build("olmoe")
    hf.save_pretrained(tmp_path / "per")
    sd = load_file(tmp_path / "per" / "model.safetensors")
    stacked = {}
    for k, v in sd.items():
        if ".experts." not in k:
            stacked[k] = v
    for i in range(2):
        pre = f"model.layers.{i}.mlp.experts."
        E = 4
        stacked[pre + "gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{pre}{e}.gate_proj.weight"], sd[f"{pre}{e}.up_proj.weight"]]) for e in range(E)]
        )
        stacked[pre + "down_proj"] = torch.stack([sd[f"{pre}{e}.down_proj.weight"] for e in range(E)])
    (tmp_path / "stacked").mkdir()
    (tmp_path / "stacked" / "config.json").write_text((tmp_path / "per" / "config.json").read_text())
    save_file(stacked, tmp_path / "stacked" / "model.safetensors")
    ref = load_hf(tmp_path / "per")
    mk = load_hf(tmp_path / "stacked", expert_memory=10**8)
    x = ids()
    with torch.no_grad():
        assert torch.equal(mk(x).logits, ref(x).logits)


def test_what_the_folder_cannot_give_is_a_clear_error(tmp_path):
    hf = build("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="decoding needs at least one layer's top_k=2"):
        load_hf(tmp_path / "hf", expert_memory=1000)
    with pytest.raises(TypeError, match="pass the folder's path"):
        load_hf(hf, expert_memory=10**8)
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_hf(tmp_path / "hf", expert_memory=10**8)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16"])
def test_slots_in_the_checkpoints_layout_compute_the_same_model(family, fmt, tmp_path):
    """``expert_dtype``: the slots keep the checkpoint's (out, in) layout in that dtype (read with
    no transpose, computed by F.linear): equal to the all-in-memory model to that dtype's rounding."""
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    hf = build(family).to(dtype)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    ref = load_hf(tmp_path / "hf")
    e_bytes = expert_bytes(ref, {"fp32": torch.float32}.get(fmt, torch.bfloat16))
    mk = load_hf(tmp_path / "hf", expert_memory=ref.cfg.moe.top_k * e_bytes, expert_dtype=fmt)
    assert all(m.experts.pool.fmt == fmt for m in mk.moe_layers)
    x = ids()
    with torch.no_grad():
        got, want = mk(x).logits.float(), ref(x).logits.float()
    tol = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 0.15}[fmt]  # bf16: its rounding, summed in another order
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    s = store_stats(mk)
    assert s.misses > 0 and s.bytes_read == s.misses * expert_bytes(ref, dtype)  # the file's bytes per miss
    with pytest.raises(ValueError, match="give expert_memory too"):
        load_hf(tmp_path / "hf", expert_dtype=fmt)


@pytest.mark.parametrize("fmt", ["int8", "int4:32"])
def test_a_float_folder_in_a_low_bit_store_equals_the_model_quantized_in_memory(fmt, tmp_path):
    """int8 / int4 slots for a float folder: each expert quantized as it is read (a quarter or
    less of its bytes in the budget) computes exactly what the same model quantized in memory does."""
    from moekit.kernels.lowbit import format_bytes
    from moekit.quantize import quantize_model

    hf = build("olmoe", hidden_size=64, intermediate_size=32)
    hf.save_pretrained(tmp_path / "hf")
    ref = load_hf(tmp_path / "hf")
    quantize_model(ref, fmt, group_size=32)
    m = ref.cfg.moe
    e_bytes = format_bytes(fmt, 2 * m.hidden_dim, m.dim) + format_bytes(fmt, m.dim, m.hidden_dim)
    mk = load_hf(tmp_path / "hf", expert_memory=m.top_k * e_bytes, expert_dtype=fmt)
    x = ids()
    with torch.no_grad():
        assert torch.equal(mk(x).logits, ref(x).logits)
        # one token: the model quantized in memory sums a layer's experts in one native call, the store one by one
        torch.testing.assert_close(mk(x[:1, :1]).logits, ref(x[:1, :1]).logits, rtol=1e-5, atol=1e-6)
    s = store_stats(mk)
    assert s.misses > 0 and s.bytes_read == s.misses * expert_bytes(ref, torch.float32)  # float32 rows read
    assert sum(p.nbytes for p in expert_pools(mk)) == m.top_k * e_bytes  # held in the low-bit format
