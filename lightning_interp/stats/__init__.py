"""Trainer-free statistics behind NormStatsMonitor and GradFlowMonitor."""

from lightning_interp.stats.grad_flow import (
    ChainLink,
    PowerIteration,
    analytic_flow,
    chain_links,
    measured_flow,
    param_grad_norms,
    per_example_grad_norm,
    weight_matrix,
)
from lightning_interp.stats.norm_stats import (
    activation_stats,
    divisor_std,
    effective_gain,
    is_feature_norm,
    library_norm_sigma,
    norm_layer_stats,
    snapshot_running_stats,
)

__all__ = [
    "ChainLink",
    "PowerIteration",
    "activation_stats",
    "analytic_flow",
    "chain_links",
    "divisor_std",
    "effective_gain",
    "is_feature_norm",
    "library_norm_sigma",
    "measured_flow",
    "norm_layer_stats",
    "param_grad_norms",
    "per_example_grad_norm",
    "snapshot_running_stats",
    "weight_matrix",
]
