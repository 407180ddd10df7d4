"""One training round: continue the champion's LoRA adapter with DPO (or KTO), score it against the champion
on held-out feedback, and write it, named immutably, under the data dir.

The reference model is the base model with the adapter disabled: no second copy of the weights. TRL 1.16,
given a model that already carries an adapter, would add a `ref` adapter copied from it (dpo_trainer.py,
"create a 'ref' adapter that is a copy of the 'default' adapter"); the round deletes that copy, so every
adapter's implicit reward is measured against the same base, and the champion's and the candidate's
held-out accuracies can be compared.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.data import RoundData, Row
from trainer.errors import RoundFailed, RoundOverBudget
from trainer.registry import adapter_name
from trainer.settings import TrainConfig, TrainerSettings

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CANDIDATE = "default"
CHAMPION = "champion"


@dataclass
class Scores:
    """Held-out figures of one adapter (rewards relative to the base model)."""

    accuracy: float
    margin: float
    mean_length: float

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "margin": self.margin, "mean_length": self.mean_length}


@dataclass
class Decision:
    passed: bool
    reasons: list[str]
    candidate: Scores
    champion: Scores
    length_ratio: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": self.reasons,
            "candidate": self.candidate.as_dict(),
            "champion": self.champion.as_dict(),
            "length_ratio": self.length_ratio,
        }


@dataclass
class RoundResult:
    name: str
    path: Path
    decision: Decision
    metrics: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    out = {}
    for dist in ("trl", "peft", "transformers", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "?"
    return out


def base_model_path(settings: TrainerSettings) -> str:
    if settings.model:
        return settings.model
    from trainer.tiny.build import default_model_dir, is_built

    path = default_model_dir(settings.data_dir)
    if not is_built(path):
        raise RoundFailed(f"the base model is not built yet ({path}); `pairloop up` builds it")
    return str(path)


def limit_threads(threads: int) -> None:
    """At most `threads` CPU threads for torch's operations in this process (0: leave torch's default)."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def lora_config(config: TrainConfig) -> LoraConfig:
    """A round's fresh LoRA weights, as `config` shapes them."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )


def load_model(base: str, parent: Path | None, settings: TrainerSettings) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base model with a trainable adapter: the champion's (a copy of it) or a fresh one."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = settings.train
    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if parent is not None:
        peft_model = PeftModel.from_pretrained(model, str(parent), adapter_name=CANDIDATE, is_trainable=True)
        peft_model.load_adapter(str(parent), adapter_name=CHAMPION, is_trainable=False)
        peft_model.set_adapter(CANDIDATE)
    else:
        peft_model = get_peft_model(model, lora_config(config), adapter_name=CANDIDATE)
    return peft_model, tokenizer


def _train_columns(rows: list[Row], method: str) -> list[Row]:
    keep = ("prompt", "chosen", "rejected") if method == "dpo" else ("prompt", "completion", "label")
    return [{k: r[k] for k in keep} for r in rows]


def _past(deadline: float | None, what: str, settings: TrainerSettings) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise RoundOverBudget(f"the round ran past its budget of {settings.round_budget_s} s {what}")


def _budget_callback(deadline: float | None) -> Any:
    """A TRL/transformers callback that ends training at the first step past `deadline` (`stopped` says so)."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        stopped = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if deadline is not None and time.monotonic() > deadline:
                self.stopped = True
                control.should_training_stop = True
            return control

    return Budget()


