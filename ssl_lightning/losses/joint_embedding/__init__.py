"""Losses of the joint-embedding methods (NT-Xent, BYOL, SimSiam, SwAV, DINO, Barlow Twins, VICReg, W-MSE, TWIST,
MuConPro); MoCo's InfoNCE forms sit with the metric losses (``losses.metric.infonce``)."""
