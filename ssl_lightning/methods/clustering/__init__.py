"""Clustering methods: a network trained on pseudo-labels from clustering its own features over the whole
training set -- DeepCluster (Caron et al. 2018). The shared epoch-level clustering step: :mod:`.epoch_clustering`."""
from ssl_lightning.methods.clustering.deepcluster import DeepCluster

__all__ = ["DeepCluster"]
