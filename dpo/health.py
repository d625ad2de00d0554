"""Is the trained policy still a working language model? Numbers to report beside the accuracy.

Preference accuracy can rise while the model breaks: on SmolLM2-135M-Instruct with the
assignment's settings, held-out accuracy went from 68% to 93.5% while the policy's greedy
answers became nothing but spaces (its per-token log p(chosen) fell from -2.7 to -10.8).
DPO only needs log p(chosen) - log p(rejected) to grow, and pushing both down, rejected
faster, does that. So next to the accuracy we measure:

* log p(chosen) on the held-out pairs (from `dpo.evaluate.EvalResult`): how far the policy
  has moved away from the answers it was told to prefer;
* the policy's own greedy answers to held-out prompts, against the reference's
  (`dpo.samples`): their length, the share that is empty or whitespace, distinct-2 (the
  variety of token bigrams) and repetition;
* the reference model's NLL of those answers, a judge-free fluency proxy: "how surprised is
  the starting model by what the policy now says", with the reference's NLL of its own
  answers as the baseline;
* KL(policy || reference) on the policy's own answers, exact over the vocabulary: how far the
  policy has drifted where it actually goes (DPO's implicit constraint, measured).

`assess` turns those numbers into a list of one-line problems against `HealthThresholds`;
`health_report` computes them all for a trainer.

Shapes: B batch, T padded sequence length, N answer positions in a batch, V vocabulary.
The pure functions take plain lists; the model functions batch with right padding and an
attention mask, and apply the LM head only at the answer positions (so no [B, T, V] tensor
for the prompt tokens is ever made).
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from smollm import SmolLM

from .distributed import same_values
from .precision import autocast_context

# --------------------------------------------------------------------------- text statistics


def _is_blank(text: str) -> bool:
    return text.strip() == ""


def distinct_n(answers_ids: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct token n-grams / all token n-grams, pooled over the answers.

    n-grams never cross from one answer into the next. An answer shorter than n tokens has
    no n-gram and adds nothing to either count. When no answer has n tokens (all empty, or
    all single tokens for n = 2) the set has no variety to measure and the result is 0.0:
    such a set is as degenerate as it gets, and 0.0 makes `assess` say so.
    """
    grams: list[tuple[int, ...]] = []
    for ids in answers_ids:
        ids = list(ids)
        grams += [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _is_repetitive(ids: Sequence[int], n: int = 4, cover: float = 0.5) -> bool:
    """Whether one token n-gram, occurring at least twice, covers more than `cover` of the answer.

    Covered = the token positions inside any occurrence of the answer's most frequent n-gram
    (occurrences may overlap: 128 identical tokens are one 4-gram covering all 128).
    One occurrence never counts, or every answer of 4-7 tokens would be "repetitive".
    """
    ids = list(ids)
    if len(ids) < n + 1:  # two occurrences need at least n + 1 tokens
        return False
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return False
    covered = set()
    for i, g in enumerate(grams):
        if g == gram:
            covered.update(range(i, i + n))
    return len(covered) > cover * len(ids)


def text_stats(answers_ids: Sequence[Sequence[int]], answers_text: Sequence[str]) -> dict[str, float]:
    """Statistics of a set of generated answers (one model's samples).

    answers_ids: per answer its generated token ids, without the stop token.
    answers_text: the same answers decoded (special tokens skipped).
    Returns
        mean_length: mean number of tokens per answer;
        empty_share: share of answers whose text is empty or whitespace only;
        distinct_2: distinct token bigrams / all token bigrams over the set (`distinct_n`;
            0.0 when no answer has two tokens);
        repetition: share of answers in which one token 4-gram, occurring at least twice,
            covers more than half of the tokens (a loop).
    An empty set gives nan for each.
    """
    if len(answers_ids) != len(answers_text):
        raise ValueError(f"{len(answers_ids)} token lists but {len(answers_text)} texts")
    n = len(answers_ids)
    if n == 0:
        return {"mean_length": math.nan, "empty_share": math.nan, "distinct_2": math.nan, "repetition": math.nan}
    return {
        "mean_length": sum(len(a) for a in answers_ids) / n,
        "empty_share": sum(_is_blank(t) for t in answers_text) / n,
        "distinct_2": distinct_n(answers_ids, 2),
        "repetition": sum(_is_repetitive(a) for a in answers_ids) / n,
    }


# --------------------------------------------------------------------------- model measurements


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put the models in eval mode without gradients; give each back its own mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _check_inputs(prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]]) -> None:
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens: nothing would predict the answer's first token")


