"""Noise-contrastive estimation (Gutmann & Hyvarinen, AISTATS 2010; JMLR 2012, eq. 8): fit an unnormalised
model by logistic regression of data samples against ``nu`` times as many samples of a known noise density."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_lightning.registry import SSLError


def nce_logit(log_p_model: torch.Tensor, log_p_noise: torch.Tensor, nu: float) -> torch.Tensor:
    """The classifier's logit ``G(u) - ln nu = ln p_model(u) - ln(nu p_noise(u))``: ``sigma`` of it is the
    posterior probability that ``u`` is a data sample rather than one of the ``nu`` noise samples."""
    return log_p_model - log_p_noise - math.log(nu)


def nce_loss(*, log_p_model_data: torch.Tensor, log_p_noise_data: torch.Tensor, log_p_model_noise: torch.Tensor,
             log_p_noise_noise: torch.Tensor, nu: float | None = None) -> torch.Tensor:
    """``-1/T_d [sum_t ln sigma(l(x_t)) + sum_t ln(1 - sigma(l(y_t)))]``, ``l(u) = ln p_model(u) - ln(nu p_noise(u))``.

    The negated NCE objective J_T: ``x_t`` are the T_d data samples, ``y_t`` the T_n noise samples; every
    argument is a log-density evaluated at those samples (any shapes: data tensors hold T_d values, noise
    tensors T_n, e.g. (N, K) for K noise samples per data sample). ``p_model`` may be unnormalised (its
    log-normaliser can be a learned parameter: NCE estimates it). ``nu`` defaults to ``T_n / T_d``, the
    value the estimator's consistency needs. Normalised by T_d as in the paper's J_T. Keyword arguments
    only, so that data and noise terms cannot be swapped by position.
    """
    if log_p_model_data.shape != log_p_noise_data.shape or log_p_model_noise.shape != log_p_noise_noise.shape:
        raise SSLError("nce_loss: the model and noise log-densities of the data samples must have one shape, and those "
                       f"of the noise samples one shape; got {tuple(log_p_model_data.shape)} vs "
                       f"{tuple(log_p_noise_data.shape)} and {tuple(log_p_model_noise.shape)} vs "
                       f"{tuple(log_p_noise_noise.shape)}: evaluate both densities at the same samples")
    t_d, t_n = log_p_model_data.numel(), log_p_model_noise.numel()
    if t_d == 0 or t_n == 0:
        raise SSLError(f"nce_loss needs data and noise samples, got {t_d} and {t_n}: pass at least one of each")
    nu = t_n / t_d if nu is None else float(nu)
    if nu <= 0:
        raise SSLError(f"nce_loss: nu={nu} must be positive (the noise-to-data sample ratio T_n / T_d)")
    data_logit = nce_logit(log_p_model_data, log_p_noise_data, nu)
    noise_logit = nce_logit(log_p_model_noise, log_p_noise_noise, nu)
    # ln sigma(l) and ln(1 - sigma(l)) = ln sigma(-l), in their stable forms
    return -(F.logsigmoid(data_logit).sum() + F.logsigmoid(-noise_logit).sum()) / t_d
