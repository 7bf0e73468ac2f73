"""``moekit inspect``: the routing statistics on hand-built inputs with known answers, and the
report on a real tiny training run (no mocks).

Shape legend: T tokens, K slots per token, E experts, D domains, V vocabulary.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from moekit.analysis import inspect_run, layer_table, routing_table
from moekit.analysis.report import capacity_text, id_list, layer_reading, show_token, text_table, trained_steps
from moekit.analysis.routing import (
    available_windows,
    collect_routing,
    conditional_mutual_information,
    dead_experts,
    expert_domain_counts,
    expert_token_counts,
    mutual_information,
    overloaded_experts,
    permute_within_groups,
    specialisation,
    top_tokens_by_count,
    top_tokens_by_lift,
)
from moekit.cli import main

PROSE, CODE = 0, 1
DOMAINS = ["prose", "code"]
WINDOWS, SEQ_LEN = 8, 32


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny MoE run, a tiny dense-only run (bytes tokenizer, 20 steps) and a MoE run stopped at
    step 10 of 30, trained through the CLI."""
    root = tmp_path_factory.mktemp("inspect")
    common = [
        "--out",
        str(root),
        "--steps",
        "20",
        "--eval-every",
        "20",
        "--batch-size",
        "4",
        "--seq-len",
        str(SEQ_LEN),
        "--dim",
        "32",
        "--layers",
        "2",
        "--quiet",
        "--preset",
        "mixtral",
        "--set",
        "train.code_chars=100000",
        "--set",
        'train.tokenizer="bytes"',
        "--set",
        "train.eval_windows=4",
        "--set",
        "model.max_seq_len=64",
        "--set",
        "model.ffn_hidden_dim=64",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        assert main(["train", "--name", "moe", "--no-baseline", "--set", "model.moe.hidden_dim=32", *common]) == 0
        assert main(["train", "--name", "dense", "--dense", *common]) == 0
        assert main(["train", "--name", "stopped", "--no-baseline", *common, "--steps", "30", "--stop-at", "10"]) == 0
        yield {"moe": root / "moe", "dense": root / "dense", "stopped": root / "stopped", "root": root}


@pytest.fixture(scope="module")
def report(runs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(runs["root"] / "cache"))
        return inspect_run(runs["moe"], windows=WINDOWS, quiet=True)


@pytest.fixture
def cache_env(runs, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(runs["root"] / "cache"))


# ---------------------------------------------------------------------------------------------- pure statistics
def test_perfect_specialisation_gives_mi_one():
    # expert 0 sees only code, expert 1 only prose
    domain_T = torch.tensor([CODE, PROSE, CODE, PROSE, CODE, PROSE])
    experts_TK = torch.tensor([[0], [1], [0], [1], [0], [1]])
    counts_ED = expert_domain_counts(experts_TK, domain_T, 2, 2)
    assert counts_ED.tolist() == [[0, 3], [3, 0]]
    spec_ED = specialisation(counts_ED)
    assert spec_ED[0, CODE].item() == pytest.approx(2.0) and spec_ED[0, PROSE].item() == 0.0
    assert spec_ED[1, PROSE].item() == pytest.approx(2.0)
    mi = mutual_information(counts_ED)
    assert mi["mi_bits"] == pytest.approx(1.0) and mi["normalised"] == pytest.approx(1.0)


def test_perfect_specialisation_top2_with_unequal_base_rate():
    # K = 2: code tokens go to experts {0, 1}, prose to {2, 3}; base rate code 25%
    domain_T = torch.tensor([CODE] + [PROSE] * 3)
    experts_TK = torch.tensor([[0, 1], [2, 3], [3, 2], [2, 3]])
    counts_ED = expert_domain_counts(experts_TK, domain_T, 4, 2)
    mi = mutual_information(counts_ED)
    assert mi["normalised"] == pytest.approx(1.0)
    assert mi["domain_entropy_bits"] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    assert specialisation(counts_ED)[0, CODE].item() == pytest.approx(4.0)


def test_independent_routing_has_no_information():
    # every expert gets exactly the base rate: MI = 0 and specialisation = 1
    domain_T = torch.tensor([CODE, PROSE, PROSE, CODE, PROSE, PROSE])
    experts_TK = torch.tensor([[0], [0], [0], [1], [1], [1]])
    counts_ED = expert_domain_counts(experts_TK, domain_T, 2, 2)
    assert mutual_information(counts_ED)["mi_bits"] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(specialisation(counts_ED), torch.ones(2, 2, dtype=torch.float64))
    # random routing drawn independently of the domain: MI is of the order of the plug-in bias
    g = torch.Generator().manual_seed(0)
    domain_T = (torch.rand(20000, generator=g) < 0.3).long()
    experts_TK = torch.randint(0, 8, (20000, 2), generator=g)
    mi = mutual_information(expert_domain_counts(experts_TK, domain_T, 8, 2))
    assert mi["normalised"] < 0.005
    assert mi["mi_bits"] < 5 * mi["bias_bits"]


def test_empty_slots_are_not_counted():
    E = 3
    experts_TK = torch.tensor([[0, E], [1, 2], [E, E]])
    counts_ED = expert_domain_counts(experts_TK, torch.tensor([PROSE, CODE, CODE]), E, 2)
    assert counts_ED.sum().item() == 3
    assert counts_ED.tolist() == [[1, 0], [0, 1], [0, 1]]


def test_dead_and_overloaded_experts():
    counts_E = torch.tensor([10, 0, 50, 10, 10, 10, 5, 5])  # mean 12.5: 50 > 2 x 12.5
    assert dead_experts(counts_E) == [1]
    assert overloaded_experts(counts_E) == [2]
    assert overloaded_experts(torch.tensor([3, 3, 3])) == [] and dead_experts(torch.tensor([3, 3, 3])) == []
    assert overloaded_experts(torch.zeros(4, dtype=torch.int64)) == []


def test_top_tokens_ordering_by_count_and_lift():
    # expert 0: token 5 x6, token 7 x6 (tie: smaller id first), token 9 x1; expert 1: token 5 x30, token 8 x5
    tokens = [5] * 6 + [7] * 6 + [9] + [5] * 30 + [8] * 5
    experts = [0] * 13 + [1] * 35
    counts_EV = expert_token_counts(torch.tensor(experts)[:, None], torch.tensor(tokens), 2, 10)
    by_count = top_tokens_by_count(counts_EV, n=8)
    assert by_count[0] == [(5, 6), (7, 6), (9, 1)]
    assert by_count[1] == [(5, 30), (8, 5)]
    assert top_tokens_by_count(counts_EV, n=1)[0] == [(5, 6)]
    by_lift = top_tokens_by_lift(counts_EV, n=8, min_count=5, prior=0)
    # token 7 only ever goes to expert 0: plain lift = (6/13) / (6/48); token 5 is mostly expert 1's; 9 is too rare
    assert [v for v, _, _ in by_lift[0]] == [7, 5]
    assert by_lift[0][0][2] == pytest.approx((6 / 13) / (6 / 48))
    assert [v for v, _, _ in by_lift[1]] == [8, 5]
    # smoothed: 7 stays first, its lift pulled towards 1 by 5 pseudo-occurrences at expert 0's share 13/48
    r = 13 / 48
    assert top_tokens_by_lift(counts_EV, min_count=5)[0][0][2] == pytest.approx((6 + 5 * r) / (6 + 5) / r)


def _synthetic_routing():
    """K = 1, E = 4. Expert 0 takes token 10 (200 occurrences) 90% of the time and token 11 (60)
    always; token 12 (once) and token 13 (5 times) also only went to expert 0; tokens 20-29 (100
    each) are spread evenly over all four experts."""
    tokens, experts = [], []
    for v, n, to0 in ((10, 200, 180), (11, 60, 60), (12, 1, 1), (13, 5, 5)):
        tokens += [v] * n
        experts += [0] * to0 + [1 + i % 3 for i in range(n - to0)]
    for v in range(20, 30):
        tokens += [v] * 100
        experts += [i % 4 for i in range(100)]
    return torch.tensor(tokens), torch.tensor(experts)[:, None]


def test_smoothed_lift_ranks_truly_specialised_tokens_above_rare_ones():
    token_T, experts_TK = _synthetic_routing()
    counts_EV = expert_token_counts(experts_TK, token_T, 4, 30)
    # plain lift: every token only ever seen at expert 0 ties at the ceiling, 12 and 13 ahead of 10
    plain = top_tokens_by_lift(counts_EV, n=4, min_count=1, prior=0)[0]
    assert [v for v, _, _ in plain] == [11, 13, 12, 10] and plain[0][2] == plain[1][2] == plain[2][2]
    # smoothed: the frequent, truly specialised tokens first; the one seen once last; no ties
    smooth = top_tokens_by_lift(counts_EV, n=4, min_count=1)[0]
    assert [v for v, _, _ in smooth] == [11, 10, 13, 12]
    lifts = [x for _, _, x in smooth]
    assert lifts == sorted(lifts, reverse=True) and len(set(lifts)) == 4 and lifts[0] < plain[0][2]
    # the same through layer_table (token occurrences from token_T) with the default minimum count
    table = layer_table(experts_TK, token_T, torch.zeros_like(token_T), 4, ["prose"])
    assert [t["id"] for t in table["experts"][0]["top_lift"]][:3] == [11, 10, 13]
    json.dumps(table, allow_nan=False)


def test_smoothed_lift_counts_token_occurrences_with_top2():
    # K = 2: token 1 (40 occurrences) always goes to experts {0, 1}, token 2 (40) to {2, 3}, token 3 to {0, 3}
    token_T = torch.tensor([1] * 40 + [2] * 40 + [3] * 40)
    experts_TK = torch.tensor([[0, 1]] * 40 + [[2, 3]] * 40 + [[0, 3]] * 40)
    counts_EV = expert_token_counts(experts_TK, token_T, 4, 4)
    occ_V = torch.bincount(token_T, minlength=4)
    lift = {v: x for v, _, x in top_tokens_by_lift(counts_EV, min_count=1, occurrences_V=occ_V, prior=0)[0]}
    assert lift[1] == pytest.approx(1 / (80 / 120)) and lift[3] == pytest.approx(1.5)  # expert 0 takes 2/3 of tokens
    with pytest.raises(ValueError, match="prior must be >= 0"):
        top_tokens_by_lift(counts_EV, prior=-1)


def test_conditional_mi_separates_token_identity_from_context():
    g = torch.Generator().manual_seed(0)
    token_T = torch.randint(0, 4, (8000,), generator=g)
    domain_T = torch.randint(0, 2, (8000,), generator=g)
    # routing follows the token only: no domain information beyond the token
    by_token = conditional_mutual_information(token_T[:, None], domain_T, token_T, 4, 2)
    assert by_token["normalised"] < 0.01 and by_token["excess"] < 0.01
    # routing follows the domain although the token does not tell it: all of it
    by_domain = conditional_mutual_information(domain_T[:, None], domain_T, token_T, 2, 2)
    assert by_domain["normalised"] == pytest.approx(1.0, abs=0.01)
    assert by_domain["null_normalised"] < 0.01 and by_domain["excess"] > 0.98
    # a domain the token determines leaves nothing to measure
    assert conditional_mutual_information(token_T[:, None], token_T % 2, token_T, 4, 2)["normalised"] is None


def test_permute_within_groups_keeps_each_groups_values():
    g = torch.Generator().manual_seed(0)
    groups_T = torch.tensor([3, 1, 3, 2, 1, 3, 2, 1, 3, 1])
    values_T = torch.arange(10)
    out = permute_within_groups(values_T, groups_T, g)
    for grp in (1, 2, 3):
        assert sorted(out[groups_T == grp].tolist()) == sorted(values_T[groups_T == grp].tolist())
    assert out.tolist() != values_T.tolist()


def test_layer_table_is_json_ready_and_reading_follows_the_numbers():
    E = 4
    domain_T = torch.tensor([CODE, PROSE] * 50)
    token_T = torch.arange(100) % 7
    special_TK = torch.where(domain_T == CODE, 0, 1)[:, None]  # expert 0 code, 1 prose, 2 and 3 dead
    table = {
        "layer": 3,
        **layer_table(
            special_TK, token_T, domain_T, E, DOMAINS, torch.full((100,), 0.5), token_str=lambda i: f"<t{i}>"
        ),
    }
    json.dumps(table, allow_nan=False)
    assert table["dead"] == [2, 3] and table["overloaded"] == []
    assert table["experts"][2]["domain_share"] == {"prose": None, "code": None}
    assert table["experts"][0]["specialisation"]["code"] == pytest.approx(2.0)
    assert table["mi"]["normalised"] == pytest.approx(1.0)
    assert table["routing_entropy_normalised"] == pytest.approx(0.5 / math.log(E))
    text = layer_reading(table, DOMAINS)
    assert (
        "clear domain preference" in text
        and "expert 0 takes 100% code" in text
        and "experts 2 and 3 received no token" in text
    )

    mixed_TK = (torch.arange(100) // 2 % 2)[:, None]  # each expert sees both domains equally
    table = {"layer": 0, **layer_table(mixed_TK, token_T, domain_T, E, DOMAINS)}
    assert table["mi"]["normalised"] == pytest.approx(0.0, abs=1e-9)
    assert "no clear specialisation" in layer_reading(table, DOMAINS)


def test_text_table_columns_align_with_long_dead_lists():
    E = 64
    domain_T = torch.tensor([CODE, PROSE] * 100)
    token_T = torch.arange(200) % 11
    few_TK = torch.where(domain_T == CODE, 0, 1)[:, None]  # experts 2..63 dead
    many_TK = (torch.arange(200) % E)[:, None]  # every expert used
    layers = [
        {"layer": 0, **layer_table(few_TK, token_T, domain_T, E, DOMAINS, torch.full((200,), 0.2))},
        {"layer": 1, **layer_table(many_TK, token_T, domain_T, E, DOMAINS, torch.full((200,), 4.0))},
    ]
    layers[1]["overloaded"] = list(range(0, 60, 2))  # a long overloaded list as well
    rep = {
        "run": "synthetic",
        "tokens": 200,
        "windows": 4,
        "seq_len": 50,
        "top_k": 1,
        "config": {"num_experts": E},
        "base_rate": {"prose": 0.5, "code": 0.5},
        "domains": DOMAINS,
        "layers": layers,
    }
    head, *rows = text_table(rep).splitlines()[2:5]
    assert len(rows) == 2 and all(len(r) <= len(head) + 24 for r in rows)
    for name in ("most prose-leaning", "most code-leaning", "dead", "overloaded"):  # left-aligned columns
        at = head.index(name)
        for r in rows:
            assert r[at - 1] == " " and r[at] != " ", f"column {name!r} misaligned in {r!r}"
    assert "2,3,4" in rows[0] and "more" in rows[0] and "+" in rows[0]
    assert id_list(list(range(2, 64))) == "2,3,4,5,6 +57 more" and id_list([]) == "-" and id_list([3, 7]) == "3,7"
    assert len(id_list(list(range(100, 140)))) <= 18


def test_show_token_is_visible_and_escaped():
    assert show_token("<b>&") == "&lt;b&gt;&amp;"
    assert show_token(" x\n\t\x01") == "␣x\\n\\t\\x01"


# ---------------------------------------------------------------------------------------------- on a real run
def test_collect_routing_records_every_layer(runs, cache_env):
    from moekit.data import build_data
    from moekit.generate import load_run_model
    from moekit.runs import load_run_config

    _, train_cfg, _ = load_run_config(runs["moe"])
    model, tok = load_run_model(str(runs["moe"]), "moe")
    data = build_data(train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok)
    r = collect_routing(model, data, windows=5, seq_len=16, batch_size=2, top_k=1)
    T = 5 * 16
    assert r.layers == [0, 1] and r.num_experts == [8, 8] and r.windows == 5 and r.top_k == 1
    assert r.token_T.shape == (T,) and r.domain_T.shape == (T,)
    assert all(e.shape == (T, 1) for e in r.experts) and all(h.shape == (T,) for h in r.entropy)
    assert set(r.domain_T.tolist()) <= {0, 1} and r.domains == ["prose", "code"]
    assert r.token_T[:16].tolist() == data.val_ids_N[:16].tolist()  # the first window starts the stream
    assert all(not b.ffn.router._forward_hooks for b in model.blocks)  # hooks removed
    assert all(0 <= float(h.max()) <= math.log(8) + 1e-6 for h in r.entropy)
    tables = routing_table(r, token_str=tok.token_str)
    assert [sum(x["tokens"] for x in t["experts"]) for t in tables] == [T, T]


def test_inspect_run_writes_the_report(report, runs):
    out = runs["moe"] / "inspect"
    for png in ("domain_heatmap.png", "load_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "report.json").read_text())
    K = saved["config"]["top_k"]
    assert saved["windows"] == WINDOWS and saved["seq_len"] == SEQ_LEN and saved["top_k"] == K == 2
    assert [layer["layer"] for layer in saved["layers"]] == [0, 1]  # one entry per MoE layer
    for layer in saved["layers"]:
        assert sum(x["tokens"] for x in layer["experts"]) == WINDOWS * SEQ_LEN * K  # no capacity: nothing dropped
        assert sum(x["share"] for x in layer["experts"]) == pytest.approx(1.0)
        assert 0.0 <= layer["mi"]["normalised"] <= 1.0
    assert saved["config"]["params"]["total"] > saved["config"]["params"]["active"] > 0
    assert saved["reading"][0].startswith("Measured on") and saved["reading"][2].startswith("layer 1:")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert "layer 0" in page and "specialisation" in page


def _run_table(page: str) -> str:
    return page[page.index("<h2>Run</h2>") : page.index("<h2>Layers</h2>")]


def test_html_reading_has_one_paragraph_per_layer(report, runs):
    page = (runs["moe"] / "inspect" / "report.html").read_text()
    block = page[page.index("<div class=reading>") :]
    block = block[: block.index("</div>")]
    paragraphs = re.findall(r"<p>(.*?)</p>", block)
    assert len(paragraphs) == 1 + len(report["layers"])
    assert paragraphs[0].startswith("Measured on")
    assert [p.split(":")[0] for p in paragraphs[1:]] == [f"layer {layer['layer']}" for layer in report["layers"]]


def test_html_names_an_absent_capacity_factor_dropless(report, runs):
    assert report["config"]["capacity_factor"] is None
    table = _run_table((runs["moe"] / "inspect" / "report.html").read_text())
    assert "None" not in table
    assert "none (dropless), in training and evaluation" in table
    assert capacity_text("topk", 2, 1.25, None) == "1.25, in training and evaluation"
    assert capacity_text("switch", 1, 1.25, 2.0) == "1.25 in training, 2 in evaluation"
    assert capacity_text("topk", 2, None, 2.0) == "none (dropless) in training, 2 in evaluation"
    assert capacity_text("expert_choice", 2, None, None).startswith("2 (top-k, expert choice)")


def test_stopped_run_reports_the_steps_actually_trained(runs, cache_env, tmp_path):
    rep = inspect_run(runs["stopped"], out_dir=tmp_path, windows=2, quiet=True)
    assert rep["config"]["steps"] == 10 and rep["config"]["target_steps"] == 30
    table = _run_table((tmp_path / "report.html").read_text())
    assert "10 of 30 steps (stopped early" in table and "<td class=l>30 steps" not in table
    assert trained_steps(runs["moe"] / "moe") == 20  # a finished run: all its steps


def test_inspect_run_out_dir_and_stdout(runs, cache_env, tmp_path, capsys):
    rep = inspect_run(runs["moe"], out_dir=tmp_path / "elsewhere", windows=2, top_k=1)
    assert (tmp_path / "elsewhere" / "report.html").is_file()
    assert all(sum(x["tokens"] for x in layer["experts"]) == 2 * SEQ_LEN for layer in rep["layers"])
    printed = capsys.readouterr().out
    assert "MI bits" in printed and "most code-leaning" in printed


def test_cli_inspect_smoke(runs, cache_env, tmp_path, capsys):
    assert main(["inspect", "--run", str(runs["moe"]), "--windows", "2", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.json").is_file()
    assert "layer" in capsys.readouterr().out


def test_cli_inspect_dense_only_run_is_a_one_line_error(runs, cache_env, capsys):
    assert main(["inspect", "--run", str(runs["dense"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs a MoE run" in err
    with pytest.raises(ValueError, match="needs a MoE run"):
        inspect_run(runs["dense"])


def _val_tokens(run) -> int:
    from moekit.data import build_data, load_tokenizer
    from moekit.runs import load_run_config

    _, train_cfg, _ = load_run_config(run)
    tok = load_tokenizer(run / "tokenizer.json")
    return build_data(
        train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok
    ).val_ids_N.numel()


def test_windows_beyond_the_validation_split_are_capped_with_a_note(runs, cache_env, tmp_path, capsys):
    most = available_windows(_val_tokens(runs["moe"]), SEQ_LEN)
    assert most == (_val_tokens(runs["moe"]) - 1) // SEQ_LEN
    rep = inspect_run(runs["moe"], out_dir=tmp_path, windows=most + 40)
    assert rep["windows"] == most and rep["windows_requested"] == most + 40
    assert rep["tokens"] == most * SEQ_LEN
    err = capsys.readouterr().err
    assert f"windows {most + 40} is more than the validation split holds" in err and f"all {most} " in err


def test_collect_routing_refuses_more_windows_than_the_split_holds(runs, cache_env):
    from moekit.data import build_data
    from moekit.generate import load_run_model
    from moekit.runs import load_run_config

    _, train_cfg, _ = load_run_config(runs["moe"])
    model, tok = load_run_model(str(runs["moe"]), "moe")
    data = build_data(train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok)
    most = available_windows(data.val_ids_N.numel(), 16)
    with pytest.raises(ValueError, match=f"windows must be at most {most} .*got {most + 1}$"):
        collect_routing(model, data, windows=most + 1, seq_len=16, batch_size=2)


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_cli_inspect_non_positive_windows_is_a_one_line_error(runs, cache_env, capsys, bad):
    assert main(["inspect", "--run", str(runs["moe"]), "--windows", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"windows must be a positive integer; got {bad}" in err


def test_missing_run_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        inspect_run(missing)
    assert main(["inspect", "--run", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
