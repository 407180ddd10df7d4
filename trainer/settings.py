"""Settings of the learning loop: what a round trains with (`TrainConfig`) and when rounds run, what they
train on and what they must pass (`TrainerSettings`, environment prefix `PAIRLOOP_`).

`TrainConfig` is a dataclass whose fields document themselves, as TRL's `DPOConfig` does; its defaults work
on the embedded tiny model on a CPU and on a real model on a GPU (LoRA rank 16 on the attention projections,
a learning rate usual for LoRA, two epochs over a round's few hundred examples). Override one field with
`PAIRLOOP_TRAIN__<FIELD>`, for example `PAIRLOOP_TRAIN__BETA=0.2`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from serving.settings import ENV_PREFIX, PairloopSettings

LossType = Literal["sigmoid", "robust", "ipo", "hinge"]
Method = Literal["auto", "dpo", "kto"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training round."""

    method: Method = field(
        default="auto",
        metadata={
            "help": "`dpo` trains on pairs, `kto` on unpaired thumbs; `auto` takes DPO when the round has at least "
            "`min_pairs` pairs, else KTO (see docs/LEARNING.md for why one loss per round)."
        },
    )
    min_pairs: int = field(default=16, metadata={"help": "Pairs `auto` needs to choose DPO."})
    beta: float = field(
        default=0.1, metadata={"help": "Strength of the pull towards the reference (the base model, adapter off)."}
    )
    loss_type: LossType = field(
        default="sigmoid",
        metadata={
            "help": "DPO loss: `sigmoid` (the paper's), `robust` (noisy labels, with `label_smoothing`), `ipo`, "
            "`hinge`."
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed share of flipped labels, for the `robust` loss; in [0, 0.5)."}
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a negative log-likelihood term on the chosen answers added to the DPO loss (RPO); "
            "keeps samples fluent when DPO alone would push both answers down. 0: plain DPO."
        },
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the LoRA weights."})
    epochs: float = field(default=2.0, metadata={"help": "Passes over the round's training examples."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step (KTO needs at least 2)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; at most the vLLM server's `--max-lora-rank`."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"),
        metadata={"help": "Modules that get LoRA weights (names in the base model; vLLM supports these)."},
    )
    max_length: int = field(default=512, metadata={"help": "Longest prompt + answer in tokens; longer is cut."})
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA init, the shuffling and the data split."})

    def __post_init__(self) -> None:
        if self.loss_type == "robust" and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must lie in [0, 0.5) for the robust loss")
        if self.sft_weight < 0:
            raise ValueError("sft_weight must not be negative")
        if self.batch_size < 1 or self.lora_r < 1 or self.epochs <= 0 or self.learning_rate <= 0:
            raise ValueError("batch_size, lora_r, epochs and learning_rate must be positive")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each field's help text, by name."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


class TrainerSettings(PairloopSettings):
    """When rounds run, what they train on, the gate they must pass and the live A/B test after it."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore")

    training_queue: str = Field("pairloop-training", pattern=r"^[A-Za-z0-9_.-]+$", description="RQ queue of rounds.")
    control_queue: str = Field(
        "pairloop-control",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="RQ queue of the periodic checks (the training worker takes it).",
    )
    check_interval_s: int = Field(30, ge=1, description="How often the cron job looks for enough new examples.")
    min_new_examples: int = Field(64, ge=1, description="Usable new examples that start a round.")
    round_timeout_s: int = Field(
        3600, ge=60, description="Longest a round's job may run: RQ kills it then (the budget below stops it first)."
    )
    round_budget_s: int = Field(
        1800,
        ge=1,
        description="Wall-clock budget of a round: one still training or scoring then stops, is marked "
        "`over_budget`, and leaves the champion as it was. Below `round_timeout_s`.",
    )
    max_round_examples: int = Field(
        512,
        ge=8,
        description="Most training rows one round takes: the newest pending examples plus their replay share; "
        "the older pending ones wait for the next round (the backlog).",
    )
    max_backlog: int = Field(
        512,
        ge=0,
        description="Most pending feedback events left waiting after a round; older ones join the replay pool "
        "instead, so that under more votes than rounds can train the backlog stays bounded and rounds train on "
        "fresh ones.",
    )
    train_threads: int = Field(
        1,
        ge=0,
        description="CPU threads a round's torch may use (0: torch's default, every core). On a machine shared with "
        "vLLM's CPU engine, few threads leave serving its cores.",
    )
    train_priority: Literal["idle"] | Annotated[int, Field(ge=0, le=19)] = Field(
        "idle",
        description="CPU priority of the training worker: `idle` (Linux's SCHED_IDLE: it runs on CPU time that "
        "serving leaves, and gives way the moment a request's thread wakes), or a nice value 0-19 (0: as serving).",
    )
    replay_fraction: float = Field(
        0.5, ge=0, le=10, description="Older examples replayed per new one (guards against forgetting)."
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of completions held out for the gate (by a hash of the completion id)."
    )
    max_user_share: float = Field(
        0.1, gt=0, le=1, description="Largest share of a round's training examples from one judge (key and user)."
    )
    max_key_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Largest share of a round's training examples from one API key, whatever users it names "
        "(applies when examples came through more than one key).",
    )
    max_eval_examples: int = Field(256, ge=8, description="Held-out examples the gate scores at most.")
    gate_min_accuracy: float = Field(
        0.5, ge=0, le=1, description="Floor of the candidate's held-out preference accuracy."
    )
    gate_max_length_ratio: float = Field(
        1.5, gt=1, description="Bound on mean answer length, candidate over champion (and its inverse)."
    )
    gate_length_prompts: int = Field(16, ge=1, description="Held-out prompts answered to measure the length drift.")
    ab_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of two-choice requests that pit the challenger against the champion."
    )
    ab_min_votes: int = Field(30, ge=1, description="Live votes a challenger needs before it can be promoted.")
    ab_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Largest chance of promoting a challenger that is no better, however often the test looks "
        "(the mixture SPRT's level: promote at evidence >= 1/alpha).",
    )
    ab_confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Level of the Wilson interval shown beside the record (it does not decide)."
    )
    ab_max_votes: int = Field(
        300, ge=1, description="Live votes after which a challenger that has not won is retired (no clear difference)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Hyperparameters (`PAIRLOOP_TRAIN__<FIELD>`).")
    inject_failure: Literal["", "error", "nan"] = Field(
        "", description="Testing only: make every round fail (`error`) or produce a non-finite loss (`nan`)."
    )

    @model_validator(mode="after")
    def _budget_under_timeout(self) -> TrainerSettings:
        if self.round_budget_s >= self.round_timeout_s:
            raise ValueError(
                f"round_budget_s ({self.round_budget_s}) must be below round_timeout_s ({self.round_timeout_s}): "
                "a round stops itself at its budget, RQ kills it at the timeout"
            )
        return self

    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @field_validator("train", mode="before")
    @classmethod
    def _targets(cls, value: object) -> object:
        if isinstance(value, dict) and isinstance(value.get("lora_targets"), str):
            value = {**value, "lora_targets": tuple(t.strip() for t in value["lora_targets"].split(",") if t.strip())}
        return value
