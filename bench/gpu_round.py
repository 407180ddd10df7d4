"""One training round of `trainer/` on a randomly initialised model of about 0.5B parameters: step time and peak
memory, to size the trainer's share of a GPU (docs/DEPLOY.md, "Sizing").

    .venv/bin/python bench/gpu_round.py                      # 0.5B (hidden 1024, 28 layers), on CUDA if present
    .venv/bin/python bench/gpu_round.py --layers 2 --hidden 256 --rows 16    # a quick check on a CPU

The model is a Llama of the given shape with the tiny model's tokenizer (no download), saved to a temporary
directory in bf16 on a GPU (float32 on a CPU), then trained by `trainer.round.run_round` exactly as a round of the
service is: LoRA DPO through TRL, the gate's scoring and length check, the adapter saved. Needs torch,
transformers, peft, TRL and datasets (the `train` extra); vLLM is not used.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pairs import pick_model  # noqa: E402
from bench.train import make_rows  # noqa: E402
from trainer.data import RoundData  # noqa: E402
from trainer.round import run_round  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402


def build_random_model(out: Path, tokenizer_dir: str, hidden: int, layers: int, intermediate: int) -> int:
    """A randomly initialised Llama of this shape with `tokenizer_dir`'s tokenizer, saved to `out`; its size."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 4.25 x hidden")
    parser.add_argument("--rows", type=int, default=64, help="preference pairs to train on (held out: a quarter)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="pairloop-bench-gpu-round-"))
    intermediate = args.intermediate or int(args.hidden * 4.25) // 64 * 64
    params = build_random_model(tmp / "model", pick_model(None), args.hidden, args.layers, intermediate)
    rows = make_rows(args.rows + args.rows // 4)
    train_rows, held = rows[: args.rows], rows[args.rows :]
    settings = TrainerSettings.model_validate(
        {
            "data_dir": tmp,
            "model": str(tmp / "model"),
            "gate_length_prompts": 4,
            "train": {"batch_size": args.batch_size, "max_length": args.max_length, "epochs": 1},
        }
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run_round(RoundData("dpo", train_rows, held, len(train_rows), 0, 0, None), None, 1, settings)
    whole = time.perf_counter() - started
    device = torch.cuda.get_device_name() if cuda else "cpu"
    if cuda:
        peak = f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        peak += f" (reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB)"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        peak = f"peak resident memory of this process {rss:.2f} GiB"
    m = result.metrics
    print(f"device: {device}; model: {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers)")
    print(
        f"round: {args.rows} pairs, batch {args.batch_size}, max length {args.max_length}: {m['steps']} steps, "
        f"{m['seconds_per_step']:.3f} s per step, training {m['train_seconds']:.1f} s, whole round {whole:.1f} s"
    )
    print(peak)


if __name__ == "__main__":
    main()
