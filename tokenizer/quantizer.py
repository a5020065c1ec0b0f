"""Vector quantizer: latents -> nearest codebook entries, with the straight-through estimator.

Codes live in a low-dimensional lookup space (factorised codes, as in ViT-VQGAN): latents
are projected down to `code_dim`, optionally l2-normalised, matched to the nearest code,
and the chosen code is projected back up. Small, normalised codes keep codebook usage
high; dead codes are restarted from recent encoder outputs.

Under data-parallel training every rank holds a replica of the codebook state. The EMA
statistics, the usage that decides which codes are dead, and the vectors that restart them
are shared between ranks (all-reduced, or broadcast from rank zero) so that replicas never
drift apart; with a single process these collectives are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizer.base.configs import checked_config


@checked_config("tokenizer.model.quantizer")
@dataclass
class QuantizerConfig:
    num_codes: int = 1024
    code_dim: int = 8  # dimension of the lookup space
    l2_normalize: bool = True  # cosine-similarity codes
    beta: float = 0.25  # weight of the commitment term (encoder pulled toward its codes)
    use_ema: bool = False  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    dead_code_steps: int = 200  # restart a code unused for this many training steps; 0 = never
    usage_window: int = 16384  # usage and perplexity are measured over this many latest codes

    def __post_init__(self) -> None:
        if self.num_codes < 2:
            raise ValueError(f"quantizer.num_codes must be at least 2, got {self.num_codes}.")
        if self.code_dim < 1:
            raise ValueError(f"quantizer.code_dim must be positive, got {self.code_dim}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"quantizer.ema_decay must be in (0, 1), got {self.ema_decay}.")
        if self.usage_window < 1:
            raise ValueError(f"quantizer.usage_window must be positive, got {self.usage_window}.")


class CodebookStats(NamedTuple):
    usage: float  # fraction of the codebook seen among the counted codes
    perplexity: float  # exp(entropy) of the code histogram
    num_counted: int  # how many codes the figures are taken over


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, C, h, w) straight-through latents for the decoder
    codes: torch.Tensor  # (B, h, w) long
    loss: torch.Tensor  # codebook + beta * commitment (commitment only with EMA)
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


def histogram_stats(counts: torch.Tensor) -> CodebookStats:
    """Usage and perplexity of a (K,) histogram of codes. Histograms from several ranks add up
    to the histogram of all their codes, whatever number of codes each rank holds."""
    counts = counts.double()
    total = int(counts.sum().item())
    if total == 0:
        return CodebookStats(usage=0.0, perplexity=0.0, num_counted=0)
    probs = counts / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    usage = (counts > 0).sum().item() / counts.numel()
    return CodebookStats(usage=usage, perplexity=entropy.exp().item(), num_counted=total)


def codebook_stats(codes: torch.Tensor, num_codes: int) -> CodebookStats:
    """Usage and perplexity of a fixed set of codes (negative entries are ignored)."""
    codes = codes.flatten()
    return histogram_stats(torch.bincount(codes[codes >= 0], minlength=num_codes))


def distributed() -> bool:
    """True when torch.distributed runs with more than one process (DDP or FSDP)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """`tensor` reduced over every rank (in place); unchanged with a single process."""
    if distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def all_ranks_true(flags: torch.Tensor) -> torch.Tensor:
    """Elementwise AND of a bool tensor over every rank."""
    return all_reduce(flags.to(torch.uint8), dist.ReduceOp.MIN).bool()


def any_rank_true(flags: torch.Tensor) -> torch.Tensor:
    """Elementwise OR of a bool tensor over every rank."""
    return all_reduce(flags.to(torch.uint8), dist.ReduceOp.MAX).bool()


def from_rank_zero(tensor: torch.Tensor) -> torch.Tensor:
    """Rank zero's `tensor` on every rank (in place); unchanged with a single process."""
    if distributed():
        dist.broadcast(tensor, src=0)
    return tensor


