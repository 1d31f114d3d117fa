from ssl_lightning.evaluation.clustering import cluster_metrics, hungarian_accuracy
from ssl_lightning.evaluation.knn import weighted_knn

__all__ = ["cluster_metrics", "hungarian_accuracy", "weighted_knn"]
