from ssl_lightning.callbacks.clusters import ClusterMonitor
from ssl_lightning.callbacks.knn import KNNMonitor

__all__ = ["ClusterMonitor", "KNNMonitor"]