class VectorQuantizer(nn.Module):
    def __init__(self, config: QuantizerConfig, latent_dim: int) -> None:
        super().__init__()
        self.config = config
        self.latent_dim = latent_dim
        factorised = config.code_dim != latent_dim
        self.project_in = nn.Linear(latent_dim, config.code_dim) if factorised else nn.Identity()
        self.project_out = nn.Linear(config.code_dim, latent_dim) if factorised else nn.Identity()
        self.codebook = nn.Parameter(torch.randn(config.num_codes, config.code_dim))
        self.codebook.requires_grad_(not config.use_ema)
        if config.use_ema:
            self.register_buffer("ema_cluster_size", torch.ones(config.num_codes))
            self.register_buffer("ema_code_sum", self.codebook.data.clone())
        self.register_buffer("steps_unused", torch.zeros(config.num_codes, dtype=torch.long))
        self.register_buffer("num_restarted", torch.zeros((), dtype=torch.long))
        self.register_buffer(
            "recent_codes",
            torch.full((config.usage_window,), -1, dtype=torch.long),
            persistent=False,
        )
        self.register_buffer("recent_position", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def lookup_vectors(self) -> torch.Tensor:
        """The codebook as it is compared against latents. # (K, D)"""
        codebook = self.codebook.float()
        return F.normalize(codebook, dim=-1) if self.config.l2_normalize else codebook

    def to_lookup_space(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) encoder latents -> (N, D) vectors in the lookup space, in fp32."""
        flat = rearrange(latents, "b c h w -> (b h w) c").float()
        projected = self.project_in(flat)
        return F.normalize(projected, dim=-1) if self.config.l2_normalize else projected

    def nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each (N, D) vector. # (N,)"""
        codebook = self.lookup_vectors()
        if self.config.l2_normalize:
            return (vectors @ codebook.t()).argmax(dim=-1)
        distances = (
            vectors.pow(2).sum(-1, keepdim=True)
            - 2 * vectors @ codebook.t()
            + codebook.pow(2).sum(-1)[None, :]
        )
        return distances.argmin(dim=-1)

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = latents.shape
        with torch.autocast(device_type=latents.device.type, enabled=False):
            vectors = self.to_lookup_space(latents)  # (N, D)
            codes = self.nearest_codes(vectors)  # (N,)
            # a batch with a NaN or inf latent leaves the codebook state alone (its step is
            # skipped by the training module), written as a mask so that nothing waits on it;
            # in training, a non-finite batch on any rank leaves every rank's state alone
            finite = torch.isfinite(vectors).all()
            if self.training:
                finite = all_ranks_true(finite)
            if self.training and self.config.use_ema:
                self._ema_update(vectors.detach(), codes, finite)
            chosen = self.lookup_vectors()[codes]  # (N, D)
            commitment_loss = F.mse_loss(vectors, chosen.detach())
            if self.config.use_ema:
                codebook_loss = torch.zeros((), device=latents.device)
            else:
                codebook_loss = F.mse_loss(chosen, vectors.detach())
            loss = codebook_loss + self.config.beta * commitment_loss
            straight_through = vectors + (chosen - vectors).detach()
            quantized = self.project_out(straight_through)
        if self.training:
            self._track_usage(codes, finite)
            if self.config.dead_code_steps > 0:
                self._restart_dead_codes(vectors.detach(), finite)
        quantized = rearrange(quantized, "(b h w) c -> b c h w", b=b, h=h, w=w)
        codes = rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w)
        return QuantizerOutput(quantized, codes, loss, commitment_loss, codebook_loss)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, C, h, w) latents for the decoder."""
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise ValueError(f"codes must lie in [0, {self.num_codes}); got values outside.")
        vectors = self.project_out(self.lookup_vectors()[codes])  # (B, h, w, C)
        return rearrange(vectors, "b h w c -> b c h w")

    def stats(self) -> CodebookStats:
        """Usage and perplexity over the last `usage_window` codes seen in training."""
        return codebook_stats(self.recent_codes, self.num_codes)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, codes: torch.Tensor, finite: torch.Tensor) -> None:
        """Running means of the latents assigned to each code.

        Only codes used in this batch are updated: an unused code keeps its vector until it is
        restarted, instead of decaying toward zero (where l2-normalisation is undefined). Counts
        and sums are totals over every rank's batch, as if one process had seen them all.
        """
        decay = self.config.ema_decay
        counts = torch.bincount(codes, minlength=self.num_codes).type_as(vectors)  # (K,)
        sums = torch.zeros_like(self.ema_code_sum).index_add_(0, codes, vectors)  # (K, D)
        totals = all_reduce(torch.cat([counts[:, None], sums], dim=1), dist.ReduceOp.SUM)
        counts, sums = totals[:, 0], totals[:, 1:]
        used = (counts > 0) & finite
        self.ema_cluster_size.copy_(
            torch.where(
                used, decay * self.ema_cluster_size + (1 - decay) * counts, self.ema_cluster_size
            )
        )
        self.ema_code_sum.copy_(
            torch.where(
                used[:, None], decay * self.ema_code_sum + (1 - decay) * sums, self.ema_code_sum
            )
        )
        self.codebook.data.copy_(self.ema_code_sum / self.ema_cluster_size[:, None])

    @torch.no_grad()
    def _track_usage(self, codes: torch.Tensor, finite: torch.Tensor) -> None:
        window = self.config.usage_window
        codes = codes[-window:]
        positions = (
            self.recent_position + torch.arange(codes.numel(), device=codes.device)
        ) % window
        self.recent_codes[positions] = torch.where(finite, codes, self.recent_codes[positions])
        self.recent_position.copy_((self.recent_position + codes.numel() * finite) % window)
        used = torch.zeros(self.num_codes, dtype=torch.bool, device=codes.device)
        used[codes] = True
        used = any_rank_true(used)  # a code used by any rank is alive on all of them
        self.steps_unused.add_(finite.long()).masked_fill_(used & finite, 0)

    @torch.no_grad()
    def _restart_dead_codes(self, vectors: torch.Tensor, finite: torch.Tensor) -> None:
        """Move codes unused for `dead_code_steps` steps onto random recent encoder outputs.

        Written with masks rather than indexing so a training step never waits on the device.
        Every rank restarts the same codes (steps_unused agrees across ranks) with rank zero's
        picks, so the replicas' codebooks stay identical.
        """
        dead = ((self.steps_unused >= self.config.dead_code_steps) & finite)[:, None]  # (K, 1)
        picks = torch.randint(0, vectors.shape[0], (self.num_codes,), device=vectors.device)
        replacements = from_rank_zero(vectors[picks].contiguous())  # (K, D), used where dead
        self.codebook.data.copy_(torch.where(dead, replacements, self.codebook.data))
        if self.config.use_ema:
            self.ema_code_sum.copy_(torch.where(dead, replacements, self.ema_code_sum))
            self.ema_cluster_size.masked_fill_(dead[:, 0], 1.0)
        self.steps_unused.masked_fill_(dead[:, 0], 0)
        self.num_restarted.add_(dead.sum())
