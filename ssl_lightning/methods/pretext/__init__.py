"""Pretext-task methods: a backbone trained to solve a supervised task whose labels come free from the image,
inputs built on the device in batch (:mod:`ssl_lightning.pretext`) -- rotation prediction (Gidaris et al. 2018),
jigsaw puzzles (Noroozi & Favaro 2016), context prediction (Doersch et al. 2015), colorization (Zhang et al. 2016)
and the split-brain autoencoder (Zhang et al. 2017)."""
from ssl_lightning.methods.pretext.colorization import Colorization
from ssl_lightning.methods.pretext.context_prediction import ContextPrediction
from ssl_lightning.methods.pretext.jigsaw import Jigsaw
from ssl_lightning.methods.pretext.rotation import Rotation
from ssl_lightning.methods.pretext.split_brain import SplitBrain

__all__ = ["Colorization", "ContextPrediction", "Jigsaw", "Rotation", "SplitBrain"]
