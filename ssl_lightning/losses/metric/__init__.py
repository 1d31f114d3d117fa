"""Metric losses every contrastive method descends from: contrastive loss with a margin, NCE, InfoNCE (and
MoCo's forms of it), soft nearest neighbour."""
