"""Lightning callbacks: thin adapters over the Trainer-free core."""

from lightning_interp.callbacks.linear_probe_monitor import LinearProbeMonitor

__all__ = ["LinearProbeMonitor"]
