"""The embedded corpus, the split, the tokenizers and the token streams."""

import pytest
import torch

from moekit.data import (
    BPETokenizer,
    ByteTokenizer,
    build_data,
    embedded_corpus,
    fixed_windows,
    load_text_path,
    load_tokenizer,
    random_batches,
    split_documents,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


def test_embedded_corpus_has_prose_and_code_from_python_itself():
    """Prose from pydoc_data topics and code from stdlib modules, interleaved."""
    docs = embedded_corpus(code_chars=200_000)
    domains = [d.domain for d in docs]
    assert set(domains) == {"prose", "code"}
    assert any("def " in d.text for d in docs if d.domain == "code")
    assert all(d.name.startswith("pydoc:") for d in docs if d.domain == "prose")
    first_half = domains[: len(domains) // 2]
    assert "prose" in first_half and "code" in first_half, "the domains run through the whole stream"


def test_split_is_fixed_disjoint_and_about_ten_percent():
    docs = embedded_corpus(code_chars=300_000)
    tr, va = split_documents(docs)
    tr2, va2 = split_documents(embedded_corpus(code_chars=300_000))
    assert [d.text for d in va] == [d.text for d in va2]
    for a, b, d in zip(tr, va, docs):
        assert a.text + b.text == d.text, "train and validation parts tile each document, no overlap"
    for dom in ("prose", "code"):
        frac = sum(len(d.text) for d in va if d.domain == dom) / sum(len(d.text) for d in docs if d.domain == dom)
        assert 0.08 < frac < 0.2, (dom, frac)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    s = "héllo wörld\n\tdef f(x): return x"
    assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_bpe_round_trip_and_save_load(tmp_path):
    """A locally trained BPE reproduces text exactly and survives save/load."""
    docs = embedded_corpus(code_chars=100_000)[:30]
    tok = BPETokenizer.train((d.text for d in docs), 500)
    s = docs[3].text[:500]
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(s)) < len(s.encode()) / 1.5, "BPE compresses"
    tok.save(tmp_path / "t.json")
    tok2 = load_tokenizer(tmp_path / "t.json")
    assert tok2.encode(s) == tok.encode(s)


def test_streams_keep_domain_labels():
    """Every token carries the domain of its document; documents end with EOS."""
    data = build_data(tokenizer="bytes", code_chars=100_000)
    assert data.domains == ["prose", "code"]
    assert data.train_ids_N.shape == data.train_domain_N.shape
    eos = (data.train_ids_N == 256).nonzero().flatten()
    assert eos.numel() > 10
    first_doc = data.tokenizer.decode(data.train_ids_N[: eos[0]].tolist())
    assert int(data.train_domain_N[0]) == 0 and first_doc.strip()[:1].isalpha(), (
        "the stream starts with prose (a pydoc topic)"
    )
    assert set(data.val_domain_N.unique().tolist()) == {0, 1}


def test_user_data_folder(tmp_path):
    """--data: a folder of text files, domains from the top folder names; errors name the path."""
    (tmp_path / "poems").mkdir()
    (tmp_path / "poems" / "a.txt").write_text("roses are red\n" * 200)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "b.md").write_text("mix the flour\n" * 200)
    docs = load_text_path(str(tmp_path))
    assert sorted(d.domain for d in docs) == ["poems", "recipes"]
    data = build_data(str(tmp_path), tokenizer="bytes")
    assert data.domains == ["poems", "recipes"]
    with pytest.raises(FileNotFoundError, match="nope"):
        load_text_path(str(tmp_path / "nope"))


def test_batches_are_seeded_and_windows_fixed():
    ids = torch.arange(1000)
    a = next(random_batches(ids, 16, 4, torch.Generator().manual_seed(1)))
    b = next(random_batches(ids, 16, 4, torch.Generator().manual_seed(1)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])
    assert torch.equal(fixed_windows(1000, 16, 8), fixed_windows(1000, 16, 8))


def test_balanced_windows_split_evenly_over_domains():
    """Inspection windows are shared equally by a rare and a common domain."""
    from moekit.data.stream import balanced_windows

    dom = torch.cat([torch.zeros(500), torch.ones(9500)]).to(torch.uint8)
    starts = balanced_windows(dom, 16, 10)
    assert starts.numel() == 10
    assert int((dom[starts] == 0).sum()) == 5 and int((dom[starts] == 1).sum()) == 5
    assert torch.equal(starts, balanced_windows(dom, 16, 10))
    assert balanced_windows(torch.zeros(100, dtype=torch.uint8), 16, 4).numel() == 4
