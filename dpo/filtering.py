"""The "strong preference" filter: keep pairs whose chosen response is clearly better.

A pair is kept when every rule passes. The rules run cheapest first, and a pair stops at
the first rule that rejects it (``check_pair`` returns that rule's name):

  ==================  ==========================================================
  rule                rejects the pair when ...
  ==================  ==========================================================
  chosen_length       the chosen response has <= min_chosen_chars characters
  weak_phrase         the chosen response hedges ("I'm not sure", "I cannot", ...)
  length_difference   |len(chosen) - len(rejected)| < min_length_diff characters
  similarity          difflib ratio of the two word sequences > max_similarity
  stopword_ratio      the chosen stop-word ratio is outside [min, max]
  content_overlap     Jaccard overlap of content words > max_content_jaccard
  nouns_verbs         chosen has fewer than (rejected + min_noun_verb_margin) NN*/VB* tags
  ==================  ==========================================================

Only the responses are compared (the prompt is shared). Curly apostrophes are made
straight first, so "I’m not sure" is a weak phrase too.

Speed (the whole 4,642-pair HH test set filters in ~3 s on one core; the tagger dominates):

* Words come from a regex tokenizer that splits like NLTK's Treebank tokenizer
  (``don't`` -> ``do n't``, quotes as `````/``''``, punctuation apart) at ~15x the speed
  of ``nltk.word_tokenize`` and without punkt data. On the HH test pairs (apostrophes
  straightened for both) 94% of responses get identical tokens, and the noun+verb verdict
  agrees for 99.9% of pairs (tests/test_filtering.py checks >= 98% on a sample).
* POS tags come from NLTK's averaged perceptron model run by ``FastPerceptronTagger``
  (same tags as ``nltk.pos_tag``, ~5x faster), and only as far as needed: words in the
  tagger's tag dictionary bound the counts before any tagging.

NLTK data (the ``stopwords`` corpus and the ``averaged_perceptron_tagger_eng`` tagger) is
loaded once, at first use, never at import. It is looked for in this order:

1. NLTK's own search path (``NLTK_DATA``, ``~/nltk_data``, ``/usr/share/nltk_data``, ...),
   so a copy you installed always wins;
2. the English data bundled with this package, ``dpo/bundled/nltk_data`` (the stop-word
   list, the tagger and punkt_tab, ~6 MB; ``dpo/bundled/PROVENANCE.md`` says where from),
   which is appended to ``nltk.data.path``: the filter works offline with nothing set up;
3. ``nltk.download``, tried once, in case the bundled copy was removed.

If all three fail, a ``MissingNLTKDataError`` (a LookupError) says how to get the data.
"""
from __future__ import annotations

import difflib
import functools
import logging
import re
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

from dpo.data import BUNDLED_DIR, PreferencePair

log = logging.getLogger(__name__)

# Weak phrases: the chosen answer should not hedge or refuse. Matched case-insensitively
# on word boundaries, after curly apostrophes are turned into straight ones.
WEAK_PHRASES: tuple[str, ...] = (
    "I'm not sure", "I am not sure", "not sure", "I don't know", "I do not know",
    "I'm sorry, but", "I am sorry, but", "I cannot", "I can't", "I'm not able to",
    "I am not able to", "I don't understand",
)

RULES = ("chosen_length", "weak_phrase", "length_difference", "similarity",
         "stopword_ratio", "content_overlap", "nouns_verbs")


