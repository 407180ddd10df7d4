"""Does a pairloop round train as fast as plain TRL? Measured side by side in one run.

    .venv/bin/python bench/train.py [--rows 256] [--repeats 3] [--model DIR]   (make bench)

On the same model, data and settings, alternating which goes first:
  plain   a plain TRL script: `get_peft_model` + `DPOTrainer(...).train()`
  round   pairloop's `trainer.round.train` (the same trainer, reference = base with the adapter off)
Prints seconds per optimizer step for each (median over the repeats), their ratio (goal <= 1.05), and
examples per second; then the cost of a whole round around the training (model load, the gate's scoring
and length check, saving) from `trainer.round.run_round`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pairs import pick_model  # noqa: E402
from trainer.data import RoundData  # noqa: E402
from trainer.round import load_model, lora_config, run_round, train  # noqa: E402
from trainer.settings import TrainConfig, TrainerSettings  # noqa: E402
from trainer.tiny import corpus  # noqa: E402


def make_rows(n: int) -> list[dict[str, Any]]:
    """Pairs from the corpus' prompts: a polite answer over a curt one."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        ex = corpus.make_example(rng)
        rows.append(
            {
                "prompt": [{"role": "user", "content": ex.prompt}],
                "chosen": [{"role": "assistant", "content": f"Thank you for asking! {ex.answer} Hope this helps."}],
                "rejected": [{"role": "assistant", "content": ex.answer.split(".")[0] + "."}],
                "completion_id": f"c{i}",
                "feedback_id": f"f{i}",
                "judge": f"k:u{i}",
            }
        )
    return rows


def plain_trl(model_dir: str, rows: list[dict[str, Any]], config: TrainConfig, out: Path) -> tuple[float, int]:
    """(train seconds, steps) of the textbook TRL script."""
    import datasets
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(model, lora_config(config))
    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        beta=config.beta,
        max_length=config.max_length,
        seed=config.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started, trainer.state.global_step


def pairloop_round(
    model_dir: str, rows: list[dict[str, Any]], settings: TrainerSettings, out: Path
) -> tuple[float, int]:
    data = RoundData("dpo", rows, [], len(rows), 0, 0, None)
    model, tokenizer = load_model(model_dir, None, settings)
    figures = train(model, tokenizer, data, settings, out)
    return figures["train_seconds"], figures["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="model dir or id (default: the tiny model)")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    model = pick_model(args.model)
    rows = make_rows(args.rows)
    tmp = Path(tempfile.mkdtemp(prefix="pairloop-bench-train-"))
    settings = TrainerSettings(data_dir=tmp, model=model, gate_length_prompts=8)
    per_step: dict[str, list[float]] = {"plain": [], "round": []}
    steps = 0
    for i in range(args.repeats):
        order = ["plain", "round"] if i % 2 == 0 else ["round", "plain"]
        for which in order:
            out = tmp / f"{which}{i}"
            if which == "plain":
                seconds, steps = plain_trl(model, rows, settings.train, out)
            else:
                seconds, steps = pairloop_round(model, rows, settings, out)
            per_step[which].append(seconds / steps)
            print(f"  {which:<6} repeat {i}: {seconds:.2f} s, {steps} steps", flush=True)
    plain = statistics.median(per_step["plain"])
    ours = statistics.median(per_step["round"])
    print(f"rows {args.rows}, batch {settings.train.batch_size}, epochs {settings.train.epochs}, steps {steps}")
    print(
        f"seconds per step: plain TRL {plain:.4f}, pairloop round {ours:.4f}, ratio {ours / plain:.3f} (goal <= 1.05)"
    )
    rate = {k: args.rows * settings.train.epochs / (v * steps) for k, v in (("plain", plain), ("round", ours))}
    print(f"examples per second: plain TRL {rate['plain']:.1f}, pairloop round {rate['round']:.1f}")

    held = make_rows(args.rows + 64)[args.rows :]
    started = time.perf_counter()
    result = run_round(RoundData("dpo", rows, held, len(rows), 0, 0, None), None, 1, settings)
    whole = time.perf_counter() - started
    train_s = result.metrics["train_seconds"]
    print(
        f"a whole round: {whole:.2f} s, of which training {train_s:.2f} s; load, gate ({len(held)} held-out pairs, "
        f"{settings.gate_length_prompts} generations per adapter) and save {whole - train_s:.2f} s; "
        f"gate passed: {result.decision.passed}"
    )


if __name__ == "__main__":
    main()
