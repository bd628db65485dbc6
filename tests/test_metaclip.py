"""MetaCLIP curation (cliplab.curation.metaclip): the matcher, the balancing formula, and its effect."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

pytest.importorskip("ahocorasick", reason="metadata matching needs pyahocorasick: pip install 'cliplab[curate]'")

from cliplab.curation import metaclip  # noqa: E402
from cliplab.curation.matcher import (SubstringMatcher, build_metadata, entry_counts, inverted_index,  # noqa: E402
                                      spacing)
from cliplab.curation.metaclip import (balance, balance_loop, curate, entry_entropy,  # noqa: E402
                                       entry_probabilities, keep_probability)

from conftest import shared_path  # noqa: E402

STEPS = 70  # per arm; experiments/curation_metaclip.py runs 300 steps on a larger pool


# --- matcher -----------------------------------------------------------------------------------------------------------
def test_spacing_wraps_punctuation_and_pads():
    assert spacing("A cat.") == " A cat .  "
    assert spacing("cat,dog\tbird\n") == " cat , dog bird  "
    assert spacing("`hi`!") == "  ` hi `  !  "  # "!" is wrapped before "`", as in the official order


@pytest.mark.parametrize("text,hit", [("A cat.", True), ("cat, dog", True), ("category", False), ("concat", False),
                                      ("the cat's toy", False), ("cats", False), ("cat", True), ("a\tcat\nsat", True),
                                      ("Cat on a mat", False)])
def test_whole_word_matching(text, hit):
    m = SubstringMatcher(["cat"])
    assert (m.match(text) == [0]) is hit


def test_multi_word_entries_match_across_punctuation_spacing_and_overlap():
    m = SubstringMatcher(["golden gate", "gate", "golden", "bridge"])
    assert [m.entries[i] for i in m.match("the golden gate, at dusk")] == ["golden gate", "gate", "golden"]
    assert [m.entries[i] for i in m.match("golden gate bridge")] == ["golden gate", "gate", "golden", "bridge"]
    assert m.match("goldengate") == []


def test_case_and_lowercase_option():
    assert SubstringMatcher(["Paris"]).match("paris at night") == []
    assert SubstringMatcher(["Paris"], lowercase=True).match("PARIS at night") == [0]


def test_duplicate_or_padded_entries_are_errors():
    with pytest.raises(ValueError, match="appears twice"):
        SubstringMatcher(["dog", "cat", "dog"])
    with pytest.raises(ValueError, match="outer spaces"):
        SubstringMatcher([" dog"])


def test_matcher_equals_brute_force_substring_search():
    rng = np.random.default_rng(0)
    vocab = ["dog", "cat", "red", "ball", "red ball", "the", "a", "dog park", "park", "ca", "og"]
    punct = [",", ".", "!", "", "", ""]
    texts = [" ".join(rng.choice(vocab) + rng.choice(punct) for _ in range(rng.integers(1, 8))) for _ in range(300)]
    entries = ["dog", "cat", "red ball", "ball", "park", "dog park", "og", "a"]
    m = SubstringMatcher(entries)
    for text in texts:
        brute = [i for i, e in enumerate(entries) if f" {e} " in spacing(text)]
        assert m.match(text) == brute, text


def test_inverted_index_and_counts():
    matches = [[0, 2], [], [2], [1, 2]]
    ids, offsets = inverted_index(matches)
    assert ids.tolist() == [0, 2, 2, 1, 2] and offsets.tolist() == [0, 0, 2, 3, 3]
    assert entry_counts(matches, 4).tolist() == [1, 1, 3, 0]


def test_build_metadata_thresholds_and_pmi():
    texts = ["new york city"] * 6 + ["a dog in new shoes"] * 6 + ["york"] + ["the dog runs"] * 2
    entries = build_metadata(texts, min_count=5, bigram_min_count=5, min_pmi=0.5, extra=["zebra"])
    assert "dog" in entries and "new" in entries and "york" in entries and "zebra" in entries
    assert "runs" not in entries and "the" not in entries and "a" not in entries  # rare / stopwords
    uni = {"new": 12, "york": 7, "city": 6, "a": 6, "dog": 8, "in": 6, "shoes": 6, "the": 2, "runs": 2}
    n_uni, n_bi = sum(uni.values()), 6 * 2 + 6 * 4 + 2 * 2
    pmi = math.log((6 / n_bi) / ((12 / n_uni) * (7 / n_uni)))
    assert ("new york" in entries) == (pmi >= 0.5)
    assert ("new york" in build_metadata(texts, min_pmi=pmi + 1e-9)) is False
    assert ("new york" in build_metadata(texts, min_pmi=pmi - 1e-9)) is True


# --- balancing ---------------------------------------------------------------------------------------------------------
def test_entry_probabilities_closed_form():
    p = entry_probabilities(np.array([0, 5, 10, 40, 1000]), t=10)
    assert np.allclose(p, [1, 1, 1, 0.25, 0.01])
    with pytest.raises(ValueError):
        entry_probabilities(np.array([1]), t=0)


def test_vectorised_balancing_equals_the_official_loop():
    rng = np.random.default_rng(1)
    matches = [sorted(set(rng.integers(0, 20, size=rng.integers(0, 4)).tolist())) for _ in range(2000)]
    probs = rng.random(20)
    draws = rng.random(sum(len(m) for m in matches))
    assert np.array_equal(balance(matches, probs, draws=draws), balance_loop(matches, probs, draws))


def test_pair_is_kept_with_the_formula_probability():
    """Statistical check with a fixed seed: 20,000 copies of a pair matching entries with p = 0.3 and 0.5 are kept at
    1 - 0.7 * 0.5 = 0.65 (binomial 4-sigma band), pairs matching a tail entry always, unmatched pairs never."""
    probs = np.array([0.3, 0.5, 1.0])
    n = 20_000
    keep = balance([[0, 1]] * n + [[0, 2]] * 100 + [[]] * 100, probs, rng=np.random.default_rng(123))
    expected = keep_probability([0, 1], probs)
    assert expected == pytest.approx(0.65)
    rate = keep[:n].mean()
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n), rate
    assert keep[n:n + 100].all() and not keep[n + 100:].any()
    assert keep_probability([], probs) == 0.0


def test_head_entry_keeps_about_t_and_tail_entries_all():
    t = 50
    matches = [[0]] * 2000 + [[1]] * 30 + [[2]] * 50
    cur = curate(["x"] * len(matches), ["head", "tail", "edge"], t=t, seed=7, matches=matches)
    kept_head = int(cur.keep[:2000].sum())
    assert abs(kept_head - t) < 4 * math.sqrt(t * (1 - t / 2000)), kept_head
    assert cur.keep[2000:].all()
    assert cur.stats()["head_entries"] == 1 and cur.stats()["tail_entries"] == 2


def test_entropy_rises_after_balancing():
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, 31) ** 1.5
    matches = [[int(rng.choice(30, p=weights / weights.sum()))] for _ in range(5000)]
    cur = curate(["x"] * 5000, [f"e{i}" for i in range(30)], t=40, seed=0, matches=matches)
    s = cur.stats()
    assert s["entropy_after"] > s["entropy_before"] + 0.3
    assert entry_entropy(matches, 30) == pytest.approx(s["entropy_before"])


def test_curate_keywords_reach_the_core(monkeypatch):
    texts = ["A Dog runs", "a cat sits", "a dog and a cat", "dog"] * 50
    entries = ["dog", "cat"]
    base = curate(texts, entries, t=10, seed=0)
    assert curate(texts, entries, t=10, seed=0).keep.tolist() == base.keep.tolist()
    assert curate(texts, entries, t=10, seed=1).keep.tolist() != base.keep.tolist()            # seed
    assert curate(texts, entries, t=1000, seed=0).keep[[bool(m) for m in base.matches]].all()  # t
    assert curate(texts, entries, t=10, lowercase=True).counts[0] > base.counts[0]            # lowercase
    calls = []
    matcher = SubstringMatcher(entries)
    monkeypatch.setattr(matcher, "match_many", lambda ts: calls.append(len(ts)) or [[0]] * len(ts))
    assert curate(texts, entries, t=10, matcher=matcher).counts.tolist() == [200, 0] and calls == [200]  # matcher
    given = [[1]] * len(texts)
    assert curate(texts, entries, t=10, matches=given).counts.tolist() == [0, 200]                    # matches
    seen = {}
    real = metaclip.balance
    monkeypatch.setattr(metaclip, "balance", lambda m, p, rng: seen.setdefault("p", p) is not None and real(m, p, rng))
    curate(texts, entries, t=25, seed=0)
    assert np.allclose(seen["p"], entry_probabilities(base.counts, 25))


def test_flickr8k_curation_statistics():
    """Real data: the 40,455 Flickr8k captions against a metadata list built from them."""
    import csv

    path = shared_path("flickr8k-1k", "all_captions.csv")
    with open(path, encoding="utf-8") as f:
        captions = [r["caption"] for r in csv.DictReader(f)]
    assert len(captions) == 40455
    entries = build_metadata(captions, min_count=5)
    t0 = time.perf_counter()
    cur = curate(captions, entries, t=1000, seed=0, lowercase=True)
    elapsed = time.perf_counter() - t0
    s = cur.stats()
    assert s["head_entries"] > 10 and s["tail_entries"] > 1000
    assert s["entropy_after"] > s["entropy_before"]
    tail_only = [i for i, m in enumerate(cur.matches) if m and cur.counts[m].max() <= 1000]
    assert cur.keep[tail_only].all()
    assert elapsed < 60


# --- effect ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zipf_runs(tmp_path_factory):
    """One Zipfian pool; a tiny CLIP on the curated subset and one on an equal-size random subset (same steps)."""
    from cliplab.curation.evaluation import per_class_accuracy, train_on_table
    from cliplab.curation.pairs_io import write_pairs
    from cliplab.curation.pools import write_scene_pool, zipf_pool
    from cliplab.data.synthetic import zero_shot_task

    d = tmp_path_factory.mktemp("zipf")
    scenes, rows, order = zipf_pool(1500, exponent=2.2, seed=0)
    write_scene_pool(d, scenes, rows)
    captions = [r["caption"] for r in rows]
    cur = curate(captions, build_metadata(captions), t=30, seed=0, lowercase=True)
    kept = cur.kept_indices
    rnd = np.sort(np.random.default_rng(0).choice(len(rows), size=len(kept), replace=False))
    all_rows = [{"image": f"{i:06d}.png", **r} for i, r in enumerate(rows)]
    task = zero_shot_task("colour", 10, seed=1)
    tail = [task.classnames.index(c) for c in order[4:]]
    out = {"order": order, "kept": kept, "random": rnd, "rows": rows}
    for arm, idx in (("curated", kept), ("random", rnd)):
        write_pairs([all_rows[i] for i in idx], d / "images" / f"{arm}.csv")
        tr = train_on_table(d / "images" / f"{arm}.csv", d / f"run-{arm}", steps=STEPS, seed=0, versions=False)
        out["acc_" + arm] = float(per_class_accuracy(tr.model, task.images, task.labels, task.prompts)[tail].mean())
    print({k: v for k, v in out.items() if k.startswith("acc")}, len(kept))
    return out


def test_curated_subset_has_more_tail_examples(zipf_runs):
    rows, order = zipf_runs["rows"], zipf_runs["order"]
    tail = set(order[4:])
    n_cur = sum(rows[i]["colour"] in tail for i in zipf_runs["kept"])
    n_rnd = sum(rows[i]["colour"] in tail for i in zipf_runs["random"])
    assert n_cur > 1.4 * n_rnd, (n_cur, n_rnd)


def test_curated_subset_beats_random_subset_on_tail_colours(zipf_runs):
    assert zipf_runs["acc_curated"] > zipf_runs["acc_random"] + 0.15, (zipf_runs["acc_curated"], zipf_runs["acc_random"])