@dataclass
class FilterThresholds:
    """When a pair counts as a strong preference. Defaults keep ~35% of the HH test pairs."""

    # chosen response longer than this many characters (stripped): a real answer
    min_chosen_chars: int = 60
    # |len(chosen) - len(rejected)| (characters) at least this: the two visibly differ
    min_length_diff: int = 20
    # difflib.SequenceMatcher ratio of the lowercased word sequences at most this:
    # near-copies (the same answer with a word changed) teach nothing
    max_similarity: float = 0.4
    # stop-word share of the chosen response's words within [min, max]: below the min it
    # is a list or keyword soup, above the max it is filler ("it is what it is")
    min_stopword_ratio: float = 0.25
    max_stopword_ratio: float = 0.65
    # Jaccard overlap of content words (lowercase alphabetic, not stop words) at most this
    max_content_jaccard: float = 0.3
    # chosen NN*+VB* count >= rejected count + this (1 = strictly more): more substance
    min_noun_verb_margin: int = 1
    # the chosen response must contain none of these (see WEAK_PHRASES)
    weak_phrases: tuple[str, ...] = WEAK_PHRASES

    @classmethod
    def only(cls, rules: Iterable[str]) -> "FilterThresholds":
        """The default thresholds with every rule not in `rules` switched off (it passes every pair).

        Three of the seven rules favour long chosen answers that do not decline: chosen_length,
        weak_phrase ("I'm sorry, but", "I can't" are weak phrases) and nouns_verbs. Without them
        the filter keeps pairs whose answers clearly differ, whichever is the longer one.
        """
        rules = set(rules)
        unknown = sorted(rules - set(RULES))
        if unknown:
            raise ValueError(f"unknown filter rules {unknown}; the rules are {', '.join(RULES)}")
        off = {"chosen_length": dict(min_chosen_chars=-1), "weak_phrase": dict(weak_phrases=()),
               "length_difference": dict(min_length_diff=0), "similarity": dict(max_similarity=1.0),
               "stopword_ratio": dict(min_stopword_ratio=0.0, max_stopword_ratio=1.0),
               "content_overlap": dict(max_content_jaccard=1.0),
               "nouns_verbs": dict(min_noun_verb_margin=-(10 ** 9))}
        changes = {k: v for rule in RULES if rule not in rules for k, v in off[rule].items()}
        return cls(**changes)


# ---------------------------------------------------------------------------- NLTK data

class MissingNLTKDataError(LookupError):
    """An NLTK data package is not installed and could not be downloaded."""


# package -> resource path that nltk.data.find looks up
NLTK_RESOURCES = {
    "stopwords": "corpora/stopwords",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng",
    "punkt_tab": "tokenizers/punkt_tab/english",
}


# English NLTK data shipped with the package, in NLTK's own layout (corpora/, taggers/, tokenizers/)
BUNDLED_NLTK_DATA: Path = BUNDLED_DIR / "nltk_data"

_DOWNLOAD_TRIED: set[str] = set()  # packages nltk.download was already tried for


