"""Lightning callbacks: thin adapters over the Trainer-free core."""

from lightning_interp.callbacks.linear_probe_monitor import LinearProbeMonitor
from lightning_interp.callbacks.norm_stats_monitor import NormStatsMonitor
from lightning_interp.callbacks.grad_flow_monitor import GradFlowMonitor
from lightning_interp.callbacks.saliency_monitor import SaliencyMonitor
from lightning_interp.callbacks.representer_monitor import RepresenterMonitor

__all__ = ["LinearProbeMonitor", "NormStatsMonitor", "GradFlowMonitor", "SaliencyMonitor", "RepresenterMonitor"]
