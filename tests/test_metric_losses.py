"""The metric losses against plain per-element transcriptions of their formulas, pytorch-metric-learning
(conventions aligned as the reference sheet says) and the invariants the papers state."""
from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import distances, losses, reducers

from ssl_lightning.losses import (contrastive_margin_loss, info_nce, moco_infonce, mocov3_infonce, nce_loss,
                                  soft_nearest_neighbour_loss)
from ssl_lightning.registry import SSLError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- contrastive loss with a margin ------------------------------------------------------------------------
def contrastive_reference(z1, z2, similar, margin, eps):
    """Hadsell et al. eq. 4, one pair at a time: Y = 0 similar, Y = 1 dissimilar, D = sqrt(sum (z1 - z2)^2 + eps)."""
    out = []
    for i in range(z1.shape[0]):
        sq = sum((z1[i, k] - z2[i, k]) ** 2 for k in range(z1.shape[1]))
        D = torch.sqrt(sq + eps)
        Y = 0.0 if bool(similar[i]) else 1.0
        hinge = margin - D if margin - D > 0 else D * 0
        out.append((1 - Y) * 0.5 * D ** 2 + Y * 0.5 * hinge ** 2)
    return torch.stack(out)


@pytest.mark.parametrize("n,d,margin", [(6, 3, 1.0), (10, 5, 2.5), (7, 8, 0.5)])
def test_contrastive_margin_matches_formula(n, d, margin):
    g = _gen(n * d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    z2[0] = z1[0]  # a pair at distance 0: the eps keeps the gradient finite
    similar = torch.rand(n, generator=g) < 0.5
    similar[0], similar[1] = True, False
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ra, rb = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    per_pair = contrastive_margin_loss(a, b, similar, margin, eps=1e-8, reduction="none")
    ref = contrastive_reference(ra, rb, similar, margin, 1e-8)
    torch.testing.assert_close(per_pair, ref, atol=1e-12, rtol=0)
    assert torch.allclose(contrastive_margin_loss(z1, z2, similar, margin, eps=1e-8), ref.mean())
    assert torch.allclose(contrastive_margin_loss(z1, z2, similar, margin, eps=1e-8, reduction="sum"), ref.sum())
    per_pair.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, ra.grad, atol=1e-12, rtol=0)
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_contrastive_margin_matches_pytorch_metric_learning():
    """pml's ContrastiveLoss has unsquared hinges D and max(0, m - D) without the 1/2; with the raw Euclidean
    distance and no reducer, ours is 1/2 of its per-pair values squared, pair for pair."""
    g = _gen(5)
    n, d, margin = 12, 4, 1.5
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + torch.linspace(0.1, 1.5, n, dtype=torch.float64)[:, None] * z2  # distances on both sides of the margin
    similar = torch.arange(n) % 3 == 0
    ours = contrastive_margin_loss(z1, z2, similar, margin, eps=0.0, reduction="none")
    pml = losses.ContrastiveLoss(pos_margin=0, neg_margin=margin,
                                 distance=distances.LpDistance(normalize_embeddings=False),
                                 reducer=reducers.DoNothingReducer())
    idx = torch.arange(n)
    pos, neg = idx[similar], idx[~similar]
    out = pml(torch.cat([z1, z2]), indices_tuple=(pos, pos + n, neg, neg + n))
    torch.testing.assert_close(ours[similar], 0.5 * out["pos_loss"]["losses"] ** 2, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours[~similar], 0.5 * out["neg_loss"]["losses"] ** 2, atol=1e-10, rtol=0)
    assert (ours[~similar] == 0).any() and (ours[~similar] > 0).any()  # both sides of the margin were tested


def test_contrastive_margin_refuses_numeric_labels():
    z = torch.randn(4, 2)
    with pytest.raises(SSLError, match="bool tensor"):
        contrastive_margin_loss(z, z, torch.tensor([0, 1, 0, 1]))


