"""Instance-level losses: NPID's non-parametric softmax (NCE and exact forms) and Noise As Targets."""
from ssl_lightning.losses.instance.nat import nat_assign, nat_loss
from ssl_lightning.losses.instance.npid import npid_nce_loss, npid_nce_probs, npid_softmax_loss

__all__ = ["nat_assign", "nat_loss", "npid_nce_loss", "npid_nce_probs", "npid_softmax_loss"]
