"""`moekit generate` reports its decoding speed on stderr, one line after the text; stdout holds the
text alone. ``generate_text`` hands the same numbers to an ``on_stats`` callback and still returns
the text (its existing callers are unchanged)."""

import re
import time

import pytest

from moekit.cli import main
from moekit.generate import GenerationStats, generate_text
from tiny_run import tiny_args

TINY = tiny_args(2, 2, 2, 16, 32, 1, 30000, 4, 16, 32, "--no-baseline")
LINE = re.compile(r"moekit generate: (\d+) tokens? in (\d+\.\d\d) s \((\d+) tokens/s, KV cache (on|off)\)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEKIT_CACHE", str(out / "cache"))
    assert main(["train", "--out", str(out), "--name", "g", *TINY]) == 0
    yield str(out / "g")
    mp.undo()


def check_line(err: str, new_tokens: int, cache: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    m = LINE.fullmatch(err.rstrip("\n"))
    assert m, f"not the speed line: {err!r}"
    n, secs, rate, on = int(m[1]), float(m[2]), int(m[3]), m[4]
    assert (n, on) == (new_tokens, cache)
    # the rate agrees with the printed (rounded) seconds
    assert n / (secs + 0.005) <= rate + 0.5
    if secs > 0.005:
        assert rate - 0.5 <= n / (secs - 0.005)


@pytest.mark.parametrize("no_cache", [False, True], ids=["cache", "no-cache"])
def test_speed_line_on_stderr_and_only_the_text_on_stdout(run, capsys, no_cache):
    capsys.readouterr()
    argv = ["generate", "--run", run, "--prompt", "def ", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(argv + (["--no-cache"] if no_cache else [])) == 0
    out, err = capsys.readouterr()
    text = generate_text(run, "def ", max_new_tokens=20, temperature=0, use_cache=not no_cache)
    assert out == text + "\n", "stdout must hold the text and nothing else"
    check_line(err, 20, "off" if no_cache else "on")


def test_generate_text_reports_its_decoding_time(run):
    """The callback gets the tokens actually generated (capped by the context) and a time no longer
    than the whole call's; the return value is still the text."""
    got = []
    t0 = time.perf_counter()
    text = generate_text(run, "def ", max_new_tokens=1000, temperature=0, on_stats=got.append)
    wall = time.perf_counter() - t0
    assert isinstance(text, str) and text.startswith("def ")
    assert len(got) == 1 and isinstance(got[0], GenerationStats)
    s = got[0]
    assert s.prompt_tokens == 4 and s.new_tokens == 32 - 4, "capped by max_seq_len=32"
    assert s.use_cache and 0 < s.seconds <= wall
    assert s.tokens_per_s == pytest.approx(s.new_tokens / s.seconds)
    assert generate_text(run, "def ", max_new_tokens=1000, temperature=0) == text, "the callback changes nothing"


def test_zero_new_tokens_line(run, capsys):
    capsys.readouterr()
    assert main(["generate", "--run", run, "--prompt", "x", "--max-new-tokens", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == "x\n"
    assert re.fullmatch(r"moekit generate: 0 tokens in \d+\.\d\d s \(no tokens, KV cache on\)\n", err), err