def _found(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def ensure_nltk_data(package: str) -> None:
    """Make sure an NLTK data package is available: find it on NLTK's search path, else
    in the bundled copy (appending BUNDLED_NLTK_DATA to ``nltk.data.path``), else try
    nltk.download once (per package and process), else raise MissingNLTKDataError."""
    import nltk

    resource = NLTK_RESOURCES[package]
    if _found(resource):
        return
    bundled = str(BUNDLED_NLTK_DATA)
    if (BUNDLED_NLTK_DATA / resource).exists() and bundled not in nltk.data.path:
        nltk.data.path.append(bundled)
        if _found(resource):
            log.debug("NLTK data %r is not on NLTK's search path; using the copy bundled with dpo (%s)",
                      package, bundled)
            return
    if package not in _DOWNLOAD_TRIED:
        _DOWNLOAD_TRIED.add(package)
        try:
            nltk.download(package, quiet=True)
        except Exception:  # offline, proxy errors, ...: reported as missing below
            pass
    if not _found(resource):
        raise MissingNLTKDataError(
            f"NLTK data package {package!r} ({resource}) was not found, not even in the copy "
            f"bundled with dpo ({BUNDLED_NLTK_DATA}), and could not be downloaded. Set NLTK_DATA "
            f"to a directory that has it or run `python -m nltk.downloader {package}`."
            f" Searched: {list(nltk.data.path)}")


@functools.lru_cache(maxsize=None)
def _stopwords() -> frozenset[str]:
    ensure_nltk_data("stopwords")
    from nltk.corpus import stopwords

    return frozenset(stopwords.words("english"))


class FastPerceptronTagger:
    """NLTK's averaged perceptron POS tagger, with its weights in one dense matrix.

    NLTK scores an unknown word with a Python loop over a dict of dicts, which made the
    tagger ~90% of the filter's time. Here the 14 feature rows are gathered from a
    (features, 45 classes) float64 matrix and summed by numpy, in the same order, so the
    tags are identical to ``PerceptronTagger.tag`` (tests check it on real data) at ~5x
    the speed. Words in the tagger's tag dictionary are looked up, as in NLTK.
    """

    def __init__(self, tagger):
        import numpy as np

        weights = tagger.model.weights  # feature -> {class: weight}
        # descending class names: argmax takes the first maximum, i.e. the largest name,
        # as NLTK's max(classes, key=(score, class)) does
        self.classes = sorted(tagger.model.classes, reverse=True)
        column = {c: j for j, c in enumerate(self.classes)}
        self.row = {feature: i for i, feature in enumerate(weights)}
        self.weights = np.zeros((len(weights), len(self.classes)))  # (F, C)
        for feature, i in self.row.items():
            for c, w in weights[feature].items():
                self.weights[i, column[c]] = w
        self.tagdict, self.normalize = tagger.tagdict, tagger.normalize
        self.start, self.end = list(tagger.START), list(tagger.END)

    def tags(self, tokens: Sequence[str]) -> list[str]:
        """POS tags of one token sequence (as PerceptronTagger.tag, without the words)."""
        row, W, classes, tagdict = self.row.get, self.weights, self.classes, self.tagdict
        context = self.start + [self.normalize(w) for w in tokens] + self.end
        prev, prev2 = self.start
        bias = row("bias")
        out = []
        for i, word in enumerate(tokens):
            tag = tagdict.get(word)
            if not tag:  # the same features as PerceptronTagger._get_features, in order
                c2, c1, cw, n1, n2 = context[i:i + 5]
                rows = [r for r in (
                    bias, row("i suffix " + word[-3:]), row("i pref1 " + word[:1]),
                    row("i-1 tag " + prev), row("i-2 tag " + prev2),
                    row("i tag+i-2 tag " + prev + " " + prev2), row("i word " + cw),
                    row("i-1 tag+i word " + prev + " " + cw), row("i-1 word " + c1),
                    row("i-1 suffix " + c1[-3:]), row("i-2 word " + c2), row("i+1 word " + n1),
                    row("i+1 suffix " + n1[-3:]), row("i+2 word " + n2)) if r is not None]
                tag = classes[W[rows].sum(0).argmax()]
            out.append(tag)
            prev2, prev = prev, tag
        return out


@functools.lru_cache(maxsize=None)
def _nltk_tagger():
    ensure_nltk_data("averaged_perceptron_tagger_eng")
    from nltk.tag.perceptron import PerceptronTagger

    return PerceptronTagger(lang="eng")


@functools.lru_cache(maxsize=None)
def _tagger() -> FastPerceptronTagger:
    return FastPerceptronTagger(_nltk_tagger())


# ---------------------------------------------------------------------------- text helpers

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# Treebank-like tokens, in order of preference: "don't" -> "do" "n't"; "I'm" -> "I" "'m";
# "cannot" -> "can" "not"; quotes as `` and ''; words with inner hyphens, slashes, dots or
# commas kept whole ("long-term", "1,000", "U.S"); "..." and "--"; other single marks.
_TOKEN_RE = re.compile(
    r"\w+(?=n't\b)|n't\b|``|''|'(?:s|m|d|ll|re|ve)\b|\bcan(?=not\b)"
    r"|\w+(?:[-/.,]\w+)*|\.\.\.|--|[^\w\s]", re.IGNORECASE)
_OPEN_QUOTE_RE = re.compile(r'(^|[\s(\[{<])"')


def _normalize(text: str) -> str:
    """Straight apostrophes, and double quotes as Treebank's `` (opening) and '' (closing)."""
    text = text.translate(_APOSTROPHES)
    if '"' in text:
        text = _OPEN_QUOTE_RE.sub(r"\1``", text).replace('"', "''")
    return text


def word_tokens(text: str) -> list[str]:
    """Split text into Treebank-style tokens (a fast regex stand-in for nltk.word_tokenize)."""
    return _TOKEN_RE.findall(_normalize(text))


_ALPHA_RE = re.compile(r"[a-z]+")


def _words(normalized_lower: str) -> list[str]:
    """Alphabetic words ("don't" -> "don", "t", both stop words), for the stop-word and
    overlap rules; the text is already _normalize()d and lowercased."""
    return _ALPHA_RE.findall(normalized_lower)


@functools.lru_cache(maxsize=64)
def _weak_regex(phrases: tuple[str, ...]) -> re.Pattern:
    alts = "|".join(re.escape(p.translate(_APOSTROPHES).lower()) for p in phrases)
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)")


