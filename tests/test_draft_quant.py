"""The draft's weights as a Q4_0 copy (duo.draft_quant): made once, cached, chosen by measurement, lossless."""
import pytest

from duo import Engine
from duo.draft_quant import MIN_BYTES, prepare, q4_0_share, resolve_draft
from duo.errors import DuoError, UsageError
from duo.models import DraftRef

from test_exactness import PROMPTS, greedy_runs


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_CACHE", str(tmp_path))
    return tmp_path


def test_a_q4_0_copy_is_made_once_and_cached(tiny_pair_q, own_cache):
    src = tiny_pair_q.target_gguf                       # float32 weights, 256-wide rows: Q4_0 fits
    ref = DraftRef("tiny", src)
    got = prepare(ref, "q4_0", progress=False)
    assert got.weights == "Q4_0 copy" and got.name == "tiny"
    assert got.gguf.parent == own_cache / "drafts" and got.gguf != src
    assert q4_0_share(src) == 0.0 and q4_0_share(got.gguf) > 0.5
    made = got.gguf.stat().st_mtime_ns
    again = prepare(ref, "q4_0", progress=False)
    assert again.gguf == got.gguf and again.gguf.stat().st_mtime_ns == made     # not made twice
    assert not list((own_cache / "drafts").glob("*.partial"))


def test_auto_keeps_a_small_draft_or_one_already_q4_0(tiny_pair, tiny_pair_q, own_cache):
    assert tiny_pair.draft_gguf.stat().st_size < MIN_BYTES
    small = DraftRef("tiny", tiny_pair.draft_gguf)
    assert prepare(small, "auto", progress=False) is small
    assert q4_0_share(tiny_pair_q.draft_gguf) > 0.5
    q = DraftRef("tiny-q", tiny_pair_q.draft_gguf)
    assert prepare(q, "auto", progress=False) is q
    assert prepare(q, "keep", progress=False) is q
    assert not (own_cache / "drafts").exists()                  # nothing was quantized


def test_a_q4_0_draft_speculates_and_the_output_is_the_targets(tiny_pair_q, own_cache):
    """The target's own weights, requantized to Q4_0, as the draft: it agrees often but not always."""
    with Engine(str(tiny_pair_q.target_hf_dir), str(tiny_pair_q.target_gguf), device="cpu", mode="sequential",
                budget=8, shape="dynamic", progress=False, draft_quant="q4_0", output_cache=0) as e:
        assert e.draft_ref.weights == "Q4_0 copy" and e.draft_ref.gguf.parent == own_cache / "drafts"
        # the draft's adapters (duo adapt) belong to its own file, whatever format runs
        assert e.draft_ref.identity == tiny_pair_q.target_gguf == e.adaptation.draft_gguf
        runs = greedy_runs(e, PROMPTS[:6], 24)
    drafted = sum(r.stats["drafted"] for r in runs)
    accepted = sum(r.stats["accepted"] - r.stats["accepted_from_lookup"] for r in runs)
    assert drafted > 0 and accepted > 0          # the Q4_0 draft's own tokens were accepted


def test_bad_settings_and_files_get_one_line_errors(tmp_path, own_cache):
    with pytest.raises(UsageError, match="--draft-quant must be one of auto, keep, q4_0"):
        resolve_draft(None, "q3", progress=False)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * (1 << 16))            # a header and nothing llama.cpp can read
    with pytest.raises(DuoError, match="use --draft-quant keep") as e:
        prepare(DraftRef("broken", broken), "q4_0", progress=False)
    assert "\n" not in str(e.value)
    assert not list((own_cache / "drafts").glob("*.gguf*"))     # no partial file left behind
