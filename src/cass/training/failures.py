"""What a training loop does when the loss stops being a number: one policy for pretraining and fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept and the message says how to go on."""


def check_finite_loss(loss: float, epoch: int, checkpoint: Path, last_good_epoch: int, advice: str,
                      resume: str) -> None:
    """Stop with a message naming the epoch, what is kept and how to go on, instead of training on NaN.

    ``resume`` is how this loop's command continues a run (``--resume RUN_DIR`` for pretraining, the
    same command with ``--resume`` for fine-tuning).
    """
    if math.isfinite(loss):
        return
    kept = (f"{checkpoint} still holds the last good epoch ({last_good_epoch})" if last_good_epoch > 0
            else "nothing was saved (it was the first epoch)")
    then = f"then {resume}" if last_good_epoch > 0 else "then run it again"
    raise NonFiniteLossError(f"loss became {loss} in epoch {epoch}; stopped. {kept}; {advice}, {then}")
