"""Stop a run that has diverged instead of training on (or saving) garbage; exit code 3.

Diverged: the step's loss or gradient norm is not finite, or the model has collapsed to the uniform
distribution (loss at ln(vocabulary) with a zero gradient: nothing can train it back). The loss of step s is
computed with the weights after step s-1, so when it is bad the checkpoint of step s-1 holds bad weights too:
such checkpoints are moved aside (renamed `diverged-step-N`, never deleted) and `latest` names the newest
good one.
"""

from __future__ import annotations

import math
from pathlib import Path

from sft.checkpoint import set_aside_diverged

DIVERGED_EXIT_CODE = 3
COLLAPSE_TOLERANCE = 0.01  # relative distance of the loss from ln(vocabulary)
ZERO_GRAD = 1e-12


class Diverged(Exception):
    """The run stopped because training diverged; the CLI prints the message and exits with code 3."""


def check_step(
    output_dir: Path, step: int, loss: float, grad_norm: float, vocab_size: int | None, is_main: bool
) -> None:
    """Raise Diverged (every rank: the values are global) when step `step` shows divergence."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        uniform = math.log(vocab_size) if vocab_size else None
        if uniform is None or grad_norm > ZERO_GRAD or abs(loss - uniform) > COLLAPSE_TOLERANCE * uniform:
            return
        what = (
            f"collapsed at step {step}: loss {loss:.4f} = ln(vocabulary size {vocab_size}) with gradient norm "
            f"{grad_norm:.1e}, the model predicts the uniform distribution and cannot learn back"
        )
        first_bad = step - 1
    elif math.isfinite(
        loss
    ):  # the gradient overflowed: this step's update is bad, the weights before it fine
        what = f"diverged at step {step}: gradient norm {grad_norm}"
        first_bad = step
    else:
        what = f"diverged at step {step}: loss {loss}, gradient norm {grad_norm}"
        first_bad = step - 1
    if not is_main:
        raise Diverged(f"training {what}")
    good, moved = set_aside_diverged(output_dir, first_bad)
    kept = f"last good checkpoint: {good}" if good else "no good checkpoint was saved before it"
    aside = f" ({', '.join(moved)} held the diverged weights: renamed, not used)" if moved else ""
    raise Diverged(
        f"training {what}; {kept}{aside}; lower optim.lr or set optim.max_grad_norm, then resume=true "
        "resume_changes=allow (or start over)"
    )
