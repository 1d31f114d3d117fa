"""MuConPro, GenPro and DiscPro (Kobayashi, "Mutual Conditional Probability for Self-Supervised Learning";
no public code: the objective is the authors' poster's, the architecture BYOL's)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.muconpro import OBJECTIVES, kde_terms, parse_temperature
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules import MemoryBank, momentum_copy
from ssl_lightning.registry import SSLError


@METHODS.register("muconpro")
class MuConPro(SSLMethod):
    """M views per image; online network (backbone, projector, predictor) gives anchors z_bi, the EMA
    target network (backbone, projector) gives targets x_bj, both L2-normalised. Kernel density over
    the other views of the same image (see :mod:`ssl_lightning.losses.joint_embedding.muconpro`):

        l_gen  = -T log 1/(M-1) sum_{j!=i} exp(z_bi.x_bj/T)
        l_disc =  l_gen + T log 1/(BM-1) sum_{(c,j)!=(b,i)} exp(z_bi.x_cj/T)   (c over the global batch)
        objective: genpro = l_gen, discpro = l_disc, muconpro = l_gen + l_disc; T = 0 / inf: max / mean.

    Views (in this order in the batch): ``num_views`` views with momentum targets, then
    ``momentum_free_views`` large views whose target is the *online* projection, stop-gradient (the
    poster's "large patch, momentum-free" ablation, as read here), then any further views (e.g. small
    crops), which are anchors only: their other-view set is all the targets of their image.

    Args:
        objective: ``muconpro``, ``genpro`` or ``discpro``.
        temperature: T >= 0 (1 in the paper); 0 and ``inf`` (YAML ``.inf`` or the string ``"inf"``) are exact limits.
        num_views: M, views with momentum targets (4 in the paper).
        momentum_free_views: extra target views taken from the online network (0 = off).
        memory_bank_size: K > 0 adds the last K targets (a FIFO queue, filled after each step) to the
            cross-image set of l_disc; at least (targets per image) x global batch.
        proj_hidden, proj_out, pred_hidden: BYOL's heads (4096 -> 256, predictor 256 -> 4096 -> 256).
        momentum_base, momentum_final: target EMA momentum, cosine from base to final.
    """

    concat_views = False  # BYOL's convention: each view through the network separately (own BN statistics)

    def __init__(self, objective: str = "muconpro", temperature: float | str = 1.0, num_views: int = 4,
                 momentum_free_views: int = 0, memory_bank_size: int = 0, proj_hidden: int = 4096,
                 proj_out: int = 256, pred_hidden: int = 4096, momentum_base: float = 0.99,
                 momentum_final: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise SSLError(f"Unknown objective {objective!r}; set model.init_args.objective to one of {', '.join(OBJECTIVES)}.")
        if num_views + momentum_free_views < 2 or num_views < 1 or momentum_free_views < 0:
            raise SSLError(f"MuConPro needs >= 2 target views (num_views >= 1 with momentum targets, plus "
                           f"momentum_free_views >= 0); got num_views={num_views}, momentum_free_views={momentum_free_views}.")
        if memory_bank_size and objective == "genpro":
            raise SSLError("memory_bank_size > 0 adds negatives, which GenPro does not use; set objective to "
                           "discpro or muconpro, or memory_bank_size to 0.")
        self.hparams.temperature = self.temperature = parse_temperature(temperature)
        self.projector = mlp([self.backbone.num_features, proj_hidden, proj_out])
        self.predictor = mlp([proj_out, pred_hidden, proj_out])
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_projector = momentum_copy(self.projector)
        self.queue = MemoryBank(memory_bank_size, proj_out, init="zeros") if memory_bank_size > 0 else None

    def momentum_pairs(self):
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        m, n_targets = hp.num_views, hp.num_views + hp.momentum_free_views
        if len(views) < n_targets:
            raise SSLError(f"MuConPro got {len(views)} views per image but needs num_views + momentum_free_views = "
                           f"{n_targets}; give the data more views (data.views, e.g. `count: {n_targets}`) or lower num_views.")
        with torch.no_grad():
            teacher_feats = self.forward_views(views[:m], self.teacher_backbone)
        with torch.autocast(self.device.type, enabled=False):  # heads in float32: exp(s / T) is sensitive at small T
            proj = [self.projector(f.float()) for f in feats]
            z = torch.stack([self.predictor(p) for p in proj])  # anchors: every view
            with torch.no_grad():
                targets = [self.teacher_projector(f.float()) for f in teacher_feats]
            t = torch.stack(targets + [p.detach() for p in proj[m:n_targets]])  # momentum-free: online, stop-gradient
            negatives = None
            if self.queue is not None:
                self._check_bank(t.shape[0] * t.shape[1])
                negatives = self.queue.filled_rows().clone()
            gen, disc = kde_terms(z, t, self.temperature, negatives)
        loss = {"genpro": gen, "discpro": disc, "muconpro": gen + disc}[hp.objective].mean()
        if self.queue is not None:  # after the loss; image-major rows, gathered over processes in rank order
            self.queue.enqueue(F.normalize(t.detach().transpose(0, 1).flatten(0, 1), dim=-1))
        return {"loss": loss, "gen": gen.detach().mean(), "disc": disc.detach().mean()}

    def _check_bank(self, rows_per_process: int) -> None:
        rows = rows_per_process * distributed.world_size()
        if self.queue.size < rows:
            raise SSLError(f"memory_bank_size={self.queue.size} is smaller than the targets of one step ({rows} = "
                           f"target views x global batch); set model.init_args.memory_bank_size to at least {rows}.")


@METHODS.register("genpro")
class GenPro(MuConPro):
    """GenPro: :class:`MuConPro` with ``objective="genpro"`` (l_gen only: no cross-image term)."""

    def __init__(self, objective: str = "genpro", **kwargs) -> None:
        super().__init__(objective=objective, **kwargs)


@METHODS.register("discpro")
class DiscPro(MuConPro):
    """DiscPro: :class:`MuConPro` with ``objective="discpro"`` (l_disc only)."""

    def __init__(self, objective: str = "discpro", **kwargs) -> None:
        super().__init__(objective=objective, **kwargs)