# ---- NCE ---------------------------------------------------------------------------------------------------
def _log_sigmoid(t: float) -> float:
    return -math.log1p(math.exp(-t)) if t >= 0 else t - math.log1p(math.exp(t))


@pytest.mark.parametrize("n,k", [(5, 1), (8, 3), (4, 10)])
def test_nce_matches_formula(n, k):
    g = _gen(10 * n + k)
    lm_x, ln_x = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    lm_y, ln_y = (torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(2))
    loss = nce_loss(log_p_model_data=lm_x, log_p_noise_data=ln_x, log_p_model_noise=lm_y, log_p_noise_noise=ln_y)
    nu = k  # T_n / T_d
    total = 0.0
    for t in range(n):  # J_T = 1/T_d [sum ln h(x_t) + sum ln(1 - h(y_t))], h = sigma(G - ln nu)
        total += _log_sigmoid(float(lm_x[t]) - math.log(nu * math.exp(float(ln_x[t]))))
    for t in range(n):
        for j in range(k):
            l_y = float(lm_y[t, j]) - math.log(nu * math.exp(float(ln_y[t, j])))
            total += math.log(1 - 1 / (1 + math.exp(-l_y)))
    assert abs(loss.item() - (-total / n)) < 1e-10
    explicit = nce_loss(log_p_model_data=lm_x, log_p_noise_data=ln_x, log_p_model_noise=lm_y,
                        log_p_noise_noise=ln_y, nu=2 * k)
    assert abs(explicit.item() - loss.item()) > 1e-3  # nu enters the logits


def test_nce_estimates_the_normaliser():
    """NCE's point: an unnormalised model -lambda x^2 / 2 + c fitted by NCE learns lambda = 1 and the
    log-normaliser c = -ln sqrt(2 pi) of the data density N(0, 1) (noise: N(0, 2^2), nu = 2)."""
    g = _gen(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    y = 2 * torch.randn(40000, generator=g, dtype=torch.float64)
    noise_logpdf = lambda u: -u ** 2 / 8 - math.log(2 * math.sqrt(2 * math.pi))  # noqa: E731
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # lambda - 1, c
    opt = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        model = lambda u: -(1 + params[0]) * u ** 2 / 2 + params[1]  # noqa: E731
        loss = nce_loss(log_p_model_data=model(x), log_p_noise_data=noise_logpdf(x),
                        log_p_model_noise=model(y), log_p_noise_noise=noise_logpdf(y))
        loss.backward()
        return loss

    opt.step(closure)
    lam, c = 1 + params[0].item(), params[1].item()
    assert abs(lam - 1) < 0.05 and abs(c + 0.5 * math.log(2 * math.pi)) < 0.03, (lam, c)


# ---- InfoNCE -----------------------------------------------------------------------------------------------
def info_nce_reference(anchor, positive, negatives, temperature, normalize):
    """Oord et al. eq. 4 one anchor at a time: -log f(x+, c) / sum_{x in X} f(x, c), X = {x+} + negatives."""
    def score(u, v):
        dot = sum(u[k] * v[k] for k in range(u.shape[0]))
        if normalize:
            dot = dot / (torch.sqrt(sum(t ** 2 for t in u)) * torch.sqrt(sum(t ** 2 for t in v)))
        return torch.exp(dot / temperature)

    n, total = anchor.shape[0], 0.0
    for i in range(n):
        if negatives is None:
            candidates = [positive[j] for j in range(n) if j != i]
        elif negatives.ndim == 2:
            candidates = list(negatives)
        else:
            candidates = list(negatives[i])
        f_pos = score(anchor[i], positive[i])
        total = total - torch.log(f_pos / (f_pos + sum(score(anchor[i], x) for x in candidates)))
    return total / n


@pytest.mark.parametrize("mode", ["in_batch", "shared", "per_anchor"])
@pytest.mark.parametrize("normalize,temperature", [(True, 0.1), (True, 0.5), (False, 1.0)])
def test_info_nce_matches_formula(mode, normalize, temperature):
    g = _gen(100 * ["in_batch", "shared", "per_anchor"].index(mode) + int(10 * temperature) + normalize)
    n, k, d = 5, 4, 6
    anchor = torch.randn(n, d, generator=g, dtype=torch.float64)
    positive = torch.randn(n, d, generator=g, dtype=torch.float64)
    negatives = {"in_batch": None, "shared": torch.randn(k, d, generator=g, dtype=torch.float64),
                 "per_anchor": torch.randn(n, k, d, generator=g, dtype=torch.float64)}[mode]
    a, p = anchor.clone().requires_grad_(), positive.clone().requires_grad_()
    ra, rp = anchor.clone().requires_grad_(), positive.clone().requires_grad_()
    loss = info_nce(a, p, negatives, temperature, normalize)
    ref = info_nce_reference(ra, rp, negatives, temperature, normalize)
    assert abs(loss.item() - ref.item()) < 1e-10
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, ra.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(p.grad, rp.grad, atol=1e-10, rtol=0)


def test_info_nce_contains_mocos_forms():
    g = _gen(3)
    q, k = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)
    torch.testing.assert_close(info_nce(q, k, queue, 0.2), moco_infonce(q, k, queue, 0.2))
    torch.testing.assert_close(2 * 0.2 * info_nce(q, k, None, 0.2), mocov3_infonce(q, k, 0.2, gather=False))


