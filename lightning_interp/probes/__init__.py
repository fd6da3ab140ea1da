"""Probe modules, their training, and activation reducers."""

from lightning_interp.probes.accuracy_counter import AccuracyCounter
from lightning_interp.probes.activation_reducer import SEQUENCE_REDUCTIONS, ActivationReducer
from lightning_interp.probes.linear_probe import LinearProbe
from lightning_interp.probes.logistic import fit_logistic_regression
from lightning_interp.probes.probe_bank import ProbeBank

__all__ = ["AccuracyCounter", "ActivationReducer", "LinearProbe", "ProbeBank", "SEQUENCE_REDUCTIONS",
           "fit_logistic_regression"]  # fmt: skip