def train(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: RoundData,
    settings: TrainerSettings,
    out: Path,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Train the candidate adapter in place; the training figures. Past `deadline` (time.monotonic()) it stops
    at the end of the step and raises RoundOverBudget."""
    import datasets
    import torch

    config = settings.train
    dataset = datasets.Dataset.from_list(_train_columns(data.train, data.method))
    common: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": max(config.batch_size, 2 if data.method == "kto" else 1),
        "num_train_epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "beta": config.beta,
        "max_length": config.max_length,
        "seed": config.seed,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    if data.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        loss_args: dict[str, Any] = {"loss_type": [config.loss_type]}
        if config.sft_weight > 0:  # TRL combines the listed losses with these weights
            loss_args = {"loss_type": [config.loss_type, "sft"], "loss_weights": [1.0, config.sft_weight]}
        args = DPOConfig(**common, **loss_args, label_smoothing=config.label_smoothing)
        trainer: Any = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        from trl import KTOConfig, KTOTrainer

        trainer = KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")  # the reference is the base model (see the module's docstring)
    trainer.model.set_adapter(CANDIDATE)
    budget = _budget_callback(deadline)
    trainer.add_callback(budget)
    started = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - started
    if budget.stopped:
        steps = f"{trainer.state.global_step} of {trainer.state.max_steps}"
        raise RoundOverBudget(
            f"the round ran past its budget of {settings.round_budget_s} s and stopped after {steps} training steps"
        )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    loss = float(result.training_loss)
    if settings.inject_failure == "nan":
        loss = float("nan")
    steps = max(1, trainer.state.global_step)
    return {
        "method": data.method,
        "loss": loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "train_seconds": round(elapsed, 3),
        "seconds_per_step": round(elapsed / steps, 4),
        "examples_per_second": round(len(data.train) * config.epochs / elapsed, 2) if elapsed else None,
    }


# -- the gate ---------------------------------------------------------------------------------------


def _encode(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]], answer: str, max_length: int
) -> tuple[list[int], int]:
    """Token ids of prompt + answer (as the chat template lays them out) and where the answer starts."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    assert isinstance(head, str) and isinstance(full, str)
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[-max_length:]
    return ids, max(0, len(ids) - len(answer_ids))


def _using(model: PeftModel, adapter: str | None) -> contextlib.AbstractContextManager[Any]:
    """`adapter` active for the block; None: the base model (adapters disabled)."""
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def _logps(model: PeftModel, batch: list[tuple[list[int], int]], adapter: str | None) -> list[float]:
    """Sum of log-probabilities of each answer, under `adapter` (None: the base model)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    with torch.no_grad(), _using(model, adapter):
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = []
    for i, (ids, start) in enumerate(batch):
        out.append(float(logp[i, max(0, start - 1) : len(ids) - 1].sum()))
    return out


def _rewards(model: PeftModel, encoded: list[tuple[list[int], int]], adapter: str | None, beta: float) -> list[float]:
    if adapter is None:
        return [0.0] * len(encoded)
    out: list[float] = []
    for i in range(0, len(encoded), 16):
        batch = encoded[i : i + 16]
        policy = _logps(model, batch, adapter)
        base = _logps(model, batch, None)
        out += [beta * (p - b) for p, b in zip(policy, base, strict=True)]
    return out


def _mean_length(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict[str, str]]], adapter: str | None
) -> float:
    """Mean length in tokens of greedy answers to `prompts`."""
    import torch

    if not prompts:
        return 0.0
    device = next(model.parameters()).device
    lengths = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad(), _using(model, adapter):
            out = model.generate(input_ids=ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        lengths.append(out.shape[1] - ids.shape[1])
    return sum(lengths) / len(lengths)


def score(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Row],
    method: str,
    adapter: str | None,
    settings: TrainerSettings,
) -> Scores:
    config = settings.train
    prompts: list[list[dict[str, str]]] = []
    seen: set[str] = set()
    for r in rows:
        key = json.dumps(r["prompt"])
        if key not in seen and len(prompts) < settings.gate_length_prompts:
            seen.add(key)
            prompts.append(r["prompt"])
    mean_length = _mean_length(model, tokenizer, prompts, adapter)
    if not rows:
        return Scores(0.0, 0.0, mean_length)
    if method == "dpo":
        chosen = [_encode(tokenizer, r["prompt"], r["chosen"][0]["content"], config.max_length) for r in rows]
        rejected = [_encode(tokenizer, r["prompt"], r["rejected"][0]["content"], config.max_length) for r in rows]
        rc = _rewards(model, chosen, adapter, config.beta)
        rr = _rewards(model, rejected, adapter, config.beta)
        accuracy = sum(c > r for c, r in zip(rc, rr, strict=True)) / len(rows)
        margin = sum(c - r for c, r in zip(rc, rr, strict=True)) / len(rows)
    else:
        encoded = [_encode(tokenizer, r["prompt"], r["completion"][0]["content"], config.max_length) for r in rows]
        rewards = _rewards(model, encoded, adapter, config.beta)
        labels = [bool(r["label"]) for r in rows]
        accuracy = sum((x > 0) if y else (x < 0) for x, y in zip(rewards, labels, strict=True)) / len(rows)
        good = [x for x, y in zip(rewards, labels, strict=True) if y] or [0.0]
        bad = [x for x, y in zip(rewards, labels, strict=True) if not y] or [0.0]
        margin = sum(good) / len(good) - sum(bad) / len(bad)
    return Scores(accuracy, margin, mean_length)


def gate(candidate: Scores, champion: Scores, loss: float, settings: TrainerSettings, eval_rows: int) -> Decision:
    reasons = []
    if not math.isfinite(loss):
        reasons.append(f"the training loss is not finite ({loss})")
    if eval_rows == 0:
        reasons.append("no held-out examples to judge the candidate on")
    if candidate.accuracy < champion.accuracy:
        reasons.append(f"held-out accuracy {candidate.accuracy:.3f} is below the champion's {champion.accuracy:.3f}")
    if candidate.accuracy < settings.gate_min_accuracy:
        reasons.append(f"held-out accuracy {candidate.accuracy:.3f} is below the floor {settings.gate_min_accuracy}")
    if not candidate.margin > 0:
        reasons.append(f"the held-out reward margin {candidate.margin:.4f} is not positive")
    ratio = max(candidate.mean_length, 1.0) / max(champion.mean_length, 1.0)
    bound = settings.gate_max_length_ratio
    if not 1 / bound <= ratio <= bound:
        reasons.append(f"mean answer length moved by a factor {ratio:.2f} (bound {bound})")
    return Decision(not reasons, reasons, candidate, champion, round(ratio, 4))


# -- the round --------------------------------------------------------------------------------------


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def run_round(
    data: RoundData,
    parent: tuple[str, Path] | None,
    version: int,
    settings: TrainerSettings,
    deadline: float | None = None,
) -> RoundResult:
    """Train, score and save one candidate adapter. Raises `RoundFailed` when no adapter could be made, and its
    `RoundOverBudget` when it runs past `deadline` (time.monotonic(); checked at every training step and between
    the gate's phases)."""
    started = time.time()
    if settings.inject_failure == "error":
        raise RoundFailed("injected failure (PAIRLOOP_INJECT_FAILURE=error)")
    if not data.train:
        raise RoundFailed("the round has no training examples")
    base = base_model_path(settings)
    root = settings.adapters_dir()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".round-", dir=root))
    try:
        limit_threads(settings.train_threads)
        model, tokenizer = load_model(base, parent[1] if parent else None, settings)
        _past(deadline, "loading the model", settings)
        figures = train(model, tokenizer, data, settings, work / "trainer", deadline)
        model.eval()
        champion_adapter = CHAMPION if parent else None
        _past(deadline, "after training", settings)
        candidate_scores = score(model, tokenizer, data.eval, data.method, CANDIDATE, settings)
        _past(deadline, "scoring the candidate", settings)
        champion_scores = score(model, tokenizer, data.eval, data.method, champion_adapter, settings)
        _past(deadline, "scoring the champion", settings)
        decision = gate(candidate_scores, champion_scores, figures["loss"], settings, len(data.eval))
        staged = work / "adapter"
        model.save_pretrained(str(staged), selected_adapters=[CANDIDATE])
        name = adapter_name(version, _digest(staged))
        metadata = {
            "name": name,
            "version": version,
            "parent": parent[0] if parent else None,
            "base_model": base,
            "examples": data.summary(),
            "example_ids": sorted(r["feedback_id"] for r in data.train),
            "config": settings.train.as_dict(),
            "metrics": figures,
            "gate": decision.as_dict(),
            "versions": versions(),
            "started_at": started,
            "finished_at": time.time(),
        }
        (staged / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
        final = root / name
        os.replace(staged, final)  # atomic: a reader sees no directory or a complete one
        log.info("round made %s: %s", name, "passed the gate" if decision.passed else f"rejected: {decision.reasons}")
        return RoundResult(name, final, decision, {**figures, **data.summary(), "gate": decision.as_dict()})
    except RoundFailed:
        raise
    except Exception as exc:
        log.exception("training round failed")
        raise RoundFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
