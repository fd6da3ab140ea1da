"""Warn once per problem and count every occurrence, so bad data never floods the log or crashes training."""

from __future__ import annotations

from collections import Counter

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["ProblemCounter"]


class ProblemCounter:
    """Counts run-time problems by kind and warns the first time each kind occurs.

    Example:
        >>> problems = ProblemCounter("Demo")
        >>> problems.report("nan_activations", "layer `fc` produced NaN; that probe step is skipped")  # doctest: +SKIP
        >>> problems.counts["nan_activations"]  # doctest: +SKIP
        1
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.counts: Counter[str] = Counter()

    def report(self, kind: str, message: str, count: int = 1) -> None:
        """Count ``count`` occurrences of ``kind``; warn with ``message`` if it is the first time."""
        first = self.counts[kind] == 0
        self.counts[kind] += count
        if first and count > 0:
            rank_zero_warn(f"{self.owner}: {message} (warned once; further cases are counted as `{kind}`).")

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = Counter(state)
