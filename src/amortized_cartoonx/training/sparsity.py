"""How much of ``l1_lambda`` the training loss uses at each step: a linear ramp, or a ramp gated by the distortion.

A mask predictor starts at "keep everything". If the sparsity weight reaches its full value before the network
has learnt which coefficients carry the decision, every mask shrinks together into the empty mask, a local
optimum it does not leave: near it the distortion's gradient is weak against the sparsity's pull. On photos this
is what happens (``docs/results.md``): the decision survives only above a sharp threshold of about 1% of the
coefficients, in the right places.

- :func:`l1_ramp`: linear from 0 to 1 over ``warmup`` steps, whatever the masks do.
- :class:`SparsityGate`: the same ramp, but it advances only while the masks keep the decision, i.e. while the
  training distortion stays below ``gate`` times the empty mask's distortion on the same images, and it steps
  back while they do not. The sparsity weight so follows what the network has learnt instead of the clock.

Free of Lightning: the training module calls :meth:`SparsityGate.update` once per training step.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError


def l1_ramp(step: int, warmup: int) -> float:
    """Fraction of ``l1_lambda`` in the training loss at ``step``: linear from 0 to 1 over ``warmup`` steps."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


@dataclasses.dataclass
class SparsityGate:
    """A sparsity ramp that advances only while the predicted masks keep the decision.

    Each training step reports the batch's mean distortion of the predicted masks and of the empty mask (the
    same images, their own noise). Their ratio is smoothed (exponential moving average, ``smoothing``); while it
    is below ``gate`` the ramp's position moves one step up, else one step down, within ``[0, warmup]``. The
    training loss then uses ``fraction * l1_lambda`` with ``fraction = position / warmup``, the position after
    the step's move: with a network that keeps the decision all along, :func:`l1_ramp` one step ahead (step
    ``t`` uses ``l1_ramp(t + 1)``; the full lambda from step ``warmup - 1`` on).

    Args:
        warmup: steps from no sparsity to the full ``l1_lambda`` (at least 1).
        gate: the distortion ratio (predicted / empty mask) above which the ramp steps back, in (0, 1]. The
            empty mask has ratio 1; 0.5 lets the sparsity grow only while the masks remove at least half of the
            empty mask's distortion.
        smoothing: weight of the past in the moving average, in [0, 1); 0 reacts to every batch alone.

    Attributes:
        position: steps climbed so far (float, for checkpoints).
        ratio: the smoothed ratio (None before the first update).
    """

    warmup: int
    gate: float
    smoothing: float = 0.9
    position: float = 0.0
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.warmup < 1:
            raise ConfigError(f"the gated sparsity ramp needs l1_warmup_steps >= 1, got {self.warmup}")
        if not 0.0 < self.gate <= 1.0:
            raise ConfigError(f"l1_gate must be in (0, 1] (a share of the empty mask's distortion), got {self.gate}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"the gate's smoothing must be in [0, 1), got {self.smoothing}")

    @property
    def fraction(self) -> float:
        """The share of ``l1_lambda`` in the training loss now, in [0, 1]."""
        return self.position / self.warmup

    def update(self, distortion: float, empty_distortion: float) -> float:
        """Record one training batch and return the sparsity fraction to use for it.

        Args:
            distortion: the batch's mean distortion of the predicted masks.
            empty_distortion: the batch's mean distortion of the empty mask. A batch whose empty mask does not
                distort (ratio undefined) or a non-finite report leaves the ratio as it was.
        """
        if math.isfinite(distortion) and math.isfinite(empty_distortion) and empty_distortion > 0:
            ratio = distortion / empty_distortion
            self.ratio = ratio if self.ratio is None else self.smoothing * self.ratio + (1 - self.smoothing) * ratio
        if self.ratio is not None and self.ratio < self.gate:
            self.position = min(float(self.warmup), self.position + 1.0)
        else:
            self.position = max(0.0, self.position - 1.0)
        return self.fraction

    def state(self) -> dict[str, float | None]:
        """What a checkpoint keeps to resume the gate where it was."""
        return {"position": self.position, "ratio": self.ratio}

    def restore(self, state: dict) -> None:
        """Resume from :meth:`state`'s output."""
        self.position = float(state["position"])
        self.ratio = None if state.get("ratio") is None else float(state["ratio"])
