"""A time budget for a training run of whole epochs: how many epochs fit, and when to stop (plain Python; the caller
owns the clock and passes elapsed seconds in).

``EpochBudget(budget_seconds, steps_per_epoch, max_epochs, warmup_steps)`` keeps a projection of the run's length
that the schedules (learning rate, EMA momentum, teacher temperature) span:

- before any measurement: ``max_epochs`` (the configured epochs are the cap);
- after ``CALIBRATION_STEPS`` steps of the first epoch (``observe_steps``): ``seconds_per_epoch = elapsed / steps x
  steps_per_epoch`` and ``projected_epochs = clamp(floor(budget / seconds_per_epoch), 1, max_epochs)``;
- at the end of each epoch (``end_epoch(epochs_done, elapsed)``): ``seconds_per_epoch = elapsed / epochs_done``
  (the mean so far, earlier epochs' end-of-epoch work included), the run goes on iff ``epochs_done < max_epochs`` and
  ``elapsed + seconds_per_epoch <= budget`` (the next epoch would not cross the budget), and
  ``projected_epochs = epochs_done + floor((budget - elapsed) / seconds_per_epoch)`` clamped to
  ``[epochs_done + 1, max_epochs]`` (``epochs_done`` when it stops).

``total_steps = projected_epochs x steps_per_epoch`` and ``warmup_steps = round(warmup_steps_full x projected_epochs /
max_epochs)`` (``warmup_steps_full``: the warm-up of the full ``max_epochs`` run): the warm-up keeps its share of the
run. The first epoch always runs, even when it alone exceeds the budget
(``first_epoch_over``). Without a budget (``budget_seconds=None``) the projection is ``max_epochs`` throughout and
``end_epoch`` stops only after the last epoch.
"""

from __future__ import annotations

import math

CALIBRATION_STEPS = 3
"""Steps of the first epoch timed before the first projection (the very first step pays one-off start-up)."""


class EpochBudget:
    """The projection and stop rule of the module docstring."""

    def __init__(self, budget_seconds: float | None, steps_per_epoch: int, max_epochs: int,
                 warmup_steps: int = 0) -> None:
        if budget_seconds is not None and budget_seconds <= 0:
            raise ValueError(f"budget_seconds={budget_seconds} must be positive")
        if steps_per_epoch < 1 or max_epochs < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} and max_epochs={max_epochs} must be positive")
        if not 0 <= warmup_steps <= steps_per_epoch * max_epochs:
            raise ValueError(f"warmup_steps={warmup_steps} is out of range [0, {steps_per_epoch * max_epochs}]")
        self.budget_seconds, self.steps_per_epoch, self.max_epochs = budget_seconds, steps_per_epoch, max_epochs
        self.warmup_steps_full = warmup_steps
        self.projected_epochs = max_epochs
        self.epochs_done = 0
        self.elapsed_seconds = 0.0
        self.stopped = False

    @property
    def total_steps(self) -> int:
        return self.projected_epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_steps_full * self.projected_epochs / self.max_epochs)

    @property
    def first_epoch_over(self) -> bool:
        """The first epoch alone took longer than the budget (it ran anyway: a run has at least one epoch)."""
        return self.budget_seconds is not None and self.epochs_done == 1 and self.elapsed_seconds > self.budget_seconds

    def observe_steps(self, steps_in_first_epoch: int, elapsed_seconds: float) -> None:
        """First epoch only: after ``CALIBRATION_STEPS`` steps, the first projection from their pace."""
        if self.budget_seconds is None or self.epochs_done > 0 or steps_in_first_epoch != CALIBRATION_STEPS:
            return
        seconds_per_epoch = max(elapsed_seconds, 1e-9) / steps_in_first_epoch * self.steps_per_epoch
        self.projected_epochs = min(self.max_epochs, max(1, math.floor(self.budget_seconds / seconds_per_epoch)))

    def end_epoch(self, epochs_done: int, elapsed_seconds: float) -> bool:
        """Record ``epochs_done`` epochs in ``elapsed_seconds`` (of budget used); True iff another epoch runs."""
        self.epochs_done, self.elapsed_seconds = epochs_done, elapsed_seconds
        if epochs_done >= self.max_epochs:
            self.stopped, self.projected_epochs = True, epochs_done
            return False
        if self.budget_seconds is None:
            return True
        seconds_per_epoch = max(elapsed_seconds, 1e-9) / epochs_done
        if elapsed_seconds + seconds_per_epoch > self.budget_seconds:
            self.stopped, self.projected_epochs = True, epochs_done
            return False
        more = math.floor((self.budget_seconds - elapsed_seconds) / seconds_per_epoch)
        self.projected_epochs = min(self.max_epochs, epochs_done + max(1, more))
        return True

    def set_decision(self, go_on: bool, projected_epochs: int) -> None:
        """Adopt another rank's decision (all ranks stop together: rank 0 decides, the others follow)."""
        self.stopped = not go_on
        self.projected_epochs = projected_epochs
