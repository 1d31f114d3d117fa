from ssl_lightning.evaluation.knn import weighted_knn

__all__ = ["weighted_knn"]
