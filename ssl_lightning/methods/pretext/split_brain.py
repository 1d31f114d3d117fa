"""Split-brain autoencoder (Zhang, Isola & Efros, "Split-Brain Autoencoders: Unsupervised Learning by
Cross-Channel Prediction", CVPR 2017)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_lightning.backbones.feature_maps import feature_maps, pool, stage
from ssl_lightning.backbones.split_brain import SplitBrainEncoder
from ssl_lightning.methods.pretext.colour import ColourMethod, DenseHead, full_precision, hypercolumn_stages, subsample
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.pretext.color import AB_SCALE, COVERS, ab_gamut_bins, normalize_l, quantize_ab, quantize_l, rgb_to_lab
from ssl_lightning.registry import SSLError


@METHODS.register("split_brain")
class SplitBrain(ColourMethod):
    """Two disjoint sub-networks (the ``split_brain`` encoder: two of the named backbone, e.g. ConvNets of half the
    width) on the Lab channels: ``f_L`` predicts ab from L as classification over the Q in-gamut ab bins, ``f_ab`` predicts L
    from ab over ``l_bins`` equal L bins, each with a dense head on a 1/``stride`` grid:

        L = CE(h_ab(f_L(L)), q_ab(ab)) + CE(h_L(f_ab(ab)), q_L(L))        chance ln Q + ln l_bins

    with hard (nearest-bin) targets and no rebalancing (the paper's classification losses). The representation
    is the concatenation ``[f_L(L), f_ab(ab)]`` (the encoder's pooled output; checkpoints name it ``split_brain``
    for ``load_backbone``).

    Args:
        backbone, backbone_kwargs: each half's (e.g. ``convnet`` with ``{width: 16}``, half the width of a
            32-wide single network); the encoder is the ``split_brain`` backbone built from them.
        bins: the ab bin set (see :class:`~ssl_lightning.methods.pretext.colorization.Colorization`).
        l_bins: L quantisation (the paper: 100; 50 also used).
        stride, head_stages, hidden: the dense heads, as Colorization's (one per half).
        **kwargs: :class:`~ssl_lightning.methods.pretext.colour.ColourMethod` options.
    """

    input_space = "lab"

    def __init__(self, bins: str = "neighbours", l_bins: int = 100, stride: int = 4, head_stages: list[str] | None = None,
                 hidden: int = 256, **kwargs) -> None:
        super().__init__(**kwargs)
        if bins not in COVERS:
            raise SSLError(f"SplitBrain: bins={bins!r}; use one of {', '.join(COVERS)}")
        if l_bins < 2:
            raise SSLError(f"SplitBrain: l_bins={l_bins} must be >= 2 (the paper's 100)")
        self.register_buffer("bins", ab_gamut_bins(cover=bins))
        halves = {"l_net": self.backbone.l_net, "ab_net": self.backbone.ab_net}
        self.head_stages = {k: hypercolumn_stages(net, stride, head_stages) for k, net in halves.items()}
        width = {k: sum(stage(halves[k], n).channels for n in names) for k, names in self.head_stages.items()}
        self.ab_head = DenseHead(width["l_net"], self.bins.shape[0], hidden)  # L -> ab
        self.l_head = DenseHead(width["ab_net"], l_bins, hidden)  # ab -> L

    def build_encoder(self) -> SplitBrainEncoder:
        return SplitBrainEncoder(self.hparams.backbone, self.hparams.backbone_kwargs)

    def encoder_spec(self) -> dict[str, Any]:
        return super().encoder_spec() | {"backbone": "split_brain", "backbone_kwargs": {
            "half": self.hparams.backbone, "half_kwargs": dict(self.hparams.backbone_kwargs or {})}}

    def encode(self, rgb: torch.Tensor) -> dict[str, Any]:
        with full_precision(rgb):
            lab = rgb_to_lab(rgb)
        maps_l = feature_maps(self.backbone.l_net, normalize_l(lab[:, :1]))
        maps_ab = feature_maps(self.backbone.ab_net, lab[:, 1:] / AB_SCALE)
        feats = torch.cat([pool(next(reversed(maps_l.values()))), pool(next(reversed(maps_ab.values())))], dim=1)
        return {"feats": feats, "maps_l": maps_l, "maps_ab": maps_ab, "lab": lab}

    def logits(self, encoded: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ab logits (B, Q, h, w) from the L half, L logits (B, l_bins, h, w) from the ab half, the Lab targets
        on the 1/stride grid (B, 3, h, w)."""
        lab = subsample(encoded["lab"], self.hparams.stride)
        size = tuple(lab.shape[-2:])
        ab_logits = self.ab_head([encoded["maps_l"][n] for n in self.head_stages["l_net"]], size)
        l_logits = self.l_head([encoded["maps_ab"][n] for n in self.head_stages["ab_net"]], size)
        return ab_logits, l_logits, lab

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        ab_logits, l_logits, lab = self.logits(self.take_encoded())
        with full_precision(lab):
            loss_ab = F.cross_entropy(ab_logits.float(), quantize_ab(lab[:, 1:], self.bins))
            loss_l = F.cross_entropy(l_logits.float(), quantize_l(lab[:, 0], self.hparams.l_bins))
        return {"loss": loss_ab + loss_l, "loss_l_to_ab": loss_ab, "loss_ab_to_l": loss_l}
