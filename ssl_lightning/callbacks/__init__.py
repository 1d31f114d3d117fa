from ssl_lightning.callbacks.clusters import ClusterMonitor
from ssl_lightning.callbacks.embedding import EmbeddingPlot
from ssl_lightning.callbacks.knn import KNNMonitor
from ssl_lightning.callbacks.preemption import PreemptionCheckpoint

__all__ = ["ClusterMonitor", "EmbeddingPlot", "KNNMonitor", "PreemptionCheckpoint"]
