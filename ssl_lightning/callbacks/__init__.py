from ssl_lightning.callbacks.knn import KNNMonitor

__all__ = ["KNNMonitor"]
