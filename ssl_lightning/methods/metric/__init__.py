"""Metric-learning methods: a Siamese embedding trained with the metric losses of :mod:`ssl_lightning.losses.metric`
-- contrastive loss with a margin (Hadsell, Chopra & LeCun 2006), NCE (Gutmann & Hyvarinen 2010), InfoNCE
(Oord et al. 2018), soft nearest neighbour (Frosst, Papernot & Hinton 2019) -- on instance or label pairs."""
from ssl_lightning.methods.metric.siamese import Siamese

__all__ = ["Siamese"]
