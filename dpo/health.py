"""Is the trained policy still a working language model? Numbers to report beside the accuracy.

Preference accuracy can rise while the model breaks: on SmolLM2-135M-Instruct with the
assignment's settings, held-out accuracy went from 68% to 93.5% while the policy's greedy
answers became nothing but spaces (its per-token log p(chosen) fell from -2.7 to -10.8).
DPO only needs log p(chosen) - log p(rejected) to grow, and pushing both down, rejected
faster, does that. Subtler, and as bad for a reader: the old default rose from 62.5% to 88%
while its answers stopped ending their turn (0% against the reference's 38%) and looped more,
and two blind judges preferred the starting model's answers 85% of the time. So next to the
accuracy we measure:

* log p(chosen) on the held-out pairs (from `dpo.evaluate.EvalResult`): how far the policy
  has moved away from the answers it was told to prefer;
* the policy's own greedy answers to held-out prompts, against the reference's
  (`dpo.samples`, `dpo.answers`): the share that ends its turn, the share that loops, their
  length, the share that is empty or whitespace, and distinct-2 (the variety of token bigrams);
* the reference model's NLL of those answers, a judge-free fluency proxy: "how surprised is
  the starting model by what the policy now says", with the reference's NLL of its own
  answers as the baseline;
* KL(policy || reference) on the policy's own answers, exact over the vocabulary: how far the
  policy has drifted where it actually goes (DPO's implicit constraint, measured).

`check_bounds` judges those numbers against `HealthThresholds`, each bound relative to the
reference and judged only where the reference's own figure is a meaningful baseline; `assess`
lists the problems, one line each. `health_report` computes the numbers for a trainer.

Shapes: B batch, T padded sequence length, N answer positions in a batch, V vocabulary.
The pure functions take plain lists; the model functions batch with right padding and an
attention mask, and apply the LM head only at the answer positions (so no [B, T, V] tensor
for the prompt tokens is ever made); on a CPU in fp32 their Linear layers multiply with oneDNN
(`smollm.onednn.onednn_linears`, packed=False), as the engine's gradient-free blocks do.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from smollm import SmolLM
from smollm.generation import PromptPrefixes
from smollm.onednn import onednn_linears

from .answers import Streams, answers_with_streams, eval_mode, greedy_answers, text_stats
from .distributed import same_values
from .engine import shared_trunk_depth
from .precision import autocast_context
from .samples import make_samples, user_turns

# --------------------------------------------------------------------------- model measurements


def _check_inputs(prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]]) -> None:
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens: nothing would predict the answer's first token")


def _answer_batches(prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                    batch_size: int, device: torch.device, streams: Streams | None = None):
    """Right-padded batches of prompt + answer[:-1], for the pairs whose answer is not empty.

    Yields (input_ids [B, T], attention_mask [B, T], rows [N], cols [N], targets [N], x):
    answer token t of row b is predicted by the distribution at column prompt_len + t - 1, which
    is what (rows, cols) index; the answer's last token predicts nothing that is scored, so it is
    not an input. x: per layer K of `streams` (the answers' own streams, `dpo.answers.Streams`),
    the stream entering block K at those inputs [B, T, C], zeros at padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    streams = streams or {}
    for k, per_answer in streams.items():
        for i, (p, a, st) in enumerate(zip(prompt_ids, answer_ids, per_answer, strict=True)):
            if len(a) and (st is None or st.shape[0] != len(p) + len(a) - 1):
                raise ValueError(f"answer {i}: the stream entering block {k} covers "
                                 f"{None if st is None else st.shape[0]} positions; its prompt + answer[:-1] "
                                 f"has {len(p) + len(a) - 1}")
    items = [i for i, a in enumerate(answer_ids) if len(a) > 0]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        T = max(len(prompt_ids[i]) + len(answer_ids[i]) - 1 for i in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)  # the pad id is never read (masked)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        x = {k: torch.zeros(len(chunk), T, st[chunk[0]].shape[-1], dtype=st[chunk[0]].dtype)
             for k, st in streams.items()}  # [B, T, C] per layer
        rows, cols, targets = [], [], []
        for b, i in enumerate(chunk):
            p, a = list(prompt_ids[i]), list(answer_ids[i])
            n = len(p) + len(a) - 1
            ids[b, :n] = torch.tensor(p + a[:-1])
            mask[b, :n] = 1
            for k, st in streams.items():
                x[k][b, :n] = st[i]
            rows += [b] * len(a)
            cols += range(len(p) - 1, n)
            targets += a
        yield (ids.to(device), mask.to(device), torch.tensor(rows, device=device),
               torch.tensor(cols, device=device), torch.tensor(targets, device=device),
               {k: t.to(device) for k, t in x.items()})


