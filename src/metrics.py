"""Evaluation over a whole split: ELBO terms, IWAE, and the collapse and blur diagnostics.

Collapse: kl_per_dim, active_units (Burda et al. 2015), mutual_info (He et al. 2019), MIG (Chen et al. 2018).
Blur: blur_effect (Crete-Roffet et al. 2007), 0 sharp to 1 flat, of prior samples, reconstructions and the real
images themselves. All NLLs in nats per image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import eval_batches, mean_image
from .device import autocast_dtype, autocast_for
from .losses import Objective, bits_per_dim, elbo_terms
from .models import VAE
from .visuals import fixed_latents

EVAL_SEED = 0  # eval's own RNG: its numbers do not depend on how far training's RNG has moved
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2015
MI_CAP_MARGIN = 0.05  # nats: an MI estimate this close to its ceiling log N is reported as capped
LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------- estimators


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                         in_use: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)), summed over the last dim (over the dims `in_use` marks, where given)."""
    per_dim = -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))
    return (per_dim if in_use is None else torch.where(in_use, per_dim, 0.0)).sum(-1)


def iwae_chunks(b: int, k: int, chunk_images: int = 4096) -> List[int]:
    """How IWAE's k samples of b images are split: B * c at a time, so it costs k/c decoder passes, not k."""
    c = max(1, min(k, chunk_images // b))
    return [min(c, k - start) for start in range(0, k, c)]


def iwae_log_weights(model: VAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, k: int,
                     noise: Optional[List[torch.Tensor]] = None,
                     in_use: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p(x|z_i) + log p(z_i) - log q(z_i|x) for k samples z_i ~ q(z|x); (B, k). `noise`: the standard normal
    draws of each chunk (iwae_chunks), (B, n, D) each; else drawn here."""
    b = len(x)
    noise = noise if noise is not None else [torch.randn(b, n, mu.shape[1], device=mu.device)
                                             for n in iwae_chunks(b, k)]
    out = []
    for eps in noise:
        n = eps.shape[1]
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps  # (B, n, D)
        params = model.decode(z.reshape(b * n, -1))  # (B*n, ...)
        x_rep = x.unsqueeze(1).expand(b, n, *x.shape[1:]).reshape(b * n, *x.shape[1:])
        log_px_z = -model.likelihood.nll(params, x_rep).view(b, n)
        log_pz = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z), in_use)
        log_qz = gaussian_log_density(z, mu.unsqueeze(1), logvar.unsqueeze(1), in_use)
        out.append(log_px_z + log_pz - log_qz)
    return torch.cat(out, 1)


def iwae_nll(model: VAE, x: torch.Tensor, k: int, mu: Optional[torch.Tensor] = None,
             logvar: Optional[torch.Tensor] = None, noise: Optional[List[torch.Tensor]] = None,
             in_use: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-log p(x) estimated with k importance samples (Burda et al. 2015), per image (B,); k = 1 is the ELBO.
    `mu`, `logvar`: the encoder's output for x when the caller has it (one encoder pass for every metric)."""
    if mu is None:
        mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()
    log_w = iwae_log_weights(model, x, mu, logvar, k, noise, in_use)
    return -(torch.logsumexp(log_w, 1) - math.log(k))


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Dims whose posterior mean varies with x: Cov_x(E_q[z_d]) > threshold, over the whole split (N, D); none
    over a split of one image (no variance to measure)."""
    return int((mu.var(0) > threshold).sum()) if len(mu) > 1 else 0


MI_MAX_ELEMENTS = 1 << 25  # the (rows, N, D) densities of mutual_info at most 32 M numbers (128 MB) at a time


def mutual_info(mu: torch.Tensor, logvar: torch.Tensor, chunk: int = 256,
                generator: Optional[torch.Generator] = None, max_elements: int = MI_MAX_ELEMENTS) -> float:
    """I(x; z) under q in nats: the mean of mutual_info_terms."""
    return float(mutual_info_terms(mu, logvar, chunk, generator, max_elements).mean())


def mutual_info_se(terms: torch.Tensor) -> float:
    """The standard error of the MI estimate (nats): its per-image terms' sd over sqrt(N), the noise of one z per
    image and of these N images; two evaluations with other z or other images differ by about this much."""
    return float(terms.std() / math.sqrt(len(terms))) if len(terms) > 1 else float("nan")


def mutual_info_terms(mu: torch.Tensor, logvar: torch.Tensor, chunk: int = 256,
                      generator: Optional[torch.Generator] = None, max_elements: int = MI_MAX_ELEMENTS) -> torch.Tensor:
    """Per image, log q(z|x) - log q(z) at one z ~ q(z|x), q(z) the aggregate posterior of these N images; their
    mean is I(x; z) under q (He et al. 2019, Lagging inference networks). Both densities at that same z, so the
    Monte-Carlo noise cancels (it is exactly 0 when q ignores x); the N x N densities are chunked, at most `chunk`
    rows and `max_elements` numbers at a time (a latent of 100,000 dims once asked for 6.5 GB at once)."""
    n = len(mu)
    chunk = max(1, min(chunk, max_elements // max(1, n * mu.shape[1])))
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    log_q_own = gaussian_log_density(z, mu, logvar)  # (N,)
    log_q_agg = []
    for i in range(0, n, chunk):
        dens = gaussian_log_density(z[i : i + chunk, None], mu[None], logvar[None])  # (c, N)
        log_q_agg.append(torch.logsumexp(dens, 1) - math.log(n))
    return log_q_own - torch.cat(log_q_agg)  # (N,)


def log_aggregate_posterior(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                            max_elements: int = MI_MAX_ELEMENTS) -> torch.Tensor:
    """log q(z) at each row of z (P, D), q(z) = mean_n N(z; mu_n, diag exp(logvar_n)) over the N rows of mu and
    logvar: (P,), the (rows, N, D) densities chunked as mutual_info_terms does."""
    chunk = max(1, max_elements // max(1, len(mu) * mu.shape[1]))
    return torch.cat([torch.logsumexp(gaussian_log_density(z[i: i + chunk, None], mu[None], logvar[None]), 1)
                      for i in range(0, len(z), chunk)]) - math.log(len(mu))


def marginal_kl_terms(mu: torch.Tensor, logvar: torch.Tensor, mi_terms: torch.Tensor) -> torch.Tensor:
    """Per image, KL(q(z|x) || N(0, I)) minus its mutual_info_terms at the same z: their mean estimates the marginal
    KL(q(z) || p(z)), the holes of the latent space (ELBO surgery, Hoffman and Johnson 2016: the mean KL term is
    I(x; z) plus this); 0 where the aggregate posterior is the prior. (N,), nats."""
    kl = 0.5 * (mu.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).sum(1)
    return kl - mi_terms.double()


HOLE_QUANTILE = 0.01  # a prior sample is in a hole where q(z) is below the density of 99% of the encoded data


def prior_hole_share(mu: torch.Tensor, logvar: torch.Tensor, prior_z: torch.Tensor,
                     generator: Optional[torch.Generator] = None, quantile: float = HOLE_QUANTILE) -> float:
    """The share of prior samples `prior_z` (P, D) that fall in a hole of the latent space: where the aggregate
    posterior of the first half of these N images is below the density it gives the codes z ~ q(z|x) of 99% of the
    other half (held out, so that no code is scored by its own component). About 0.01 (the quantile) where q(z)
    covers the prior; 0.5 where it covers half of it; 1 where the prior's samples all land where no image was
    encoded, and the decoder never learnt what to draw there."""
    half = len(mu) // 2
    if half < 2:
        return float("nan")
    held_mu, held_logvar = mu[half: 2 * half], logvar[half: 2 * half]
    codes = held_mu + torch.exp(0.5 * held_logvar) * torch.randn(held_mu.shape, generator=generator,
                                                                  dtype=mu.dtype, device=mu.device)
    floor = torch.quantile(log_aggregate_posterior(codes, mu[:half], logvar[:half]), quantile)
    return float((log_aggregate_posterior(prior_z.to(mu), mu[:half], logvar[:half]) < floor).float().mean())


def _discrete_mi(a: np.ndarray, b: np.ndarray) -> float:
    """Mutual information in nats between two integer label arrays, from their joint histogram."""
    rows, cols = int(a.max()) + 1, int(b.max()) + 1
    joint = np.bincount(a.astype(np.int64) * cols + b, minlength=rows * cols).reshape(rows, cols)  # counts (a, b)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())


def mig(mu: np.ndarray, factors: np.ndarray, bins: int = 20) -> float:
    """Mutual Information Gap (Chen et al. 2018): per factor, the gap between the two latents most informative
    about it, over the factor's entropy, averaged. Latent means are binned into `bins` equal-width bins."""
    codes = []
    for d in range(mu.shape[1]):
        edges = np.histogram_bin_edges(mu[:, d], bins)
        codes.append(np.digitize(mu[:, d], edges[1:-1]))
    gaps = []
    for k in range(factors.shape[1]):
        v = factors[:, k]
        entropy = _discrete_mi(v, v)
        if entropy <= 0:
            continue
        mis = sorted((_discrete_mi(c, v) for c in codes), reverse=True) + [0.0]
        gaps.append((mis[0] - mis[1]) / entropy)
    return float(np.mean(gaps)) if gaps else float("nan")


def mig_se(mu: np.ndarray, factors: np.ndarray, resamples: int = 20, seed: int = 0) -> float:
    """MIG's standard error: its sd over `resamples` bootstrap resamples of the images (what another draw of the
    same number of images would give). MIG bins and counts, so it moves more than its look suggests."""
    rng = np.random.default_rng(seed)
    draws = [mig(mu[idx], factors[idx]) for idx in (rng.integers(0, len(mu), len(mu)) for _ in range(resamples))]
    return float(np.nanstd(draws, ddof=1))


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey, as PIL's convert("L")
BLUR_WINDOW = 11  # px of the re-blurring box filter (scikit-image's blur_effect default)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) luminance (C = 3) or the channel mean."""
    images = images.float()
    if images.shape[1] == 3:
        return (images * images.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return images.mean(1, keepdim=True)


def blur_effect(images: torch.Tensor, window: int = BLUR_WINDOW) -> torch.Tensor:
    """No-reference blur of each image, 0 (sharp) to 1 (flat): (B, C, H, W) -> (B,). Crete-Roffet et al. 2007.

    Re-blur the image with a `window`-px box filter along each axis and measure how much of the variation
    between neighbouring pixels survives: a sharp image loses most of it (value near 0), an already blurry one
    loses little (value near 1). It is a ratio of the image's own variations, so how many edges an image has
    largely cancels; a perfect step edge gives 1 / window. The value is the blurrier axis's (an axis with no
    variation at all is skipped; an image with none on either axis is 1).
    """
    grey = _grey(images)
    per_axis = []
    for axis in (-2, -1):  # rows, then columns
        shape, pad = ((window, 1), (0, 0, window // 2, window // 2)) if axis == -2 else \
            ((1, window), (window // 2, window // 2, 0, 0))
        box = grey.new_full((1, 1, *shape), 1.0 / window)
        reblurred = F.conv2d(F.pad(grey, pad, mode="replicate"), box)
        d_image, d_reblurred = grey.diff(dim=axis).abs(), reblurred.diff(dim=axis).abs()
        variation = d_image.flatten(1).sum(1)  # (B,)
        lost = (d_image - d_reblurred).clamp_min(0).flatten(1).sum(1)
        per_axis.append(torch.where(variation > 0, (variation - lost) / variation.clamp_min(1e-12), -1.0))
    blur = torch.maximum(*per_axis)
    return torch.where(blur < 0, torch.ones_like(blur), blur)


def laplacian_variance(images: torch.Tensor) -> float:
    """Mean over images of the variance of the Laplacian of the grey image (Pech-Pacheco et al. 2000)."""
    grey = _grey(images)
    lap = F.conv2d(grey, LAPLACIAN.to(grey.device))
    return float(lap.flatten(1).var(1).mean())


def sharpness_ratio(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Laplacian variance of `images` over that of `reference`; below 1 is blurrier than the reference. It
    counts edges, so it also rewards content (more or bolder shapes): blur_effect measures blur itself."""
    return laplacian_variance(images) / max(laplacian_variance(reference), 1e-12)


# ------------------------------------------------------------------------------------------- one split


@dataclass
class Evaluee:
    """A model to evaluate, with its objective (the beta in force at a step) and its run's settings (cfg.eval)."""
    model: VAE
    objective: Objective
    cfg: Any


def batch_sums(model: VAE, x: torch.Tensor, mean_img: torch.Tensor, settings: Sequence[torch.Tensor],
               eps: torch.Tensor, iwae_noise: List[torch.Tensor], iwae_m: int,
               in_use: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """One eval batch x (B, C, H, W) of one model: each term summed over the batch's images (the IWAE NLL over its
    first `iwae_m`), and the posterior (mu, logvar), (B, D) each. Its noise is given (eps (B, D), IWAE's chunks),
    so it is a function of tensors alone: a solo run calls it as it is, the vmap engine maps it over a pack's
    stacked members (`in_use` marks a padded member's own dims)."""
    mu, logvar = model.encode(x)
    if in_use is not None:  # a padded member's extra dims are exactly the prior's: zero KL, zero input
        mu, logvar = torch.where(in_use, mu, 0.0), torch.where(in_use, logvar, 0.0)
    params = model.decode(model.reparameterize(mu, logvar, eps))
    terms = elbo_terms(model.likelihood.nll(params, x), mu, logvar, *settings, in_use)
    terms["mse"] = ((model.likelihood.mean(model.decode(mu)) - x) ** 2).mean()
    terms["mse_mean_image"] = ((mean_img - x) ** 2).mean()
    out = {k: v.float() * len(x) for k, v in terms.items()}  # (kl_per_dim: (D,))
    k = sum(n.shape[1] for n in iwae_noise)
    out["iwae"] = iwae_nll(model, x[:iwae_m], k, mu[:iwae_m], logvar[:iwae_m], iwae_noise, in_use).sum() \
        if iwae_m else mu.new_zeros((), dtype=torch.float32)
    out["mu"], out["logvar"] = mu.float(), logvar.float()
    return out


# a split's batches through batch_sums for several models at once: (x, mean_img, settings, eps, iwae noise, iwae_m)
# -> each model's sums; engines.py gives one for a pack (vmapped), one_by_one is a run's own
Mapper = Callable[..., List[Dict[str, torch.Tensor]]]


def one_by_one(models: List[VAE]) -> Mapper:
    def apply(x, mean_img, settings, eps, iwae, iwae_m):
        return [batch_sums(m, x, mean_img, s, e, n, iwae_m) for m, s, e, n in zip(models, settings, eps, iwae)]
    return apply


@torch.no_grad()
def evaluate(evaluees: List[Evaluee], images: np.ndarray, *, step: int, device: torch.device, mean_img: torch.Tensor,
             iwae_k: int, factors: Optional[np.ndarray] = None, precision: str = "fp32",
             progress: Optional[str] = None, mapper: Optional[Mapper] = None) -> List[Dict[str, object]]:
    """Every metric of the design's list over all images of a split, for each model, in nats per image where it is
    one; IWAE over the first eval.iwae_images of them (None: all), since its k decoder passes per image dominate.
    The models (a pack's members share their eval settings) go through each batch together, by `mapper`.

    `loss` is the objective at the beta in force at `step`. Each model's noise comes from a generator seeded
    EVAL_SEED, drawn in the same order whatever evaluates it with it, so its numbers do not depend on how far
    training's RNG has moved nor on who shares its pack. `progress` names a progress bar; None shows none.
    """
    e0 = evaluees[0].cfg.eval
    batch_size = evaluees[0].cfg.data.eval_batch_size
    models = [e.model for e in evaluees]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    mapper = mapper or one_by_one(models)
    settings = [e.objective._settings_on(step, device) for e in evaluees]
    generators = [torch.Generator(device).manual_seed(EVAL_SEED) for _ in evaluees]
    eps_dtype = autocast_dtype(precision)
    sums: List[Dict[str, torch.Tensor]] = [{} for _ in evaluees]
    mus: List[List[torch.Tensor]] = [[] for _ in evaluees]
    logvars: List[List[torch.Tensor]] = [[] for _ in evaluees]
    n = iwae_n = 0
    with autocast_for(device, precision):
        batches = tqdm(eval_batches(images, batch_size, device), total=math.ceil(len(images) / batch_size),
                       desc=progress, unit="batch", disable=progress is None, leave=False, dynamic_ncols=True)
        for x in batches:
            iwae_m = len(x) if e0.iwae_images is None else max(0, min(len(x), e0.iwae_images - n))
            # each model's noise, in its draw order: the reparameterisation (B, D), then IWAE's chunks (m, c, D)
            eps, iwae = [], []
            for e, g in zip(evaluees, generators):
                d = e.model.latent_dim
                eps.append(torch.randn(len(x), d, generator=g, device=device, dtype=eps_dtype))
                iwae.append([torch.randn(iwae_m, c, d, generator=g, device=device)
                             for c in iwae_chunks(iwae_m, iwae_k)] if iwae_m else [])
            for i, out in enumerate(mapper(x, mean_img.to(device), settings, eps, iwae, iwae_m)):
                for k, v in out.items():
                    if k not in ("mu", "logvar"):
                        sums[i][k] = sums[i].get(k, 0) + v
                mus[i].append(out["mu"].cpu())
                logvars[i].append(out["logvar"].cpu())
            iwae_n += iwae_m
            n += len(x)
        results = [_finish(e, sums[i], torch.cat(mus[i]), torch.cat(logvars[i]), n, iwae_n, iwae_k, images, device,
                           factors) for i, e in enumerate(evaluees)]
    for m, training in zip(models, was_training):
        m.train(training)
    return results


def _finish(e: Evaluee, sums: Dict[str, torch.Tensor], mu_all: torch.Tensor, logvar_all: torch.Tensor, n: int,
            iwae_n: int, iwae_k: int, images: np.ndarray, device: torch.device,
            factors: Optional[np.ndarray]) -> Dict[str, object]:
    """One model's metrics from its sums over the split and its posterior means and log-variances (N, D)."""
    model, cfg = e.model, e.cfg.eval
    out: Dict[str, object] = {k: (v / n).item() for k, v in sums.items() if v.ndim == 0 and k != "iwae"}
    out["iwae_nll"] = (sums["iwae"] / iwae_n).item()
    out["iwae_images"] = iwae_n
    out["kl_per_dim"] = (sums["kl_per_dim"] / n).tolist()
    # the likelihood's sigma: learned or fixed; for gaussian_optimal (set per batch in training) its maximum-
    # likelihood value on this split at the posterior mean, the RMSE
    sigma = model.likelihood.scale()
    if sigma is None and type(model.likelihood).__name__ == "GaussianOptimal":
        sigma = math.sqrt(out["mse"])
    if sigma is not None:
        out["sigma"] = sigma
    dims = int(np.prod(images.shape[1:]))
    out["bits_per_dim"] = bits_per_dim(out["neg_elbo"], dims)
    out["iwae_bits_per_dim"] = bits_per_dim(out["iwae_nll"], dims)
    out["iwae_k"] = iwae_k
    out["active_units"] = active_units(mu_all)
    out["collapsed_units"] = mu_all.shape[1] - out["active_units"]
    # another view of collapse: dims that cost KL, whether or not their mean moves with x (docs/diagnostics.md)
    out["kl_active_units"] = int(sum(kl > cfg.collapse_nats for kl in out["kl_per_dim"]))
    out["collapse_nats"] = cfg.collapse_nats
    mi_images = min(n, cfg.mi_images)
    terms = mutual_info_terms(mu_all[:mi_images], logvar_all[:mi_images],
                              generator=torch.Generator().manual_seed(EVAL_SEED))
    out["mutual_info"], out["mutual_info_se"] = float(terms.mean()), mutual_info_se(terms)
    # the estimator cannot exceed log N (N images in the aggregate posterior): near it, MI is "at least"
    out["mutual_info_max"] = math.log(mi_images)
    out["mutual_info_capped"] = out["mutual_info"] >= out["mutual_info_max"] - MI_CAP_MARGIN
    # ELBO surgery (Hoffman and Johnson 2016): mean KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z)), on the same
    # images and the same z; where MI is capped (at least) the marginal KL is at most this
    marginal = marginal_kl_terms(mu_all[:mi_images], logvar_all[:mi_images], terms)
    out["marginal_kl"], out["marginal_kl_se"] = float(marginal.mean()), mutual_info_se(marginal)
    out["prior_hole_share"] = prior_hole_share(mu_all[:mi_images], logvar_all[:mi_images],
                                               fixed_latents(mi_images // 2, model.latent_dim),
                                               generator=torch.Generator().manual_seed(EVAL_SEED))
    out["prior_hole_floor"] = HOLE_QUANTILE  # the share where q(z) covers the prior: the report's reference line
    z_samples = fixed_latents(cfg.blur_samples, model.latent_dim).to(device)
    out.update(blur_metrics(model, images, z_samples, device))
    if factors is not None:
        out["mig"] = mig(mu_all.numpy(), np.asarray(factors)[:n])
        out["mig_se"] = mig_se(mu_all.numpy(), np.asarray(factors)[:n])
    return out


def blur_metrics(model: VAE, images: np.ndarray, z_samples: torch.Tensor, device: torch.device) -> Dict[str, float]:
    """Prior samples and reconstructions against real images of the split (as many as there are z samples)."""
    real = torch.from_numpy(np.array(images[: len(z_samples)])).float().div(255).to(device)
    samples = model.sample(z_samples.to(device)).float()
    recon = model.reconstruct(real).float()
    return {
        "sample_blur": float(blur_effect(samples).mean()),
        "recon_blur": float(blur_effect(recon).mean()),
        "data_blur": float(blur_effect(real).mean()),  # the same measure on the real images: the floor to compare
        "sharpness_ratio": sharpness_ratio(samples, real),  # kept for the design's metric list; see blur_effect
    }


def evaluate_split(evaluees: List[Evaluee], data, split: str, *, device: torch.device, step: int, iwae_k: int,
                   mean_img: Optional[torch.Tensor] = None, precision: str = "fp32",
                   mapper: Optional[Mapper] = None) -> List[Dict[str, object]]:
    """`evaluate` on one split of the models' data as training does it: the objective at `step`, the split's
    factors, the train split's mean image. Keys are prefixed with the split ("test/iwae_nll")."""
    results = evaluate(evaluees, data.images[split], step=step, device=device,
                       mean_img=mean_img if mean_img is not None else mean_image(data.images["train"]),
                       iwae_k=iwae_k, factors=data.factors.get(split), precision=precision, mapper=mapper,
                       progress=f"eval {split} (IWAE k={iwae_k})" if evaluees[0].cfg.trainer.progress else None)
    return [{f"{split}/{k}": v for k, v in r.items()} for r in results]
