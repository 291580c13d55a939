"""VAE models: encode(x) -> (mu, logvar), reparameterize, decode(z) -> likelihood parameters."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .likelihoods import Likelihood


class VAE(nn.Module):
    """Shared VAE plumbing; subclasses set `encoder` (x -> 2*latent) and `decoder` (z -> params)."""

    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, likelihood: Likelihood, latent_dim: int):
        super().__init__()
        self.likelihood = likelihood
        self.latent_dim = latent_dim

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> mu, logvar, each (B, latent_dim); the Gaussian q(z|x)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014); `eps` given: that noise (a packed member
        draws its own from its own generator, the numbers its solo run would draw here)."""
        return mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if eps is None else eps)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> likelihood parameters (B, num_params * C, H, W)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, eps)), mu, logvar

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, and a state dict of an earlier version loads too (fold_bn_biases)."""
        return super().load_state_dict(fold_bn_biases(state_dict)[0], strict, assign)

    def latent_layout(self) -> Dict[str, str]:
        """The parameters whose shape follows latent_dim, and along what: "rows" for the encoder's last Linear
        ((2 * latent_dim, ...): rows [mu | logvar]), "columns" for the decoder's first Linear weight ((F, latent_dim))."""
        head = f"encoder.{len(self.encoder) - 1}"
        return {f"{head}.weight": "rows", f"{head}.bias": "rows", "decoder.0.weight": "columns"}

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder mean images (B, C, H, W) in [0, 1] for latents z."""
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder mean at the posterior mean, the usual deterministic reconstruction."""
        return self.likelihood.mean(self.decode(self.encode(x)[0]))


# A conv straight into BatchNorm has no bias: BatchNorm subtracts the batch mean, so such a bias has a true
# gradient of exactly zero, and Adam would turn the rounding noise of that zero into full-size steps (a random walk
# that BatchNorm's running mean follows, so eval numbers differ between any two implementations). BatchNorm's own
# shift is that parameter. Checkpoints of earlier versions, which had the bias, load through fold_bn_biases.
def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU())


def _up(c_in: int, c_out: int, output_padding: int = 1) -> nn.Sequential:
    """Doubles the size (output_padding 1) or doubles it less one (0), undoing a _down of an odd size."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=output_padding, bias=False),
        nn.BatchNorm2d(c_out), nn.LeakyReLU(),
    )


def fold_bn_biases(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """A model state dict of an earlier version, whose convs before BatchNorm had a bias b, in this version's form:
    b folded into the BatchNorm's running mean (eval: BN(y + b) with mean m is BN(y) with mean m - b; train: BN
    subtracts the batch mean, so b never counted). Returns the new state dict and the keys of the biases folded."""
    folded, out = [], dict(state)
    for key in state:
        if not key.endswith(".0.bias"):
            continue
        stage = key[: -len(".0.bias")]
        if f"{stage}.1.running_mean" in state:  # (B, C) conv bias into BatchNorm2d(C): a _down or _up stage
            out[f"{stage}.1.running_mean"] = state[f"{stage}.1.running_mean"] - state[key]
            del out[key]
            folded.append(key)
    return out, folded


def conv_sizes(image_size: int, stages: int) -> List[int]:
    """Side length after each stride-2 stage, rounding up: 64 -> [64, 32, 16, 8, 4], 28 -> [28, 14, 7, 4, 2]."""
    sizes = [image_size]
    for _ in range(stages):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvVAE(VAE):
    """Stride-2 conv stages down to (hidden[-1], s, s), and mirrored up to exactly the input size.

    With hidden [32, 64, 128, 256, 512] at 64x64 this is PyTorch-VAE's VanillaVAE. Any size works: an odd side
    rounds up on the way down (28 -> 14 -> 7 -> 4 -> 2) and the matching upsampling drops the extra pixel, so
    MNIST-like data train at their native 28x28.
    """

    def __init__(self, channels: int, image_size: int, hidden: List[int], latent_dim: int, likelihood: Likelihood):
        super().__init__(likelihood, latent_dim)
        sizes = conv_sizes(image_size, len(hidden))
        s = sizes[-1]
        widths = [channels, *hidden]
        self.encoder = nn.Sequential(
            *[_down(a, b) for a, b in zip(widths[:-1], widths[1:])],
            nn.Flatten(),  # (B, hidden[-1] * s * s)
            nn.Linear(hidden[-1] * s * s, 2 * latent_dim),
        )
        rev = hidden[::-1]
        # upsampling from sizes[i + 1] to sizes[i] gives 2 * sizes[i + 1] - 1 + output_padding pixels
        pads = [big - (2 * small - 1) for big, small in zip(sizes[-2::-1], sizes[:0:-1])]
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, rev[0] * s * s),
            nn.Unflatten(1, (rev[0], s, s)),
            *[_up(a, b, p) for a, b, p in zip(rev, [*rev[1:], rev[-1]], pads)],  # len(hidden) upsamplings
            nn.Conv2d(rev[-1], likelihood.num_params * channels, 3, padding=1),
        )


class MLPVAE(VAE):
    """Fully connected; hidden lists the widths. [400], latent 20, 28x28 is the 784-400-20 VAE."""

    def __init__(self, channels: int, image_size: int, hidden: List[int], latent_dim: int, likelihood: Likelihood):
        super().__init__(likelihood, latent_dim)
        d = channels * image_size * image_size
        enc, dec = [nn.Flatten()], []
        for a, b in zip([d, *hidden[:-1]], hidden):
            enc += [nn.Linear(a, b), nn.ReLU()]
        rev = hidden[::-1]
        for a, b in zip([latent_dim, *rev[:-1]], rev):
            dec += [nn.Linear(a, b), nn.ReLU()]
        out = likelihood.num_params * channels
        self.encoder = nn.Sequential(*enc, nn.Linear(hidden[-1], 2 * latent_dim))
        self.decoder = nn.Sequential(
            *dec, nn.Linear(hidden[0], out * image_size * image_size), nn.Unflatten(1, (out, image_size, image_size))
        )


MODELS = {"conv": ConvVAE, "mlp": MLPVAE}


def build_model(model_cfg, data_cfg, likelihood: Likelihood) -> VAE:
    """Config -> model, by the small name -> class table above."""
    cls = MODELS[model_cfg.name]
    return cls(data_cfg.channels, data_cfg.image_size, list(model_cfg.hidden_channels), model_cfg.latent_dim, likelihood)