def _hidden(model: SmolLM, ids: torch.Tensor, mask: torch.Tensor, x: dict[int, torch.Tensor]) -> torch.Tensor:
    """The model's final-normed states [B, T, C]: blocks [K, L) from the deepest kept stream x[K]
    when there is one, else the whole model from the tokens."""
    k = max(x, default=0)
    return model.hidden_states(ids, mask, start=k, x=x[k]) if k else model.hidden_states(ids, mask)


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
                  autocast_dtype: torch.dtype | None = None, streams: Streams | None = None) -> float:
    """The reference's mean per-token NLL (nats) of the given answers to the given prompts.

    A fluency proxy that needs no judge: the starting model's surprise at each answer
    token, -log p_ref(answer[t] | prompt, answer[:t]), averaged over all answer tokens of
    all answers (token-weighted: a long answer counts per token). Answers are passed
    without their stop token, so only the text is scored. An empty answer has no token and
    contributes nothing; when every answer is empty there is nothing to score and the
    result is nan (the empty answers themselves show in `text_stats`' empty_share).

    prompt_ids / answer_ids: per sample, the prompt's tokens (at least one) and the answer's.
    streams: the reference's own streams from generating these answers
        (`dpo.answers.answers_with_streams`): the blocks below the deepest one do not run again.
    """
    _check_inputs(prompt_ids, answer_ids)
    device = torch.device(device)
    total, count = 0.0, 0
    deepest = {max(streams): streams[max(streams)]} if streams else None
    with eval_mode(reference), autocast_context(device, autocast_dtype), onednn_linears(reference, packed=False):
        for ids, mask, rows, cols, targets, x in _answer_batches(prompt_ids, answer_ids, batch_size, device,
                                                                 deepest):
            hidden = _hidden(reference, ids, mask, x)  # [B, T, C]
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


