"""When is a classifier guessing? The one rule for the observer check (distill) and the teacher check (evaluate,
relabel): both refuse to go on with a model whose top-1 on a sample is near chance, the reference's top failure
(class order not matching the model's outputs)."""

from __future__ import annotations

import math


def near_chance_threshold(num_classes: int, n: int) -> float:
    """Accuracy below which a model is taken to be guessing: 2x chance plus 3 binomial std, the margin
    over chance capped at a quarter of the way to 100 % (so one- and two-class data can pass)."""
    chance = 1.0 / num_classes
    return chance + min(chance, (1 - chance) / 4) + 3 * math.sqrt(chance * (1 - chance) / max(n, 1))