_NOUN_VERB = ("NN", "VB")


def noun_verb_count(text: str) -> int:
    """Number of tokens the perceptron tagger tags NN* or VB*."""
    return sum(tag.startswith(_NOUN_VERB) for tag in _tagger().tags(word_tokens(text)))


def _noun_verb_bounds(tokens: list[str]) -> tuple[int, int]:
    """(low, high) bounds of the NN*/VB* count without tagging: words in the tag
    dictionary always get their dictionary tag; any other token may or may not be one."""
    tagdict = _tagger().tagdict
    low = unknown = 0
    for w in tokens:
        tag = tagdict.get(w)
        if tag:
            low += tag.startswith(_NOUN_VERB)
        else:
            unknown += 1
    return low, low + unknown


def _more_nouns_verbs(chosen: str, rejected: str, margin: int) -> bool:
    """noun_verb_count(chosen) >= noun_verb_count(rejected) + margin, tagging only as much
    as needed: the dictionary bounds often decide, else tag chosen, then rejected.
    Both texts are already _normalize()d."""
    ct, rt = _TOKEN_RE.findall(chosen), _TOKEN_RE.findall(rejected)
    (c_lo, c_hi), (r_lo, r_hi) = _noun_verb_bounds(ct), _noun_verb_bounds(rt)
    if c_lo >= r_hi + margin:
        return True
    if c_hi < r_lo + margin:
        return False
    tag = _tagger().tags
    c = sum(t.startswith(_NOUN_VERB) for t in tag(ct))
    if c >= r_hi + margin:
        return True
    if c < r_lo + margin:
        return False
    return c >= sum(t.startswith(_NOUN_VERB) for t in tag(rt)) + margin


# ---------------------------------------------------------------------------- the rules

def check_pair(pair: PreferencePair, thresholds: FilterThresholds | None = None) -> str | None:
    """The name of the first rule (see RULES) that rejects the pair, or None if it is kept."""
    t = thresholds or FilterThresholds()
    chosen, rejected = pair.chosen.strip(), pair.rejected.strip()
    chosen_chars, rejected_chars = len(chosen), len(rejected)
    if chosen_chars <= t.min_chosen_chars:
        return "chosen_length"
    chosen, rejected = _normalize(chosen), _normalize(rejected)
    chosen_lower, rejected_lower = chosen.lower(), rejected.lower()
    if t.weak_phrases and _weak_regex(tuple(t.weak_phrases)).search(chosen_lower):
        return "weak_phrase"
    if abs(chosen_chars - rejected_chars) < t.min_length_diff:
        return "length_difference"
    cw, rw = _words(chosen_lower), _words(rejected_lower)
    if t.max_similarity < 1.0:
        sm = difflib.SequenceMatcher(None, cw, rw, autojunk=False)
        # the quick ratios are upper bounds of ratio(): skip the exact one when they suffice
        if sm.real_quick_ratio() > t.max_similarity and sm.quick_ratio() > t.max_similarity \
                and sm.ratio() > t.max_similarity:
            return "similarity"
    stop = _stopwords()
    ratio = sum(w in stop for w in cw) / len(cw) if cw else 0.0
    if not t.min_stopword_ratio <= ratio <= t.max_stopword_ratio:
        return "stopword_ratio"
    cc, rc = {w for w in cw if w not in stop}, {w for w in rw if w not in stop}
    union = cc | rc
    if union and len(cc & rc) / len(union) > t.max_content_jaccard:
        return "content_overlap"
    if not _more_nouns_verbs(chosen, rejected, t.min_noun_verb_margin):
        return "nouns_verbs"
    return None