def _both_hidden_states(policy: SmolLM, reference: SmolLM, shared: int, ids: torch.Tensor,
                        mask: torch.Tensor, x: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' final-normed states [B, T, C] of one batch.

    The first `shared` blocks, which the two share as the very same frozen tensors on a shared
    embedding (`dpo.engine.shared_trunk_depth`), run once for both: exact, the same blocks on the
    same input, only not twice (25 of 30 in the default run). With x, the policy's own streams at
    these inputs from generating them, they do not run at all: both models continue from the
    deepest stream inside the shared trunk. Either way both tails read the same input, so two
    models with equal tails have a KL of exactly 0.
    """
    k = max((k for k in x if k <= shared), default=0)
    if k:
        trunk = x[k]  # [B, T, C], the stream entering block k
    elif shared:
        trunk, k = policy.hidden_states(ids, mask, end=shared), shared  # [B, T, C], after block shared-1
    else:
        return policy.hidden_states(ids, mask), reference.hidden_states(ids, mask)
    return tuple(m.hidden_states(ids, mask, start=k, x=trunk) for m in (policy, reference))


def kl_and_reference_nll(policy: SmolLM, reference: SmolLM, prompt_ids: Sequence[Sequence[int]],
                         answer_ids: Sequence[Sequence[int]], *, batch_size: int = 8,
                         device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                         streams: Streams | None = None) -> tuple[float, float]:
    """(`kl_on_samples`, `reference_nll`) of the same answers from one forward of each model:
    the reference's log-probs that the KL needs also give its NLL of the answer tokens. The
    blocks the two models share (a frozen trunk) run once.

    streams: the policy's own, from generating these answers (`dpo.answers.answers_with_streams`):
    both models then run only the blocks above the deepest of them inside the shared trunk. The
    streams are the decoding's, position by position, so the figures may differ from a whole
    forward's in the last digits.
    """
    _check_inputs(prompt_ids, answer_ids)
    device = torch.device(device)
    kl, nll, count = 0.0, 0.0, 0
    shared = shared_trunk_depth(policy, reference)
    with (eval_mode(policy, reference), autocast_context(device, autocast_dtype),
          onednn_linears(policy, packed=False), onednn_linears(reference, packed=False)):
        for ids, mask, rows, cols, targets, x in _answer_batches(prompt_ids, answer_ids, batch_size, device,
                                                                 streams):
            h_pol, h_ref = _both_hidden_states(policy, reference, shared, ids, mask, x)  # [B, T, C] each
            for (part, logp), (_, logq) in zip(_answer_log_probs(h_pol, policy, rows, cols),
                                               _answer_log_probs(h_ref, reference, rows, cols)):  # [n, V] each
                kl += (logp.exp() * (logp - logq)).sum().item()  # KL summed over v, then positions
                nll -= logq.gather(-1, targets[part, None]).sum().item()
            count += len(targets)
    return (kl / count, nll / count) if count else (math.nan, math.nan)


# --------------------------------------------------------------------------- thresholds


@dataclass
class HealthThresholds:
    """When a trained policy counts as degraded. Each bound is one `BoundCheck` of `check_bounds`.

    Every bound is relative to the reference (its log-probs, its own answers to the same
    prompts), so it carries across models and prompt sets; the figures behind each are in its
    comment. A bound is judged only where the reference's own figure gives it a meaningful
    baseline. The bounds on differences (nats) always have one; a bound on a share or a ratio
    does not when the reference's figure is degenerate: half of a 3% end-of-turn share, or half
    of a distinct-2 of 0.003 (a random model repeating one word), is noise. Such a bound says
    that it cannot be judged, and the run trains on.
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
    # Judged when the reference's own empty share is not above it.
    max_empty_share: float = 0.25
    # The policy must end its turn in at least this fraction of the reference's end-of-turn
    # share. The old default ended 0% of its answers against the reference's 38%, and two
    # blind judges preferred the reference 85% of the time: an answer that runs to the token
    # limit rambles, and it cannot decline in one sentence. Judged when the reference ended at
    # least `min_ended_baseline` of its answers (and 3 answers).
    min_ended_ratio: float = 0.5
    min_ended_baseline: float = 0.15
    # The policy's loop share (`dpo.answers.loops`: a word 4-gram 3+ times) may rise above the
    # reference's by at most this fraction of the room above it: bound = ref + 0.5 x (1 - ref),
    # 84% for the reference's 68%, where the old default's 95% is degraded. SmolLM2-135M loops
    # itself, so the bound is relative. Judged when the reference loops in at most
    # `max_loop_baseline` of its answers, and 3 of them do not (a reference that always loops
    # leaves no room to rise), and when its answers are language at all (distinct-2 at least
    # `min_distinct_2_baseline`: a random model's "::::::::" has no words, so no loops either).
    max_loop_rise: float = 0.5
    max_loop_baseline: float = 0.8
    # The policy's distinct-2 must stay at least this fraction of the reference's samples'
    # distinct-2 (relative, because the absolute value depends on the model, the prompts
    # and max_new_tokens). A loop or a run of one token drives distinct-2 towards 1 / the
    # number of bigrams (0.01 for 128 spaces); halving it means most of the answers'
    # bigrams are repeats. Judged when the reference's own distinct-2 is at least
    # `min_distinct_2_baseline`: below it the reference repeats itself (a random model: 0.003).
    min_distinct_2_ratio: float = 0.5
    min_distinct_2_baseline: float = 0.1
    # nats/token by which the reference's NLL of the policy's answers may exceed its NLL of
    # its own greedy answers (the baseline: a model's greedy text is what it finds most
    # likely). 1.5 nats is e^1.5 = 4.5x less likely per token: text the starting model
    # would still write, only less eagerly, passes; text it would never write does not.
    max_reference_nll_rise: float = 1.5

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class BoundCheck:
    """One bound at one evaluation: its name, "ok", "degraded" or "not judged", and why."""

    name: str
    status: str
    message: str = ""


def _value(health: dict[str, Any], key: str) -> float | None:
    """health[key] as a float, or None when missing or nan (nothing to judge)."""
    v = health.get(key)
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def check_bounds(health: dict[str, Any], thresholds: HealthThresholds | None = None) -> list[BoundCheck]:
    """Every bound whose figures are in `health` (as `health_report` returns it), judged or not.

    A bound whose figures are missing or nan is left out. The log p(chosen) bound is in nats
    per token, so it is judged only when the log-probs are per-token means
    (`health["logp_reduction"]` absent or "mean"), not with "sum".
    """
    t = thresholds or HealthThresholds()
    checks: list[BoundCheck] = []

    def judge(name: str, bad: bool, message: str) -> None:
        checks.append(BoundCheck(name, "degraded" if bad else "ok", message if bad else ""))

    def not_judged(name: str, why: str) -> None:
        checks.append(BoundCheck(name, "not judged", f"the {name} bound cannot be judged: {why}"))

    pol, ref = _value(health, "policy_chosen_logp"), _value(health, "reference_chosen_logp")
    if pol is not None and ref is not None and health.get("logp_reduction", "mean") == "mean":
        drop = ref - pol
        judge("log p(chosen)", drop > t.max_chosen_logp_drop,
              f"held-out log p(chosen) fell {drop:.2f} nats/token below the reference's "
              f"({pol:.2f} vs {ref:.2f}; bound {t.max_chosen_logp_drop:.2f})")

    n = health.get("n_samples")

    def share(x: float) -> str:  # "38% (12 of 32)"
        return f"{x:.0%} ({round(x * n)} of {n})" if n else f"{x:.0%}"
    empty, empty_ref = _value(health, "policy_sample_empty_share"), _value(health, "reference_sample_empty_share")
    if empty is not None:
        if empty_ref is not None and empty_ref > t.max_empty_share:
            not_judged("empty-answer", f"the reference's own answers are empty in {share(empty_ref)} "
                                       f"(above the bound, {t.max_empty_share:.0%})")
        else:
            judge("empty-answer", empty > t.max_empty_share,
                  f"policy answers empty or whitespace only: {share(empty)} (bound {t.max_empty_share:.0%})")

    e_pol, e_ref = _value(health, "policy_sample_ended_share"), _value(health, "reference_sample_ended_share")
    if e_pol is not None and e_ref is not None:
        ended_ref = round(e_ref * n) if n else None
        if e_ref < t.min_ended_baseline or (ended_ref is not None and ended_ref < 3):
            not_judged("end-of-turn", f"the reference itself ended its turn in only {share(e_ref)} of its "
                                      f"answers (a baseline needs {t.min_ended_baseline:.0%} and 3 answers)")
        else:
            floor = t.min_ended_ratio * e_ref
            judge("end-of-turn", e_pol < floor,
                  f"the policy ends its turn in {share(e_pol)} of its answers against the reference's "
                  f"{e_ref:.0%} (bound {floor:.0%} = {t.min_ended_ratio:g} x the reference's): "
                  "its answers run on to the token limit")

    d_pol, d_ref = _value(health, "policy_sample_distinct_2"), _value(health, "reference_sample_distinct_2")
    repeats = d_ref is not None and d_ref < t.min_distinct_2_baseline  # the reference's answers are not language
    l_pol, l_ref = _value(health, "policy_sample_loop_share"), _value(health, "reference_sample_loop_share")
    if l_pol is not None and l_ref is not None:
        if repeats:
            not_judged("loop", f"the reference's own answers repeat themselves (distinct-2 {d_ref:.3f}, below "
                               f"{t.min_distinct_2_baseline:g}): their loop share of {l_ref:.0%} is no baseline")
        elif l_ref > t.max_loop_baseline or (n and (1 - l_ref) * n < 3):
            not_judged("loop", f"the reference's own answers loop in {share(l_ref)} (a baseline needs at "
                               f"most {t.max_loop_baseline:.0%}, and 3 answers that do not loop: room to rise)")
        else:
            ceiling = l_ref + t.max_loop_rise * (1 - l_ref)
            judge("loop", l_pol > ceiling,
                  f"the policy's answers loop (a word 4-gram 3+ times) in {share(l_pol)} against the "
                  f"reference's {l_ref:.0%} (bound {ceiling:.0%})")

    if d_pol is not None and d_ref is not None:
        if repeats:
            not_judged("distinct-2", f"the reference's own distinct-2 is {d_ref:.3f} (below "
                                     f"{t.min_distinct_2_baseline:g}: its answers repeat themselves already)")
        else:
            floor = t.min_distinct_2_ratio * d_ref
            judge("distinct-2", d_pol < floor,
                  f"policy answers' distinct-2 {d_pol:.3f} is below {t.min_distinct_2_ratio:g} x the "
                  f"reference's {d_ref:.3f} (bound {floor:.3f})")

    n_pol, n_ref = _value(health, "policy_sample_reference_nll"), _value(health, "reference_sample_reference_nll")
    if n_pol is not None and n_ref is not None:
        rise = n_pol - n_ref
        judge("reference NLL", rise > t.max_reference_nll_rise,
              f"the reference's NLL of the policy's answers is {rise:.2f} nats/token above its NLL "
              f"of its own ({n_pol:.2f} vs {n_ref:.2f}; bound {t.max_reference_nll_rise:.2f})")
    return checks


def assess(health: dict[str, Any], thresholds: HealthThresholds | None = None) -> list[str]:
    """The problems in a health dict, one line each; [] = within the bounds (`check_bounds`)."""
    return [c.message for c in check_bounds(health, thresholds) if c.status == "degraded"]


def not_judged(health: dict[str, Any], thresholds: HealthThresholds | None = None) -> list[str]:
    """The bounds that cannot be judged for want of a meaningful baseline, one line each."""
    return [c.message for c in check_bounds(health, thresholds) if c.status == "not judged"]


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

    batch_size is the batch of the KL and NLL forwards; the answers are generated all at once,
    up to GENERATE_BATCH prompts a batch: the prompts run packed and each answer leaves the batch when it ends
    (`smollm.generate`), so one batch of 32 takes about half the time of four batches of 8, each
    as long as its longest answer (docs/benchmarks.md, section 9). The cap bounds the KV cache
    (at most about 1 GB for 32 prompts of 512 tokens and 128 new ones).

    What the frozen trunk that policy and reference share (`dpo.engine.shared_trunk_depth`, 25
    blocks in the default run) computes is not computed again: the prompts' keys, values and stream
    through it are kept from the first report's generation (`smollm.generation.PromptPrefixes`;
    the same tokens), and the KL and the reference's NLL score the answers from the streams their
    generation computed (`dpo.answers.answers_with_streams`), not from a new forward of the trunk
    (the same figures to rounding). docs/benchmarks.md, section 10.
    """

    GENERATE_BATCH = 32

    def __init__(self, reference: SmolLM | None, tokenizer, eval_pairs, *, n_prompts: int = 32,
                 max_new_tokens: int = 128, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None, batch_size: int = 8,
                 logp_reduction: str = "mean", stop_ids: Sequence[int] | None = None):
        if logp_reduction not in ("mean", "sum"):
            raise ValueError(f"logp_reduction must be 'mean' or 'sum', got {logp_reduction!r}")
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
        if stop_ids is None:
            stop_ids = list(dict.fromkeys(list(tokenizer.stop_token_ids) + [tokenizer.eos_token_id]))
        self.reference, self.tokenizer = reference, tokenizer
        self.prompts, self.selection = sample_prompts(eval_pairs, n_prompts, tokenizer)
        if not self.prompts:
            raise ValueError(f"no held-out prompt to sample: all {self.selection['empty_skipped']} were cut "
                             "away by the length limit")
        self.max_new_tokens, self.logp_reduction, self.stop_ids = max_new_tokens, logp_reduction, list(stop_ids)
        self.kwargs = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
        self.generate_kwargs = dict(self.kwargs, batch_size=min(len(self.prompts), self.GENERATE_BATCH),
                                    max_new_tokens=max_new_tokens, stop_ids=self.stop_ids)
        self._reference_side: tuple | None = None  # (answers, stats, tensor versions when computed)
        self._prefixes: dict[int, PromptPrefixes] = {}  # shared trunk depth -> the prompts' trunk, kept

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
        cached = self._reference_side
        if cached is not None and cached[2] != self._versions():
            cached = None
        start = self.reference if self.reference is not None else (
            start_model if start_model is not None else policy if cached is None else None)
        same = start is not None and same_weights(policy, start)
        L = policy.config.num_hidden_layers
        shared = shared_trunk_depth(policy, self.reference) if self.reference is not None else 0
        prefixes = self._prefixes.setdefault(shared, PromptPrefixes(shared)) if shared else None
        if cached is None:  # the final stream of the reference's answers gives its NLL of them: head only
            ref_answers, ref_streams = answers_with_streams(start, self.prompts, [L], prefixes=prefixes,
                                                            **self.generate_kwargs)
            stats = self._side_stats(make_samples(self.tokenizer, self.prompts, ref_answers, ref_answers),
                                     "reference", start, ref_streams)
            cached = self._reference_side = (ref_answers, stats, self._versions())
        if same:
            pol_answers, pol_streams = cached[0], None
        elif self.reference is None:  # no KL to measure: nothing to keep
            pol_answers, pol_streams = greedy_answers(policy, self.prompts, **self.generate_kwargs), None
        elif shared:  # both continue from the trunk's stream; the prompts' trunk is kept from the first report
            pol_answers, pol_streams = answers_with_streams(policy, self.prompts, [shared], prefixes=prefixes,
                                                            **self.generate_kwargs)
        else:  # nothing shared (full fine-tuning, LoRA): the KL runs both models over the answers
            pol_answers, pol_streams = greedy_answers(policy, self.prompts, **self.generate_kwargs), None
        samples = make_samples(self.tokenizer, self.prompts, cached[0], pol_answers)
        health: dict[str, Any] = {"n_samples": len(samples), **self.selection,
                                  "max_new_tokens": self.max_new_tokens, "logp_reduction": self.logp_reduction}
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
                policy, self.reference, self.prompts, [s.policy_ids for s in samples], streams=pol_streams,
                **self.kwargs)
        health.update({f"policy_sample_{k}": v for k, v in pol_stats.items()})
        health.update({f"reference_sample_{k}": v for k, v in ref_stats.items()})
        health["kl_policy_reference"] = kl
        return health, samples

    def prime(self, start_model: SmolLM) -> None:
        """Compute the reference side now, with `start_model` as the reference (a reference-free
        run resumed after its first step: the starting weights, loaded again and then dropped)."""
        L = start_model.config.num_hidden_layers
        answers, streams = answers_with_streams(start_model, self.prompts, [L], **self.generate_kwargs)
        samples = make_samples(self.tokenizer, self.prompts, answers, answers)
        self._reference_side = (answers, self._side_stats(samples, "reference", start_model, streams),
                                self._versions())

    def _side_stats(self, samples: list, side: str, reference: SmolLM | None = None,
                    streams: Streams | None = None) -> dict[str, float]:
        """Text statistics of one side's answers (and, for the reference's, its NLL of them, from
        its own `streams` of them when given)."""
        ids = [getattr(s, f"{side}_ids") for s in samples]
        stats = text_stats(ids, [getattr(s, side) for s in samples], [getattr(s, f"{side}_stopped") for s in samples])
        if side == "reference":
            stats["reference_nll"] = reference_nll(reference, self.prompts, ids, streams=streams, **self.kwargs)
        return stats


def sample_prompts(eval_pairs, n: int, tokenizer) -> tuple[list[list[int]], dict[str, int]]:
    """The prompts that the models answer at each evaluation, and how they were chosen.

    Up to `n` held-out prompts (`chosen_ids[:prompt_len]`, in the run's chat format), half of
    them single-turn where the held-out pairs have enough (the judge's prompts are single-turn;
    the rest keep the multi-turn conversations HH is made of), in held-out order. A prompt that
    the length limit cut away entirely has nothing to answer: it is skipped and counted.
    Returns (prompts, {"single_turn": k, "empty_skipped": m}).
    """
    candidates, empty = [], 0
    for pair in eval_pairs:
        if pair.prompt_len == 0:
            empty += 1
            continue
        prompt = list(pair.chosen_ids[:pair.prompt_len])
        candidates.append((len(candidates), prompt, user_turns(tokenizer.decode(prompt, skip_special_tokens=False))))
    single = [c for c in candidates if c[2] == 1]
    multi = [c for c in candidates if c[2] != 1]
    k = min(len(single), max((n + 1) // 2, n - len(multi)))
    chosen = sorted(single[:k] + multi[:n - k])
    return [c[1] for c in chosen], {"single_turn": sum(c[2] == 1 for c in chosen), "empty_skipped": empty}


def health_report(policy: SmolLM, reference: SmolLM, tokenizer, eval_pairs, *, n_prompts: int = 32,
                  max_new_tokens: int = 128, eval_result=None, device: torch.device | str = "cpu",
                  autocast_dtype: torch.dtype | None = None, batch_size: int = 8,
                  logp_reduction: str = "mean", stop_ids: Sequence[int] | None = None):
    """Greedy samples from both models on held-out prompts, and the health numbers of them.

    eval_pairs: held-out `TokenizedPair`s; `sample_prompts` picks `n_prompts` of them
        (`chosen_ids[:prompt_len]`, already in the run's chat format; half single-turn).
    eval_result: a `dpo.evaluate.EvalResult` of the same run, or None. Its log-probs are
        copied as they are; they are per-token means when the run's reduction is "mean"
        and per-answer sums with "sum". Pass the run's `logp_reduction`: it is recorded in
        the dict, and `assess` judges the per-token bound only for "mean".
    stop_ids: ids that end an answer (default: `tokenizer.stop_token_ids` plus EOS).

    Returns (health, samples). health is flat, with keys
        n_samples, single_turn, empty_skipped (`sample_prompts`), max_new_tokens, logp_reduction,
        {policy,reference}_{chosen,rejected}_logp                    (when eval_result is given)
        {policy,reference}_sample_{mean_length,ended_share,loop_share,empty_share,distinct_2}
                                                  (`dpo.answers.text_stats`)
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
