"""Mutual-information methods: Deep InfoMax (Hjelm et al. 2019), an image's encoding against its local features
through learned MI estimators."""
from ssl_lightning.methods.mutual_information.dim import DeepInfoMax

__all__ = ["DeepInfoMax"]
