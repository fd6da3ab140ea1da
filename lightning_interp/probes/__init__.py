"""Probe modules and activation reducers."""

from lightning_interp.probes.activation_reducer import ActivationReducer
from lightning_interp.probes.linear_probe import LinearProbe
from lightning_interp.probes.probe_bank import ProbeBank

__all__ = ["ActivationReducer", "LinearProbe", "ProbeBank"]
