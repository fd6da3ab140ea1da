"""lightning-interp: PyTorch Lightning callbacks that make a network's insides visible while it trains."""

from lightning_interp.errors import LightningInterpError

__version__ = "0.1.0"
__all__ = ["LightningInterpError", "__version__"]
