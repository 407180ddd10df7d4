"""Build the embedded default model: a byte-level BPE tokenizer and a small Llama trained on the corpus.

    python -m trainer.tiny.build --out DIR --seed 0     (or: pairloop model build-tiny)

The recipe is nanoGPT-sized on purpose: a 4-layer Llama with head_dim 64 (vLLM's CPU attention kernel
rejects 16) and a 1024-token vocabulary, trained for a fixed number of AdamW steps on packed blocks of the
templated corpus. A fixed step count (not a time budget) keeps the build reproducible for a seed; it was
chosen so that the build stays under five minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.tiny import corpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

#: Bump when the recipe changes in a way the config fields do not capture (it is part of the cache key).
RECIPE_VERSION = 2

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
EOS = "<|end|>"
PAD = "<|pad|>"

# The same layout the corpus is trained on; `add_generation_prompt` opens the assistant's turn.
# The layout the corpus is trained on; `add_generation_prompt` opens the assistant's turn. No `{%-`/`-%}`:
# they would strip the newlines that are part of the layout (a test checks this against `render_chat`).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """`CHAT_TEMPLATE` in Python: the corpus is rendered before the tokenizer (which carries the template) exists."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class TinyModelConfig:
    """How the tiny model is built. Every field is part of the cache key."""

    seed: int = field(default=0, metadata={"help": "Seed of the corpus, the initial weights and the batches."})
    conversations: int = field(default=20_000, metadata={"help": "Conversations in the generated corpus."})
    vocab_size: int = field(default=1024, metadata={"help": "Byte-level BPE vocabulary size."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    layers: int = field(default=4, metadata={"help": "Decoder layers."})
    heads: int = field(default=2, metadata={"help": "Attention heads; hidden_size / heads must be 64."})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width."})
    max_positions: int = field(default=256, metadata={"help": "Context length the model (and vLLM) accepts."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training sequence."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per optimizer step."})
    steps: int = field(default=600, metadata={"help": "AdamW steps (fixed, for reproducibility)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (cosine decay)."})

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads or self.hidden_size // self.heads != 64:
            raise ValueError("hidden_size / heads must be 64: vLLM's CPU attention rejects other head sizes")
        if self.block_size > self.max_positions:
            raise ValueError("block_size must not exceed max_positions")

    def cache_key(self) -> str:
        """A short hash that names a build of this recipe."""
        blob = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def default_model_dir(data_dir: Path, config: TinyModelConfig | None = None) -> Path:
    """Where the tiny model of `config` lives under a data directory."""
    config = config or TinyModelConfig()
    return data_dir / "models" / f"tiny-{config.cache_key()}-s{config.seed}"


def is_built(out: Path) -> bool:
    """Whether `out` holds a complete build (the marker file is written last)."""
    return (out / "pairloop-build.json").is_file()


def ensure_built(out: Path, config: TinyModelConfig | None = None) -> Path:
    """Build into `out` unless a complete build is already there."""
    if not is_built(out):
        build(out, config or TinyModelConfig())
    return out


def _train_tokenizer(texts: list[str], config: TinyModelConfig) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=config.max_positions,
    )


def build(out: Path, config: TinyModelConfig) -> dict[str, object]:
    """Build the model into `out` atomically (a temporary directory renamed at the end)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.time()
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    examples = list(corpus.generate(config.conversations, config.seed))
    texts = [render_chat(ex.messages()) for ex in examples]
    tokenizer = _train_tokenizer(texts, config)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    data = torch.tensor(ids, dtype=torch.long)
    log.info("corpus: %d conversations, %d tokens", len(texts), len(ids))

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        head_dim=config.hidden_size // config.heads,
        max_position_embeddings=config.max_positions,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(model_config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(config.seed)
    n_blocks = (len(data) - 1) // config.block_size
    warmup = max(1, config.steps // 20)
    loss_value = math.nan
    for step in range(config.steps):
        lr = config.learning_rate * min(1.0, (step + 1) / warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / config.steps)) * 0.9 + 0.1
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n_blocks, (config.batch_size,), generator=gen) * config.block_size
        batch = torch.stack([data[s : s + config.block_size] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if step % 50 == 0 or step == config.steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step, config.steps, loss_value, time.time() - started)
    if not math.isfinite(loss_value):
        raise RuntimeError(f"tiny model training diverged (loss {loss_value})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.eval()
        model.generation_config = GenerationConfig(
            eos_token_id=model_config.eos_token_id, pad_token_id=model_config.pad_token_id
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info: dict[str, object] = {
            "config": dataclasses.asdict(config),
            "recipe": RECIPE_VERSION,
            "final_loss": loss_value,
            "tokens": len(ids),
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.time() - started, 1),
        }
        (tmp / "pairloop-build.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s in %.0f s (final loss %.3f)", out, time.time() - started, loss_value)
    return info
