"""What a training loop does when the loss stops being a number: one policy for pretraining and fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept and the message says how to go on."""


def check_finite_loss(loss: float, epoch: int, run_dir: Path, checkpoint: Path, last_good_epoch: int,
                      advice: str = "lower --lr or check the data") -> None:
    """Stop with a message naming the run, the epoch and how to resume, instead of training on NaN."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss} in epoch {epoch}; stopped. {checkpoint} still holds the last good epoch "
            f"({last_good_epoch}); {advice}, then --resume {run_dir}"
        )
