"""Release 0.1's names of the learning loop's jobs, kept for one release: a check or a round queued by a 0.1
gateway, cron or `pairloop train` (`workers.training.check`, `workers.training.train_round`) still runs after an
upgrade. The jobs themselves live in `trainer/loop.py`; remove this module in release 0.3."""

from __future__ import annotations

from trainer.loop import check, train_round

__all__ = ["check", "train_round"]
