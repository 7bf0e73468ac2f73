"""Decode weights on huge pages (moekit.kernels.pages): copies keep every value, dtype, shape and
stride; a model keeps its parameters' identity, its tied weights, its outputs and its checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import MoEConfig
from moekit.config import LMConfig
from moekit.kernels import pages
from moekit.layer.lowbit import QuantizedExperts
from moekit.models import MoETransformer
from moekit.quantize import quantize_model

needs_pages = pytest.mark.skipif(not pages.available(), reason="no transparent huge pages on this system")


def _lm(tied: bool = False) -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(dim=128, hidden_dim=256, num_experts=8, top_k=2)
    cfg = LMConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, max_seq_len=32, moe=moe, tie_embeddings=tied)
    return MoETransformer(cfg).eval()


def test_copies_keep_values_dtypes_shapes_and_strides_in_storages_of_their_own():
    g = torch.Generator().manual_seed(0)
    ts = [
        torch.randn(300, 200, generator=g),
        torch.randn(64, 96, 40, generator=g).transpose(1, 2),  # rows-major experts' strides
        torch.randn(1000, generator=g).to(torch.bfloat16),
        torch.randint(-128, 127, (513, 77), dtype=torch.int8, generator=g),
        torch.tensor(3.5),
        torch.empty(0, 4),
    ]
    copies = pages.on_huge_pages(ts)
    for t, c in zip(ts, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.stride() == t.stride()
        assert torch.equal(c, t)
        assert c.numel() == 0 or c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    storages = {c.untyped_storage().data_ptr() for c in copies if c.numel()}
    assert len(storages) == sum(1 for c in copies if c.numel())  # one storage each: safetensors saves them
    ts[0].add_(1.0)
    assert not torch.equal(copies[0], ts[0])  # a copy, not a view of the source


@needs_pages
def test_the_mapping_is_advised_and_tracked():
    (c,) = pages.on_huge_pages([torch.randn(1 << 20)])
    assert "hg" in pages.mapping_info(c)["VmFlags"].split()  # advised MADV_HUGEPAGE
    assert pages.on_huge_pages_already(c)
    assert not pages.on_huge_pages_already(torch.randn(1 << 20))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"tensors\[1\].*gaps or overlaps"):
        pages.on_huge_pages([torch.zeros(4), torch.zeros(8, 8)[:, ::2]])
    with pytest.raises(ValueError, match=r"tensors\[0\] is on meta"):
        pages.on_huge_pages([torch.empty(4, device="meta")])


@needs_pages
@pytest.mark.parametrize("tied", [False, True])
def test_a_model_moved_keeps_its_parameters_outputs_and_checkpoints(tied, tmp_path):
    m = _lm(tied)
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = m(idx).logits
    params = dict(m.named_parameters())
    moved = pages.move_to_huge_pages_([*m.blocks, m])
    assert moved >= sum(p.numel() * 4 for p in params.values() if p.numel() * 4 >= pages.MIN_BYTES)
    assert dict(m.named_parameters()) == params  # the same Parameter objects
    assert all(pages.on_huge_pages_already(p) for p in params.values() if p.numel() * 4 >= pages.MIN_BYTES)
    if tied:
        assert m.head is None  # the head reads the embedding, moved once
    with torch.no_grad():
        assert torch.equal(m(idx).logits, before)
    assert pages.move_to_huge_pages_([*m.blocks, m]) == 0  # nothing left to move
    state = m.state_dict()
    save_file(state, tmp_path / "m.safetensors")  # refuses views of one shared storage
    assert all(torch.equal(v, state[k]) for k, v in load_file(tmp_path / "m.safetensors").items())


@needs_pages
def test_prepare_decoding_moves_a_quantized_model_and_remakes_the_experts_table():
    """A native table made before the move would hold the freed buffers' addresses; the compiled
    step reads the table prepare_decoding_ leaves."""
    m = _lm()
    quantize_model(m, "int8", rest="int8")
    experts = m.moe_layers[0].experts
    assert isinstance(experts, QuantizedExperts)
    experts.prepare_decoding_()  # a table over the buffers as quantized
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = m(idx).logits
    m.prepare_decoding_()
    up = experts.up[0]
    assert pages.on_huge_pages_already(up.data)
    if experts._table is not None:  # the native kernels are built
        assert experts._table.tensors[0][0] is up.data  # not the buffer it replaced
    with torch.no_grad():
        assert torch.equal(m(idx).logits, before)
