"""Rotary position embeddings, with the context-extension scalings Hugging Face uses.

Owns: the inverse frequencies for a ``RopeScalingConfig`` (none, linear, dynamic NTK, YaRN,
Llama-3) and applying the rotation to queries and keys at given *position ids*. Positions come
from the caller, never from a tensor's index, so a sequence-parallel slice or a packed document
rotates with its true (global or per-document) position.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling=None, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32) and the attention scale applied to cos/sin."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = getattr(scaling, "type", "none") if scaling is not None else "none"
    mscale = 1.0
    if kind == "none":
        pass
    elif kind == "linear":
        inv = inv / scaling.factor
    elif kind == "dynamic":
        # NTK-aware: grow the base once the sequence exceeds the original context.
        orig = scaling.original_max_position
        if seq_len > orig:
            base = theta * ((scaling.factor * seq_len / orig) - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
            inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    elif kind == "llama3":
        orig = scaling.original_max_position
        low_wl = orig / scaling.low_freq_factor
        high_wl = orig / scaling.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / scaling.factor, inv)
        smooth = (orig / wl - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        mid = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_mid = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(is_mid, mid, scaled)
    elif kind == "yarn":
        orig = scaling.original_max_position
        factor = scaling.factor

        def dim_for(n_rot: float) -> float:
            return (head_dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

        low = max(math.floor(dim_for(scaling.beta_fast)), 0)
        high = min(math.ceil(dim_for(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        af = scaling.attention_factor
        mscale = af if af is not None else (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    else:
        raise ValueError(f"model.rope_scaling.type={kind!r} is unknown; use none, linear, dynamic, yarn or llama3.")
    return inv.float(), mscale


class Rotary(torch.nn.Module):
    """Holds the inverse frequencies as a buffer; ``forward(position_ids)`` gives (cos, sin)."""

    def __init__(self, head_dim: int, theta: float, scaling=None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        inv, mscale = rope_inv_freq(head_dim, theta, scaling)
        self.mscale = mscale
        self.register_buffer("inv_freq", inv, persistent=False)

    def reset_parameters(self) -> None:
        inv, self.mscale = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        self.inv_freq = inv.to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq
        if self.scaling is not None and getattr(self.scaling, "type", "none") == "dynamic":
            seq = int(position_ids.max().item()) + 1
            inv, _ = rope_inv_freq(self.head_dim, self.theta, self.scaling, seq_len=seq)
            inv = inv.to(position_ids.device)
        ang = position_ids.to(torch.float32)[..., None] * inv  # [B, S, D/2]
        ang = torch.cat([ang, ang], dim=-1)  # [B, S, D] (Hugging Face "rotate_half" layout)
        return ang.cos() * self.mscale, ang.sin() * self.mscale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos/sin: [B, S, D]."""
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin
