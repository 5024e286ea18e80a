"""Reference per-sample math of f-divergence score distillation (SPEC section 3).

Density ratio from discriminator logits: r = clamp(exp(clamp(mean_k logit, -c, c)), r_min, r_max).
Weight family h(r) = r^2 f''(r) for eight f-divergences, and Uni-Instruct's derived coefficients
  lambda_sim = h,   lambda_fgm = h - r h',   lambda_di = -r^2 h''
written in closed form per divergence (the tests check them against autograd derivatives of h).
"""

from __future__ import annotations

import torch
from torch import Tensor

# name -> f(r) (documentation only; the weight is h(r) = r^2 f''(r))
DIVERGENCES = {
    "reverse_kl": "-log r",
    "softened_reverse_kl": "(r+1) log((r+1)/(2r))",
    "js": "r log r - (r+1) log((r+1)/2)",
    "squared_hellinger": "(sqrt r - 1)^2",
    "kl": "r log r",
    "jeffreys": "(r-1) log r",
    "neyman_chi2": "(1-r)^2 / r",
    "pearson_chi2": "(r-1)^2",
}


def check_divergence(divergence: str, name: str = "divergence") -> str:
    """``divergence`` if it is one of the eight names, else a ValueError that lists them."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"{name} must be one of {', '.join(repr(d) for d in DIVERGENCES)}; got {divergence!r}")
    return divergence


def density_ratio(logits: Tensor, logit_clamp: float, ratio_min: float, ratio_max: float) -> Tensor:
    """r = clamp(exp(clamp(mean over the last dim of [B, K] logits (or [B] as is), -c, c)), r_min, r_max).

    Computed in the compute dtype (fp32 for half inputs) and detached; NaN logits give NaN.
    """
    z = logits.detach()
    z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    if z.dim() == 2:
        z = z.mean(dim=1)
    return torch.clamp(torch.exp(torch.clamp(z, -logit_clamp, logit_clamp)), ratio_min, ratio_max)


def fdiv_weight(r: Tensor, divergence: str) -> Tensor:
    """h(r) = r^2 f''(r) of the table in SPEC section 3 (exact constants)."""
    check_divergence(divergence)
    if divergence == "reverse_kl":
        return torch.ones_like(r)
    if divergence == "softened_reverse_kl":
        return 1.0 / (1.0 + r)
    if divergence == "js":
        return r / (1.0 + r)
    if divergence == "squared_hellinger":
        return torch.sqrt(r) * 0.5
    if divergence == "kl":
        return r.clone()
    if divergence == "jeffreys":
        return 1.0 + r
    if divergence == "neyman_chi2":
        return 2.0 / r
    return 2.0 * r * r  # pearson_chi2


def fdiv_coefficients(r: Tensor, divergence: str) -> tuple[Tensor, Tensor, Tensor]:
    """(lambda_sim, lambda_fgm, lambda_di) = (h, h - r h', -r^2 h'') in closed form:

    reverse_kl 1, 1, 0;  softened_reverse_kl 1/(1+r), (1+2r)/(1+r)^2, -2r^2/(1+r)^3;
    js r/(1+r), r^2/(1+r)^2, 2r^2/(1+r)^3;  squared_hellinger sqrt(r)/2, sqrt(r)/4, sqrt(r)/8;
    kl r, 0, 0;  jeffreys 1+r, 1, 0;  neyman_chi2 2/r, 4/r, -4/r;  pearson_chi2 2r^2, -2r^2, -4r^2.
    """
    check_divergence(divergence)
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    if divergence == "reverse_kl":
        return one, one.clone(), zero
    if divergence == "softened_reverse_kl":
        q = 1.0 / (1.0 + r)
        return q, (1.0 + 2.0 * r) * q * q, -2.0 * r * r * q * q * q
    if divergence == "js":
        q = 1.0 / (1.0 + r)
        return r * q, r * r * q * q, 2.0 * r * r * q * q * q
    if divergence == "squared_hellinger":
        s = torch.sqrt(r)
        return 0.5 * s, 0.25 * s, 0.125 * s
    if divergence == "kl":
        return r.clone(), zero, zero.clone()
    if divergence == "jeffreys":
        return 1.0 + r, one, zero
    if divergence == "neyman_chi2":
        return 2.0 / r, 4.0 / r, -4.0 / r
    return 2.0 * r * r, -2.0 * r * r, -4.0 * r * r  # pearson_chi2


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, the EDM loss weight."""
    return (sigma * sigma + sigma_data * sigma_data) / (sigma * sigma_data) ** 2
