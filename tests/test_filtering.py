"""Tests for dpo.filtering: each rule on crafted pairs, overrides, NLTK data errors,
the fast tagger against NLTK's, workers, and the real HH test splits.

Run with ``-s`` to see the filter report on the real data.
"""
from __future__ import annotations

import dataclasses
import random

import pytest

from dpo import filtering
from dpo.data import PreferencePair, load_preferences, make_synthetic_pairs
from dpo.filtering import (
    RULES,
    WEAK_PHRASES,
    FilterReport,
    FilterThresholds,
    MissingNLTKDataError,
    check_pair,
    ensure_nltk_data,
    filter_pairs,
    is_strong_preference,
    noun_verb_count,
    word_tokens,
)

PROMPT = "\n\nHuman: How do I bake bread?\n\nAssistant:"
GOOD = (" To bake bread, mix flour, water, yeast and salt, knead the dough for ten minutes, "
        "then let it rise and bake it in a hot oven.")


def pair(chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(PROMPT, chosen, rejected, source="test")


PASSES = pair(GOOD, " Bread is nice.")
# one pair per rule, each passing every rule before it and failing that one
REJECTED_BY = {
    "chosen_length": pair(" Mix flour and water, then bake.", " No."),
    "weak_phrase": pair(" I\u2019m not sure, but you could mix flour, water, yeast and salt, "
                        "then knead and bake the dough.", " No."),
    "length_difference": pair(GOOD, " Buy a loaf at the shop down the road; home baking takes hours "
                                    "and the result is often worse than a good bakery."),
    "similarity": pair(GOOD, GOOD.replace("hot oven.", "hot oven, and that is really all there is to say.")),
    "stopword_ratio": pair(" Flour, water, yeast, salt, kneading, rising, baking, cooling, slicing, "
                           "serving, eating bread.", " No."),
    "content_overlap": pair(GOOD, " Oven hot, dough rise, flour water yeast salt bake bread knead minutes."),
    "nouns_verbs": pair(" Honestly, it is really quite simple and very easy, so just be patient and "
                        "careful with it, okay?", " Mix flour, yeast; knead dough; bake bread."),
}


def test_a_strong_pair_passes_every_rule():
    assert check_pair(PASSES) is None and is_strong_preference(PASSES)


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_rejects_its_pair(rule):
    assert check_pair(REJECTED_BY[rule]) == rule
    assert not is_strong_preference(REJECTED_BY[rule])


def test_rules_in_documented_order():
    assert RULES == ("chosen_length", "weak_phrase", "length_difference", "similarity",
                     "stopword_ratio", "content_overlap", "nouns_verbs")
    assert [f.name for f in dataclasses.fields(FilterThresholds)][0] == "min_chosen_chars"


def test_chosen_length_boundary():
    t = FilterThresholds()
    exactly = " " + "a" * (t.min_chosen_chars - 1) + "."  # 60 characters once stripped
    assert check_pair(pair(exactly, " No."), t) == "chosen_length"
    assert check_pair(pair(exactly + "b", " No."), t) != "chosen_length"


@pytest.mark.parametrize("text", [
    "I'M NOT SURE how, but mix flour and water and bake the dough in a hot oven for an hour.",
    "Mix flour and water; honestly I don\u2019t know the rest, but baking it in a hot oven works.",
    "I am sorry, but I think you should mix flour and water and bake the dough in a hot oven.",
    "Well, I cannot say for certain, but mix flour and water and bake the dough in a hot oven.",
])
def test_weak_phrases_case_and_curly_apostrophes(text):
    assert check_pair(pair(" " + text, " No.")) == "weak_phrase"


def test_weak_phrases_need_word_boundaries():
    text = " Flour is not surely the only way: knead, bake and cool the dough in a hot oven for an hour."
    assert check_pair(pair(text, " No.")) != "weak_phrase"
    assert "not sure" in WEAK_PHRASES and "I'm sorry, but" in WEAK_PHRASES


def test_threshold_overrides():
    short = REJECTED_BY["chosen_length"]
    assert not is_strong_preference(short)
    assert is_strong_preference(short, min_chosen_chars=10)
    assert check_pair(short, FilterThresholds(min_chosen_chars=10)) is None
    assert is_strong_preference(REJECTED_BY["weak_phrase"], weak_phrases=())
    # with a rule relaxed, a pair goes on to the next rules
    assert check_pair(REJECTED_BY["similarity"], FilterThresholds(max_similarity=1.0)) == "content_overlap"
    assert is_strong_preference(REJECTED_BY["content_overlap"], max_content_jaccard=1.0)
    assert is_strong_preference(REJECTED_BY["nouns_verbs"], min_noun_verb_margin=-10)
    assert not is_strong_preference(PASSES, min_noun_verb_margin=50)
    assert not is_strong_preference(PASSES, max_stopword_ratio=0.1)


def test_unknown_threshold_is_a_type_error():
    with pytest.raises(TypeError, match="unknown threshold 'min_chosen_char'"):
        is_strong_preference(PASSES, min_chosen_char=10)


def test_word_tokens_treebank_like():
    assert word_tokens('He said "I can\u2019t go" - I cannot. It\'s long-term, 1,000 U.S. dollars...') == [
        "He", "said", "``", "I", "ca", "n't", "go", "''", "-", "I", "can", "not", ".", "It", "'s",
        "long-term", ",", "1,000", "U.S", ".", "dollars", "..."]
    assert noun_verb_count(" Mix flour, knead dough, bake bread.") >= 5
    assert noun_verb_count("") == 0


# ---------------------------------------------------------------------------- NLTK data

def test_missing_nltk_data_is_a_clear_error(monkeypatch, tmp_path):
    import nltk

    downloads = []
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(filtering, "BUNDLED_NLTK_DATA", tmp_path / "not-bundled")  # as if deleted
    monkeypatch.setattr(nltk, "download", lambda name, **kw: downloads.append(name) or False)
    monkeypatch.setattr(filtering, "_DOWNLOAD_TRIED", set())
    for package in ("stopwords", "punkt_tab", "averaged_perceptron_tagger_eng"):
        with pytest.raises(MissingNLTKDataError, match=rf"NLTK data package '{package}'.*not even in the copy "
                                                       rf"bundled with dpo.*NLTK_DATA"
                                                       rf".*python -m nltk.downloader {package}"):
            ensure_nltk_data(package)
    with pytest.raises(LookupError):  # a LookupError, as NLTK's own
        ensure_nltk_data("stopwords")
    assert downloads == ["stopwords", "punkt_tab", "averaged_perceptron_tagger_eng"]  # once each
    # the filter raises it at first use (the stop words are loaded before anything runs)
    filtering._stopwords.cache_clear()
    try:
        with pytest.raises(MissingNLTKDataError, match="'stopwords'"):
            filter_pairs([PASSES])
    finally:
        filtering._stopwords.cache_clear()


def test_bundled_nltk_data_is_used_when_nltk_finds_none(monkeypatch, tmp_path, caplog):
    import logging

    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # NLTK's own search finds nothing
    monkeypatch.setattr(nltk, "download", lambda *a, **kw: pytest.fail("nltk.download was called"))
    with caplog.at_level(logging.DEBUG, logger="dpo.filtering"):
        for package in ("stopwords", "punkt_tab", "averaged_perceptron_tagger_eng"):
            ensure_nltk_data(package)
    assert nltk.data.path == [str(tmp_path), str(filtering.BUNDLED_NLTK_DATA)]  # appended once
    assert str(nltk.data.find("corpora/stopwords")).startswith(str(filtering.BUNDLED_NLTK_DATA))
    assert len([r for r in caplog.records if "bundled with dpo" in r.getMessage()]) == 1


def test_bundled_nltk_data_matches_its_provenance():
    """Each bundled NLTK file has the sha256 recorded in dpo/bundled/PROVENANCE.md, and only the
    English data the filter (and the tokenizer comparison below) needs is there."""
    import hashlib
    import re

    root = filtering.BUNDLED_NLTK_DATA
    provenance = (root.parent / "PROVENANCE.md").read_text()
    recorded = dict(re.findall(r"^\| `((?:corpora|tokenizers|taggers)/[^`]+)` \| `([0-9a-f]{64})` \|$",
                               provenance, re.M))
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    assert sorted(files) == sorted(recorded) and len(files) == 9
    for rel, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded[rel], rel
    assert sum(p.stat().st_size for p in files.values()) < 6_500_000


_VERDICTS = """if True:
    import json, os, sys
    import nltk
    if not os.environ.get("NLTK_DATA"):
        # as on a machine without any NLTK data: NLTK's default folders are empty or absent
        nltk.data.path[:] = [p for p in nltk.data.path if not os.path.isdir(p)]
    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download was called")
    nltk.download = no_download
    from dpo.data import bundled_hh_files, load_preferences
    from dpo import filtering
    verdicts = [filtering.check_pair(p) for p in load_preferences(bundled_hh_files())[::2]]
    print(json.dumps({"verdicts": verdicts, "stopwords": str(nltk.data.find("corpora/stopwords")),
                      "tagger": str(nltk.data.find("taggers/averaged_perceptron_tagger_eng"))}))
"""


def _verdicts_in_a_fresh_process(home, nltk_data=None) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if nltk_data is not None:
        env["NLTK_DATA"] = str(nltk_data)
    out = subprocess.run([sys.executable, "-c", _VERDICTS], cwd=home, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_filter_offline_with_no_nltk_data_set_up(tmp_path, hh_pairs):
    """A fresh process with NLTK_DATA unset and an empty HOME (no ~/nltk_data) filters real HH
    pairs with the bundled data, without downloading; with NLTK_DATA set (to a copy elsewhere),
    NLTK's own folder is used, to the same verdicts."""
    import shutil

    bundled = _verdicts_in_a_fresh_process(tmp_path)
    root = str(filtering.BUNDLED_NLTK_DATA)
    assert bundled["stopwords"].startswith(root) and bundled["tagger"].startswith(root)
    assert len(bundled["verdicts"]) == len(hh_pairs[::2]) > 2000
    assert sum(v is None for v in bundled["verdicts"]) > 500  # kept pairs, and every rule at work:
    assert set(bundled["verdicts"]) == {None, *RULES}
    users = tmp_path / "users_nltk_data"
    shutil.copytree(filtering.BUNDLED_NLTK_DATA, users)
    own = _verdicts_in_a_fresh_process(tmp_path, nltk_data=users)
    assert own["stopwords"].startswith(str(users)) and own["tagger"].startswith(str(users))
    assert bundled["verdicts"] == own["verdicts"]


def test_nltk_data_is_not_loaded_at_import():
    import subprocess
    import sys

    code = ("import dpo.filtering as f; assert f._stopwords.cache_info().currsize == 0;"
            "assert f._tagger.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- the set filter

def test_filter_pairs_report_and_order():
    pairs = [PASSES, *REJECTED_BY.values(), PASSES]
    kept, report = filter_pairs(pairs)
    assert kept == [PASSES, PASSES]
    assert (report.total, report.kept) == (len(pairs), 2)
    assert list(report.rejected) == list(RULES) and all(n == 1 for n in report.rejected.values())
    text = str(report)
    assert "kept 2 of 9 pairs" in text and "pairs/s" in text
    assert all(rule in text for rule in RULES) and text == report.format()


def test_filter_pairs_limit():
    pairs = [REJECTED_BY["chosen_length"], PASSES, REJECTED_BY["weak_phrase"], PASSES, PASSES]
    kept, report = filter_pairs(pairs, limit=2, progress=True)
    assert kept == [PASSES, PASSES] and (report.total, report.kept) == (4, 2)
    assert report.rejected["chosen_length"] == 1 and report.rejected["weak_phrase"] == 1


def test_synthetic_pairs_are_not_strong():
    """Synthetic chosen/rejected share their shape and length by design (so an untrained model
    prefers either half the time): exactly what the length-difference rule screens out."""
    kept, report = filter_pairs(make_synthetic_pairs(100))
    assert report.kept < 10 and report.rejected["length_difference"] > 80, report


@pytest.fixture(scope="module")
def hh_pairs(hh_files):
    return load_preferences(hh_files)


def test_workers_give_identical_results(hh_pairs):
    pairs = random.Random(0).sample(hh_pairs, 600) + [PASSES, *REJECTED_BY.values()]
    one = filter_pairs(pairs, chunk_size=50)
    two = filter_pairs(pairs, num_workers=2, chunk_size=50)
    assert one[0] == two[0] and one[1].rejected == two[1].rejected and one[1].total == two[1].total
    one = filter_pairs(pairs, limit=40, chunk_size=50)
    two = filter_pairs(pairs, limit=40, num_workers=2, chunk_size=50)
    assert one[0] == two[0] and one[1].rejected == two[1].rejected and one[1].total == two[1].total
    assert len(one[0]) == 40 and one[1].total < len(pairs)


def test_fast_tagger_matches_nltk(hh_pairs):
    nltk_tagger, fast = filtering._nltk_tagger(), filtering._tagger()
    for p in random.Random(1).sample(hh_pairs, 150):
        for text in (p.chosen, p.rejected):
            tokens = word_tokens(text)
            assert fast.tags(tokens) == [tag for _, tag in nltk_tagger.tag(tokens)]


def test_regex_tokens_agree_with_word_tokenize(hh_pairs):
    import nltk

    ensure_nltk_data("punkt_tab")
    count = lambda tokens: sum(t.startswith(("NN", "VB")) for t in filtering._tagger().tags(tokens))
    straight = lambda s: s.strip().translate(filtering._APOSTROPHES)
    sample = random.Random(2).sample(hh_pairs, 300)
    agree = sum(
        (count(word_tokens(p.chosen)) > count(word_tokens(p.rejected)))
        == (count(nltk.word_tokenize(straight(p.chosen))) > count(nltk.word_tokenize(straight(p.rejected))))
        for p in sample)
    assert agree / len(sample) >= 0.98


def test_real_hh_filter(hh_pairs):
    kept, report = filter_pairs(hh_pairs, progress=False)
    print("\n" + report.format())
    assert report.total == len(hh_pairs) == 4642
    assert 1000 <= report.kept <= 2500 and report.kept == len(kept)
    assert report.kept + sum(report.rejected.values()) == report.total
    assert all(report.rejected[r] > 0 for r in RULES)
    assert all(check_pair(p) is None for p in kept[:50])
    assert isinstance(report, FilterReport) and report.pairs_per_s > 0


def test_only_some_rules_switches_the_others_off():
    from dpo.filtering import RULES, FilterThresholds, check_pair

    assert FilterThresholds.only(RULES) == FilterThresholds()
    refusal = PreferencePair("\n\nHuman: How do I pick a lock?\n\nAssistant:",
                             " I'm sorry, but I can't help: call a licensed locksmith.",
                             " Sure! Insert a tension wrench into the bottom of the keyhole, then rake the pins "
                             "with a pick until each one sets and the cylinder turns.")
    assert check_pair(refusal) == "chosen_length"  # the assignment's filter never keeps a short refusal
    neutral = FilterThresholds.only(["length_difference", "similarity", "stopword_ratio", "content_overlap"])
    assert check_pair(refusal, neutral) is None
    assert check_pair(refusal, FilterThresholds.only(["weak_phrase"])) == "weak_phrase"
    with pytest.raises(ValueError, match="unknown filter rules"):
        FilterThresholds.only(["length"])
