"""ssl_lightning: self-supervised visual representation learning with PyTorch Lightning."""
from ssl_lightning.data import SSLDataModule, ViewConfig
from ssl_lightning.methods import METHODS, SSLMethod
from ssl_lightning.registry import SSLError

__version__ = "0.1.0"
__all__ = ["METHODS", "SSLDataModule", "SSLError", "SSLMethod", "ViewConfig", "__version__"]
