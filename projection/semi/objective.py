"""The semi-supervised objective: MSE on the few pairs plus terms that need no pairs.

Terms (each a mean squared error divided by the total variance of the space it is measured in,
so weights mean the same for any encoder):
- ``pairs``: forward f: src -> tgt and reverse g: tgt -> src on the known pairs;
- ``pseudo``: the same on pseudo-pairs, the mutual nearest neighbours left by the refined closed
  form (``projection.semi.refine.RefinedMap``), which carry most of the signal when pairs are few;
- ``cycle``: g(f(x)) ~ x and f(g(y)) ~ y on a sample of unpaired rows (CycleGAN's / vec2vec's cycle);
- ``mmd``: the distribution of f(x_unpaired) matches that of y_unpaired (Gaussian-kernel MMD,
  several bandwidths), and likewise g(y) against x.

Cycle and MMD alone cannot pin down which source row goes with which target row (any
distribution-preserving bijection satisfies them); they regularise the map the pairs and
pseudo-pairs determine. Why the unpaired terms see a SAMPLE (``SemiConfig.unpaired_batch`` rows)
per step: the kernel matrices are quadratic in the rows; the first version's step took 2.4 s on
3,000 rows (issue 23). The real-vs-real kernel block does not depend on the weights, so it is
computed without autograd, and every forward pass of a step goes through each net ONCE (pairs,
pseudo-pairs and unpaired rows concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from projection.align.projector import Projector


@dataclass
class SemiConfig:
    pairs: float = 1.0
    cycle: float = 0.5
    mmd: float = 0.5
    pseudo: float = 1.0  # 0 = do not use the refined closed form's pseudo-pairs
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)  # multiples of sqrt(2 D) (standardised data)
    steps: int = 600  # optimizer steps; one step = one batch of each kind (also the pairs-only MLP's budget in method.py)
    mlp: bool = False  # align's semi mode: train this MLP from the chosen closed form (see projection/semi/method.py)
    unpaired_batch: int = 128  # unpaired rows per side per step for the cycle and MMD terms
    epoch_steps: int = 50  # steps between checkpoints / validations (one loop "epoch")


def _kernel(a: torch.Tensor, b: torch.Tensor, bandwidths, scale: float) -> torch.Tensor:
    d2 = torch.cdist(a, b).pow(2)  # (n, m)
    return sum(torch.exp(-d2 / (scale * w * w)) for w in bandwidths)


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidths) -> torch.Tensor:
    """Biased multi-kernel Gaussian MMD^2 between samples a (n, D) and b (m, D); only ``a`` carries gradients."""
    scale = 2.0 * a.shape[1]
    with torch.no_grad():  # real vs real: constant in the weights
        kbb = _kernel(b, b, bandwidths, scale).mean()
    return _kernel(a, a, bandwidths, scale).mean() + kbb - 2 * _kernel(a, b, bandwidths, scale).mean()


class SemiObjective(nn.Module):
    """forward f and reverse g, and the weighted sum of the terms above for one step's batches."""

    def __init__(self, f: Projector, g: Projector, var_src: float, var_tgt: float, cfg: SemiConfig):
        super().__init__()
        self.f, self.g, self.cfg = f, g, cfg
        self.var_src, self.var_tgt = var_src, var_tgt

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch: xp/yp pairs, xq/yq pseudo-pairs (optional), xu/yu unpaired samples, zxu/zyu their standardised copies."""
        c, f, g = self.cfg, self.f, self.g
        se_t = lambda p, y: (p - y).pow(2).sum(1).mean() / self.var_tgt  # noqa: E731
        se_s = lambda p, x: (p - x).pow(2).sum(1).mean() / self.var_src  # noqa: E731
        xs, ys = [batch["xp"]], [batch["yp"]]
        if "xq" in batch:
            xs.append(batch["xq"])
            ys.append(batch["yq"])
        xu, yu = batch["xu"], batch["yu"]
        fx_all, gy_all = f(torch.cat(xs + [xu])), g(torch.cat(ys + [yu]))  # one pass per net
        sizes = [len(t) for t in xs] + [len(xu)]
        fp, *fq, fx = fx_all.split(sizes)
        gp, *gq, gy = gy_all.split([len(t) for t in ys] + [len(yu)])
        parts = {"pairs": se_t(fp, batch["yp"]) + se_s(gp, batch["xp"])}
        if fq:
            parts["pseudo"] = se_t(fq[0], batch["yq"]) + se_s(gq[0], batch["xq"])
        if c.cycle:
            parts["cycle"] = se_s(g(fx), xu) + se_t(f(gy), yu)
        if c.mmd:
            zf = (fx - f.out_mean) / f.out_std  # MMD compares shapes, not units
            zg = (gy - f.in_mean) / f.in_std
            parts["mmd"] = mmd(zf, batch["zyu"], c.bandwidths) + mmd(zg, batch["zxu"], c.bandwidths)
        total = sum(getattr(c, k) * v for k, v in parts.items())
        return total, parts
