"""The package's one exception type."""

from __future__ import annotations

__all__ = ["LightningInterpError"]


class LightningInterpError(ValueError):
    """A configuration or input the package cannot work with.

    Subclasses :class:`ValueError`, so ``except ValueError`` in user code keeps working. The message names the
    argument at fault and how to fix it.

    Example:
        >>> raise LightningInterpError("Expected argument `every_n_epochs` to be >= 1, but got 0.")
        Traceback (most recent call last):
        ...
        lightning_interp.errors.LightningInterpError: Expected argument `every_n_epochs` to be >= 1, but got 0.
    """
