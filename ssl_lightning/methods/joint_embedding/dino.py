"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.dino import DINOLoss, teacher_temperature
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules.ema import momentum_copy


class DINOHead(nn.Module):
    """``in -> hidden -> hidden -> bottleneck`` MLP (GELU, as the official head), L2-normalise, then a
    weight-normalised linear layer without bias: ``last_layer(x) = x W^T``, ``W_k = g_k v_k / ||v_k||``,
    with ``g = 1`` frozen when ``norm_last_layer`` (the official default)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.mlp = mlp([in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim], norm="batch" if use_bn else "none")
        for i, layer in enumerate(self.mlp):
            if isinstance(layer, nn.ReLU):
                self.mlp[i] = nn.GELU()
            elif isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        v = torch.empty(out_dim, bottleneck_dim)
        nn.init.trunc_normal_(v, std=0.02)
        self.last_layer_v = nn.Parameter(v)
        self.last_layer_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def last_layer_params(self) -> list[nn.Parameter]:
        return [self.last_layer_v, self.last_layer_g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_layer_g * F.normalize(self.last_layer_v, dim=1))


@METHODS.register("dino")
class DINO(SSLMethod):
    """Self-distillation with no labels: the student matches the EMA teacher's centred, sharpened
    distribution over ``out_dim`` dimensions, across multi-crop views (facebookresearch/dino main_dino.py).

    ``L = mean_{t in globals} mean_{s != t} H(softmax((g_t(x_t) - c) / T_t), softmax(g_s(x_s) / T_s))``;
    the teacher sees only the first two (global) crops, its outputs are detached; after each loss
    ``c <- m c + (1 - m) mean(g_t)`` over the global batch; teacher ``theta_t <- lambda theta_t + (1 - lambda) theta_s``.

    Args:
        out_dim, hidden_dim, bottleneck_dim, nlayers, use_bn_in_head, norm_last_layer: the DINO head
            (65536; 3-layer MLP 2048 -> 2048 -> 256; weight-normalised last layer with g frozen to 1).
        student_temp: T_s (0.1). teacher_temp: T_t after warm-up (0.07); warmup_teacher_temp (0.04)
            -> teacher_temp linearly over warmup_teacher_temp_epochs (30), per epoch, as in the paper.
        center_momentum: m of the centre (0.9).
        momentum_base, momentum_final: teacher EMA lambda, cosine 0.996 -> 1 over training.
        weight_decay, weight_decay_end: cosine schedule 0.04 -> 0.4 of the decayed group, every step.
        freeze_last_layer: epochs during which the last layer gets no gradient (1).
        Defaults: AdamW, lr 5e-4 per 256 images. Gradient clipping 3.0 is Lightning's Trainer flag
        ``gradient_clip_val: 3.0`` (set in the configs; it clips the global norm, the official code each
        parameter's norm separately).
    """

    def __init__(self, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3,
                 use_bn_in_head: bool = False, norm_last_layer: bool = True, student_temp: float = 0.1,
                 teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 center_momentum: float = 0.9, momentum_base: float = 0.996, momentum_final: float = 1.0,
                 weight_decay_end: float = 0.4, freeze_last_layer: int = 1, optimizer: str = "adamw",
                 lr: float = 5e-4, weight_decay: float = 0.04, **kwargs) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        self.head = DINOHead(self.backbone.num_features, out_dim, hidden_dim, bottleneck_dim, nlayers,
                             use_bn_in_head, norm_last_layer)
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_head = momentum_copy(self.head)
        self.dino_loss = DINOLoss(out_dim, student_temp, center_momentum)

    def momentum_pairs(self):
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def teacher_temp(self) -> float:
        hp = self.hparams
        return teacher_temperature(self.current_epoch, hp.teacher_temp, hp.warmup_teacher_temp, hp.warmup_teacher_temp_epochs)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        bs = feats[0].shape[0]
        student = self.head(torch.cat(feats)).split(bs)  # one head pass over all crops
        with torch.no_grad():  # the teacher sees only the two global crops
            teacher = self.teacher_head(torch.cat(self.forward_views(views[:2], self.teacher_backbone))).split(bs)
        temp = self.teacher_temp()
        loss = self.dino_loss(student, teacher, temp)
        return {"loss": loss, "teacher_temp": torch.tensor(temp)}

    # ---- freezing (the weight-decay cosine, weight_decay -> weight_decay_end, is the base class's) ------
    def on_after_backward(self) -> None:
        if self.current_epoch < self.hparams.freeze_last_layer:
            for p in self.head.last_layer_params():
                p.grad = None  # as the official code: no update at all during the first epoch(s)