@pytest.mark.parametrize("k", [1, 7, 63])
def test_info_nce_equal_scores_give_ln_k_plus_one(k):
    n, d = 4, 3
    v = torch.randn(1, d, generator=_gen(k))
    same = v.expand(n, d)
    assert abs(info_nce(same, same, v.expand(k, d)).item() - math.log(k + 1)) < 1e-6
    assert abs(info_nce(same, same, v.expand(n, k, d)).item() - math.log(k + 1)) < 1e-6
    assert abs(info_nce(v.expand(k + 1, d), v.expand(k + 1, d)).item() - math.log(k + 1)) < 1e-6  # in-batch


def test_info_nce_lower_bounds_mutual_information():
    """I(x; c) >= ln N - L: for jointly Gaussian (c, x) with correlation rho per dimension, I = -d/2 ln(1 - rho^2).
    With the optimal critic ln p(x|c)/p(x) (written as a dot product of augmented vectors) ln N - L comes close
    to I from below; a critic that ignores c can never claim information (ln N - L <= 0 by Jensen)."""
    rho, d, n, batches = 0.8, 4, 256, 40
    mi = -d / 2 * math.log(1 - rho ** 2)
    g = _gen(1)
    bounds, blind = [], []
    for _ in range(batches):
        c = torch.randn(n, d, generator=g, dtype=torch.float64)
        x = rho * c + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=g, dtype=torch.float64)
        s = 1 - rho ** 2  # ln p(x|c) - ln p(x) = rho c.x / s - rho^2 |x|^2 / (2 s) + (terms of c alone)
        anchor = torch.cat([rho * c / s, torch.ones(n, 1, dtype=torch.float64)], dim=1)
        cand = torch.cat([x, -(rho ** 2) * x.pow(2).sum(1, keepdim=True) / (2 * s)], dim=1)
        bounds.append(math.log(n) - info_nce(anchor, cand, temperature=1.0, normalize=False).item())
        blind.append(math.log(n) - info_nce(torch.ones(n, d, dtype=torch.float64), x, temperature=1.0,
                                            normalize=False).item())
    estimate = sum(bounds) / batches
    stderr = torch.tensor(bounds).std().item() / math.sqrt(batches)
    assert estimate <= mi + 3 * stderr, (estimate, mi)
    assert estimate > mi - 0.15, (estimate, mi)  # tight: I = 2.04 nats << ln N = 5.5
    assert sum(blind) / batches < 0


