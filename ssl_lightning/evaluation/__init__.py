"""Evaluation protocols (kNN, linear, fine-tuning, clustering, transfer, plots, export) and their pieces."""
from ssl_lightning.evaluation.checkpoint import load_backbone, load_module
from ssl_lightning.evaluation.clustering import cluster_metrics, hungarian_accuracy
from ssl_lightning.evaluation.features import extract_features
from ssl_lightning.evaluation.knn import weighted_knn

__all__ = ["cluster_metrics", "extract_features", "hungarian_accuracy", "load_backbone", "load_module", "weighted_knn"]
