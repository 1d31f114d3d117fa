"""Instance methods: every training image its own class or target, with per-image state kept over the whole
dataset -- NPID (Wu et al. 2018, a memory bank and a non-parametric softmax) and Noise As Targets (Bojanowski &
Joulin 2017, fixed random targets and a per-batch Hungarian assignment)."""
from ssl_lightning.methods.instance.nat import NoiseAsTargets
from ssl_lightning.methods.instance.npid import NPID

__all__ = ["NPID", "NoiseAsTargets"]