def test_info_nce_rejects_mismatched_negatives():
    z = torch.randn(4, 3)
    with pytest.raises(SSLError, match="per-anchor negatives"):
        info_nce(z, z, torch.randn(5, 2, 3))


# ---- soft nearest neighbour --------------------------------------------------------------------------------
def snnl_reference(x, labels, temperature, cosine, eps):
    """cleverhans SNNLCrossEntropy.SNNL, one element at a time: f_ij = exp(-d_ij / T) (j != i),
    pick_ij = f_ij / (eps + sum_k f_ik), loss = mean_i -log(eps + sum_{j: y_j = y_i} pick_ij)."""
    b = x.shape[0]

    def dist(u, v):
        if cosine:
            return 1 - (u * v).sum() / (u.norm() * v.norm())
        return ((u - v) ** 2).sum()

    total = 0.0
    for i in range(b):
        f = [torch.exp(-dist(x[i], x[j]) / temperature) if j != i else None for j in range(b)]
        denom = eps + sum(f[j] for j in range(b) if j != i)
        same = sum((f[j] / denom for j in range(b) if j != i and labels[j] == labels[i]), x.new_zeros(()))
        total = total - torch.log(eps + same)
    return total / b


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_soft_nearest_neighbour_matches_reference_code(distance, temperature):
    g = _gen(int(temperature * 10))
    x = torch.randn(9, 2, 3, generator=g, dtype=torch.float64)  # flattened to (9, 6), as the reference code does
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0])  # class 3 has no partner: contributes -log(eps)
    a, r = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = soft_nearest_neighbour_loss(a, labels, temperature, distance)
    ref = snnl_reference(r.reshape(9, -1), labels, temperature, distance == "cosine", 1e-5)
    assert abs(loss.item() - ref.item()) < 1e-10
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, r.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_soft_nearest_neighbour_matches_nca_loss(distance):
    """pml's NCALoss(softmax_scale = 1/T) is the same loss without the eps; every anchor has a partner here."""
    g = _gen(11)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(12) % 4
    temperature = 2.0
    dist = (distances.LpDistance(power=2, normalize_embeddings=False) if distance == "squared_euclidean"
            else distances.CosineSimilarity())  # softmax(cos / T) = softmax(-(1 - cos) / T)
    theirs = losses.NCALoss(softmax_scale=1 / temperature, distance=dist)(x, labels)
    exact = soft_nearest_neighbour_loss(x, labels, temperature, distance, eps=0.0)
    assert abs(exact.item() - theirs.item()) < 1e-10
    assert abs(soft_nearest_neighbour_loss(x, labels, temperature, distance).item() - theirs.item()) < 1e-3


def test_soft_nearest_neighbour_does_not_underflow():
    """Far-apart tight classes at a small temperature: every e^{-d/T} underflows in the linear-space formula,
    the log-space one gives ~0 (classes perfectly separated) and finite gradients."""
    g = _gen(2)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    labels = torch.arange(12) % 3
    x = (centres[labels] + 0.5 * torch.randn(12, 2, generator=g)).requires_grad_()
    temperature = 1e-4
    loss = soft_nearest_neighbour_loss(x, labels, temperature, eps=0.0)
    assert torch.isfinite(loss) and 0 <= loss.item() < 1e-6
    f = torch.exp(-torch.cdist(x, x) ** 2 / temperature) * (1 - torch.eye(12))  # the linear-space terms
    same = (labels[:, None] == labels[None, :]).float()
    assert torch.isnan((f * same).sum(1) / f.sum(1)).any()  # ... underflow: 0 / 0
    loss.backward()
    assert torch.isfinite(x.grad).all()
    mixed = soft_nearest_neighbour_loss(x.detach(), torch.arange(12) % 2, temperature=100.0)
    assert mixed > soft_nearest_neighbour_loss(x.detach(), labels, temperature=100.0)  # entangled labels: higher