def _answer_batches(prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                    batch_size: int, device: torch.device):
    """Right-padded batches of prompt + answer, for the pairs whose answer is not empty.

    Yields (input_ids [B, T], attention_mask [B, T], rows [N], cols [N], targets [N]):
    answer token t of row b sits at column prompt_len + t and is predicted by the
    distribution at column prompt_len + t - 1, which is what (rows, cols) index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = [(list(p), list(a)) for p, a in zip(prompt_ids, answer_ids) if len(a) > 0]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        T = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)  # the pad id is never read (masked)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, (p, a) in enumerate(chunk):
            ids[b, :len(p) + len(a)] = torch.tensor(p + a)
            mask[b, :len(p) + len(a)] = 1
            rows += [b] * len(a)
            cols += range(len(p) - 1, len(p) + len(a) - 1)
            targets += a
        yield (ids.to(device), mask.to(device), torch.tensor(rows, device=device),
               torch.tensor(cols, device=device), torch.tensor(targets, device=device))


HEAD_CHUNK = 256  # answer positions per LM-head call: a [256, V] fp32 slice is 50 MB for SmolLM


def _answer_log_probs(hidden: torch.Tensor, model: SmolLM, rows: torch.Tensor,
                      cols: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """fp32 log-softmax of the distributions at (rows, cols) of the trunk output `hidden` [B, T, C].

    The LM head runs only on those N positions, HEAD_CHUNK of them at a time, so no
    [N, V] tensor is made: yields (slice of the N positions, log-probs [n <= HEAD_CHUNK, V]).
    """
    for s in range(0, len(rows), HEAD_CHUNK):
        part = slice(s, s + HEAD_CHUNK)
        yield part, F.log_softmax(model.lm_head(hidden[rows[part], cols[part]]).float(), dim=-1)


def reference_nll(reference: SmolLM, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                  *, batch_size: int = 8, device: torch.device | str = "cpu",
                  autocast_dtype: torch.dtype | None = None) -> float:
    """The reference's mean per-token NLL (nats) of the given answers to the given prompts.

    A fluency proxy that needs no judge: the starting model's surprise at each answer
    token, -log p_ref(answer[t] | prompt, answer[:t]), averaged over all answer tokens of
    all answers (token-weighted: a long answer counts per token). Answers are passed
    without their stop token, so only the text is scored. An empty answer has no token and
    contributes nothing; when every answer is empty there is nothing to score and the
    result is nan (the empty answers themselves show in `text_stats`' empty_share).

    prompt_ids / answer_ids: per sample, the prompt's tokens (at least one) and the answer's.
    """
    _check_inputs(prompt_ids, answer_ids)
    device = torch.device(device)
    total, count = 0.0, 0
    with eval_mode(reference), autocast_context(device, autocast_dtype):
        for ids, mask, rows, cols, targets in _answer_batches(prompt_ids, answer_ids, batch_size, device):
            hidden = reference.hidden_states(ids, mask)  # [B, T, C]
            for part, logp in _answer_log_probs(hidden, reference, rows, cols):  # [n, V]
                total -= logp.gather(-1, targets[part, None]).sum().item()
            count += len(targets)
    return total / count if count else math.nan


def kl_on_samples(policy: SmolLM, reference: SmolLM, prompt_ids: Sequence[Sequence[int]],
                  answer_ids: Sequence[Sequence[int]], *, batch_size: int = 8,
                  device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> float:
    """Mean exact KL(policy || reference) in nats over the positions that produced the answers.

    At each answer token t the context is prompt + answer[:t]; both models' next-token
    distributions there are compared over the whole vocabulary,
        KL = sum_v p_pol(v) (log p_pol(v) - log p_ref(v)),
    from fp32 log-softmax, and averaged over all answer tokens of all answers
    (token-weighted). Meant for the policy's own greedy answers: KL where the policy
    actually goes. 0 for identical models; empty answers contribute nothing; nan when all
    answers are empty.
    """
    return kl_and_reference_nll(policy, reference, prompt_ids, answer_ids, batch_size=batch_size, device=device,
                                autocast_dtype=autocast_dtype)[0]


def kl_and_reference_nll(policy: SmolLM, reference: SmolLM, prompt_ids: Sequence[Sequence[int]],
                         answer_ids: Sequence[Sequence[int]], *, batch_size: int = 8,
                         device: torch.device | str = "cpu",
                         autocast_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(`kl_on_samples`, `reference_nll`) of the same answers from one forward of each model:
    the reference's log-probs that the KL needs also give its NLL of the answer tokens."""
    _check_inputs(prompt_ids, answer_ids)
    device = torch.device(device)
    kl, nll, count = 0.0, 0.0, 0
    with eval_mode(policy, reference), autocast_context(device, autocast_dtype):
        for ids, mask, rows, cols, targets in _answer_batches(prompt_ids, answer_ids, batch_size, device):
            h_pol, h_ref = policy.hidden_states(ids, mask), reference.hidden_states(ids, mask)  # [B, T, C] each
            for (part, logp), (_, logq) in zip(_answer_log_probs(h_pol, policy, rows, cols),
                                               _answer_log_probs(h_ref, reference, rows, cols)):  # [n, V] each
                kl += (logp.exp() * (logp - logq)).sum().item()  # KL summed over v, then positions
                nll -= logq.gather(-1, targets[part, None]).sum().item()
            count += len(targets)
    return (kl / count, nll / count) if count else (math.nan, math.nan)


# --------------------------------------------------------------------------- thresholds


@dataclass
class HealthThresholds:
    """When a trained policy counts as broken. Each bound is one line of `assess`.

    The bounds are relative to the reference (its log-probs, its own samples), so they
    carry across models and prompt sets; the figures behind each are in its comment.
    """

    # nats/token the policy's mean held-out log p(chosen) may fall below the reference's.
    # Measured on SmolLM2-135M-Instruct: a healthy run moved -2.79 -> -3.64 (a drop of
    # 0.85), the collapsed one -2.74 -> -10.84 (8.10). 1.0 passes the first and catches the
    # second eight times over; DPO lowering log p(chosen) a little is normal (both sides
    # fall, rejected faster), a nat per token is e^1 = 2.7x less likely chosen tokens.
    max_chosen_logp_drop: float = 1.0
    # Share of greedy answers that are empty or whitespace only. An Instruct model answers
    # every held-out HH prompt with text (its share is ~0); the collapsed run's was 1.0.
    # A quarter of the answers gone is broken by any reading, while a few empty answers to
    # odd prompts (a truncated prompt, a harmful request answered by stopping) are not.
    max_empty_share: float = 0.25
    # The policy's distinct-2 must stay at least this fraction of the reference's samples'
    # distinct-2 (relative, because the absolute value depends on the model, the prompts
    # and max_new_tokens). A loop or a run of one token drives distinct-2 towards 1 / the
    # number of bigrams (0.01 for 128 spaces); halving it means most of the answers'
    # bigrams are repeats, while DPO's longer, more formulaic answers lose far less.
    min_distinct_2_ratio: float = 0.5
    # nats/token by which the reference's NLL of the policy's answers may exceed its NLL of
    # its own greedy answers (the baseline: a model's greedy text is what it finds most
    # likely). 1.5 nats is e^1.5 = 4.5x less likely per token: text the starting model
    # would still write, only less eagerly, passes; text it would never write does not.
    max_reference_nll_rise: float = 1.5

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _value(health: dict[str, Any], key: str) -> float | None:
    """health[key] as a float, or None when missing or nan (not judged)."""
    v = health.get(key)
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def assess(health: dict[str, Any], thresholds: HealthThresholds | None = None) -> list[str]:
    """The problems in a health dict (as `health_report` returns), one line each; [] = healthy.

    A bound is judged only when every metric it needs is in `health` and not nan. The
    log p(chosen) bound is in nats per token, so it is judged only when the log-probs are
    per-token means (`health["logp_reduction"]` absent or "mean"), not with "sum".
    """
    t = thresholds or HealthThresholds()
    problems: list[str] = []

    pol, ref = _value(health, "policy_chosen_logp"), _value(health, "reference_chosen_logp")
    if pol is not None and ref is not None and health.get("logp_reduction", "mean") == "mean":
        drop = ref - pol
        if drop > t.max_chosen_logp_drop:
            problems.append(f"held-out log p(chosen) fell {drop:.2f} nats/token below the reference's "
                            f"({pol:.2f} vs {ref:.2f}; bound {t.max_chosen_logp_drop:.2f})")

    empty = _value(health, "policy_sample_empty_share")
    if empty is not None and empty > t.max_empty_share:
        n = health.get("n_samples")
        of = f" of {n}" if n is not None else ""
        problems.append(f"policy samples empty or whitespace only: {empty:.0%}{of} "
                        f"(bound {t.max_empty_share:.0%})")

    d_pol, d_ref = _value(health, "policy_sample_distinct_2"), _value(health, "reference_sample_distinct_2")
    if d_pol is not None and d_ref is not None:
        floor = t.min_distinct_2_ratio * d_ref
        if d_pol < floor:
            problems.append(f"policy samples' distinct-2 {d_pol:.3f} is below {t.min_distinct_2_ratio:g} x the "
                            f"reference's {d_ref:.3f} (bound {floor:.3f})")

    n_pol, n_ref = _value(health, "policy_sample_reference_nll"), _value(health, "reference_sample_reference_nll")
    if n_pol is not None and n_ref is not None:
        rise = n_pol - n_ref
        if rise > t.max_reference_nll_rise:
            problems.append(f"the reference's NLL of the policy's samples is {rise:.2f} nats/token above its NLL "
                            f"of its own ({n_pol:.2f} vs {n_ref:.2f}; bound {t.max_reference_nll_rise:.2f})")
    return problems


# --------------------------------------------------------------------------- the report


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models have equal parameters, name by name (e.g. a policy before its first step)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(same_values(pa[n], pb[n]) for n in pa)


class HealthProbe:
    """The health numbers of a run's policy at each evaluation, with the reference's side computed once.

    The reference never changes during a run, so its greedy answers to the held-out prompts,
    their statistics and its NLL of them are computed at the first `report` and kept (and
    computed again only if a reference tensor was modified in place). When the policy still
    has the reference's weights (before the first step), its answers are the reference's and
    its KL is 0: nothing is generated twice. The numbers are those of `health_report`.
    """

    def __init__(self, reference: SmolLM | None, tokenizer, eval_pairs, *, n_prompts: int = 16,
                 max_new_tokens: int = 128, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None, batch_size: int = 8,
                 logp_reduction: str = "mean", stop_ids: Sequence[int] | None = None):
        if logp_reduction not in ("mean", "sum"):
            raise ValueError(f"logp_reduction must be 'mean' or 'sum', got {logp_reduction!r}")
        pairs = list(eval_pairs)[:n_prompts]
        if not pairs:
            raise ValueError("health_report needs at least one held-out pair (n_prompts >= 1)")
        if stop_ids is None:
            stop_ids = list(dict.fromkeys(list(tokenizer.stop_token_ids) + [tokenizer.eos_token_id]))
        self.reference, self.tokenizer = reference, tokenizer
        self.prompts = [list(p.chosen_ids[:p.prompt_len]) for p in pairs]
        self.max_new_tokens, self.logp_reduction, self.stop_ids = max_new_tokens, logp_reduction, list(stop_ids)
        self.kwargs = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
        self._reference_side: tuple | None = None  # (answers, stats, tensor versions when computed)

    def _versions(self) -> tuple[int, ...]:
        return () if self.reference is None else tuple(p._version for p in self.reference.parameters())

    def report(self, policy: SmolLM, eval_result=None, start_model: SmolLM | None = None
               ) -> tuple[dict[str, Any], list]:
        """(health, samples) of `policy` now; see `health_report`.

        Without a reference model (a reference-free loss), the reference side is the starting
        model's, computed at the first report: by the policy itself, which must not have trained
        yet, or by `start_model` (the starting weights loaded again, e.g. to resume). Then the
        KL and the reference's NLL of the policy's answers need a reference forward that such a
        run never makes: they are None (not judged).
        """
        from .samples import generate_samples  # samples imports this module's eval_mode

        cached = self._reference_side
        if cached is not None and cached[2] != self._versions():
            cached = None
        start = self.reference if self.reference is not None else (
            start_model if start_model is not None else policy if cached is None else None)
        same = start is not None and same_weights(policy, start)
        samples = generate_samples(policy, start if start is not None else policy, self.tokenizer, self.prompts,
                                   max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                   reference_answers=None if cached is None else cached[0],
                                   same_weights=same, **self.kwargs)
        if cached is None:
            stats = self._side_stats(samples, "reference", start)
            cached = self._reference_side = (
                [(s.reference_ids, s.reference_stopped) for s in samples], stats, self._versions())
        health: dict[str, Any] = {"n_samples": len(samples), "max_new_tokens": self.max_new_tokens,
                                  "logp_reduction": self.logp_reduction}
        if eval_result is not None:
            for key in ("policy_chosen_logp", "policy_rejected_logp", "reference_chosen_logp",
                        "reference_rejected_logp"):
                health[key] = getattr(eval_result, key)
        ref_stats = cached[1]
        if same:
            pol_stats, kl = dict(ref_stats), 0.0
        elif self.reference is None:  # no reference model to ask
            pol_stats, kl = self._side_stats(samples, "policy"), None
            pol_stats["reference_nll"] = None
        else:  # one reference forward gives its NLL of the policy's answers and the KL
            pol_stats = self._side_stats(samples, "policy")
            kl, pol_stats["reference_nll"] = kl_and_reference_nll(
                policy, self.reference, self.prompts, [s.policy_ids for s in samples], **self.kwargs)
        health.update({f"policy_sample_{k}": v for k, v in pol_stats.items()})
        health.update({f"reference_sample_{k}": v for k, v in ref_stats.items()})
        health["kl_policy_reference"] = kl
        return health, samples

    def prime(self, start_model: SmolLM) -> None:
        """Compute the reference side now, with `start_model` as the reference (a reference-free
        run resumed after its first step: the starting weights, loaded again and then dropped)."""
        from .samples import generate_samples

        samples = generate_samples(start_model, start_model, self.tokenizer, self.prompts,
                                   max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                   same_weights=True, **self.kwargs)
        self._reference_side = ([(s.reference_ids, s.reference_stopped) for s in samples],
                                self._side_stats(samples, "reference", start_model), self._versions())

    def _side_stats(self, samples: list, side: str, reference: SmolLM | None = None) -> dict[str, float]:
        """Text statistics of one side's answers (and, for the reference's, its NLL of them)."""
        ids = [getattr(s, f"{side}_ids") for s in samples]
        stats = text_stats(ids, [getattr(s, side) for s in samples])
        stats["stopped_share"] = sum(getattr(s, f"{side}_stopped") for s in samples) / len(samples)
        if side == "reference":
            stats["reference_nll"] = reference_nll(reference, self.prompts, ids, **self.kwargs)
        return stats


def health_report(policy: SmolLM, reference: SmolLM, tokenizer, eval_pairs, *, n_prompts: int = 16,
                  max_new_tokens: int = 128, eval_result=None, device: torch.device | str = "cpu",
                  autocast_dtype: torch.dtype | None = None, batch_size: int = 8,
                  logp_reduction: str = "mean", stop_ids: Sequence[int] | None = None):
    """Greedy samples from both models on held-out prompts, and the health numbers of them.

    eval_pairs: held-out `TokenizedPair`s; the first `n_prompts` give the prompts
        (`chosen_ids[:prompt_len]`, already in the run's chat format).
    eval_result: a `dpo.evaluate.EvalResult` of the same run, or None. Its log-probs are
        copied as they are; they are per-token means when the run's reduction is "mean"
        and per-answer sums with "sum". Pass the run's `logp_reduction`: it is recorded in
        the dict, and `assess` judges the per-token bound only for "mean".
    stop_ids: ids that end an answer (default: `tokenizer.stop_token_ids` plus EOS).

    Returns (health, samples). health is flat, with keys
        n_samples, max_new_tokens, logp_reduction,
        {policy,reference}_{chosen,rejected}_logp                    (when eval_result is given)
        {policy,reference}_sample_{mean_length,empty_share,distinct_2,repetition,stopped_share}
        {policy,reference}_sample_reference_nll   (the reference's NLL of each side's samples;
                                                   the reference's own is the baseline)
        kl_policy_reference   (KL(policy || reference) on the policy's samples; for the
                               reference's samples it is 0 by definition and not computed)
    samples: the `dpo.samples.Sample`s, for `dpo.samples.write_samples`.
    A run evaluates many times: `HealthProbe` keeps the reference's side between calls.
    """
    probe = HealthProbe(reference, tokenizer, eval_pairs, n_prompts=n_prompts, max_new_tokens=max_new_tokens,
                        device=device, autocast_dtype=autocast_dtype, batch_size=batch_size,
                        logp_reduction=logp_reduction, stop_ids=stop_ids)
    return probe.report(policy, eval_result)