def _thresholds_from_kwargs(overrides: dict) -> FilterThresholds:
    known = {f.name for f in fields(FilterThresholds)}
    for name in overrides:
        if name not in known:
            raise TypeError(f"unknown threshold {name!r}; known thresholds: {sorted(known)}")
    return FilterThresholds(**overrides)


def is_strong_preference(pair: PreferencePair, **thresholds) -> bool:
    """True when every rule passes. Keyword arguments override FilterThresholds fields."""
    return check_pair(pair, _thresholds_from_kwargs(thresholds)) is None


# ---------------------------------------------------------------------------- filtering a set

@dataclass
class FilterReport:
    """What filter_pairs did: totals, per-rule rejections (in rule order) and speed."""

    total: int = 0  # pairs examined (fewer than given when `limit` stopped early)
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))
    elapsed_s: float = 0.0  # filtering time, without the one-time NLTK data load

    @property
    def pairs_per_s(self) -> float:
        return self.total / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def format(self) -> str:
        pct = lambda n: f"{100 * n / self.total:5.1f}%" if self.total else "    -"
        lines = [f"strong-preference filter: kept {self.kept} of {self.total} pairs "
                 f"in {self.elapsed_s:.2f} s ({self.pairs_per_s:,.0f} pairs/s)",
                 f"  {'rule':<20}{'rejected':>9}{'share':>8}"]
        lines += [f"  {rule:<20}{n:>9}{pct(n):>8}" for rule, n in self.rejected.items()]
        lines.append(f"  {'kept':<20}{self.kept:>9}{pct(self.kept):>8}")
        return "\n".join(lines)

    __str__ = format


def _check_chunk(args: tuple[list[PreferencePair], FilterThresholds]) -> list[str | None]:
    chunk, thresholds = args
    return [check_pair(p, thresholds) for p in chunk]


def filter_pairs(
    pairs: Iterable[PreferencePair],
    thresholds: FilterThresholds | None = None,
    *,
    limit: int | None = None,
    num_workers: int = 1,
    progress: bool = False,
    chunk_size: int = 256,
) -> tuple[list[PreferencePair], FilterReport]:
    """Keep the strong-preference pairs, in input order.

    limit: stop once this many pairs are kept (the report then counts only the pairs
        examined up to that point).
    num_workers: >1 checks chunks of ``chunk_size`` pairs in a multiprocessing pool;
        the results (kept pairs and counts) are identical to num_workers=1.
    progress: show a tqdm bar on stderr.
    """
    thresholds = thresholds or FilterThresholds()
    pairs = list(pairs)
    # Load the NLTK data here, so that a missing package fails once, in this process.
    _stopwords()
    _tagger()
    start = time.perf_counter()
    chunks = [pairs[i:i + chunk_size] for i in range(0, len(pairs), chunk_size)]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc="filtering", unit="pair", file=sys.stderr)
        except ImportError:
            pass
    pool = None
    if num_workers > 1 and len(chunks) > 1:
        import multiprocessing

        pool = multiprocessing.get_context().Pool(min(num_workers, len(chunks)))
        verdicts = pool.imap(_check_chunk, [(c, thresholds) for c in chunks])
    else:
        verdicts = map(_check_chunk, [(c, thresholds) for c in chunks])
    kept: list[PreferencePair] = []
    report = FilterReport()
    try:
        for chunk, chunk_verdicts in zip(chunks, verdicts):
            for pair, rule in zip(chunk, chunk_verdicts):
                report.total += 1
                if rule is None:
                    kept.append(pair)
                    if limit is not None and len(kept) >= limit:
                        break
                else:
                    report.rejected[rule] += 1
            if bar is not None:
                bar.update(len(chunk))
            if limit is not None and len(kept) >= limit:
                break
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    report.kept = len(kept)
    report.elapsed_s = time.perf_counter() - start
    return kept, report
