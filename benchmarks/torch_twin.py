"""PyTorch twins of the normguard_jax generators, for speed comparisons only.

The library never imports this module; it needs the optional ``bench`` extra (``torch``).
Each twin is a plain ``torch.nn.Module`` written the way a PyTorch user would write it: NCHW
images, ``nn.Conv2d``/``nn.Linear``/``nn.GroupNorm``, ``F.scaled_dot_product_attention``.
Module attribute names follow the Flax modules one for one, so :func:`load_jax_params` can copy
a Flax parameter tree into a twin by path, converting only the layouts:

* Linear kernel (in, out)            -> weight (out, in)
* Conv kernel (kh, kw, in, out)      -> weight (out, in, kh, kw)
* GroupNorm scale, Embed embedding   -> weight

Calling a twin: ``x`` (B, C, H, W) float32 (NCHW, the PyTorch layout; the JAX models take NHWC),
``sigma`` (B,) float32 in [0, 1] (scaled by 1000 inside, as in JAX), ``cond`` (B,) int64 in
[0, num_classes] (``num_classes`` is the null class) -> ``v`` (B, C, H, W) float32.

:func:`euler_sample` is the twin of ``normguard_jax.sampling.sample(method="ode")`` with
classifier-free guidance as in ``sampling.guided_velocity``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIGMA_SCALE = 1000.0  # σ ∈ [0, 1] is embedded as σ·1000, as in normguard_jax.models.embeddings.


# ----------------------------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) -> (B, dim) ``[cos(t·f_k), sin(t·f_k)]``, ``f_k = max_period^(-k/(dim/2))``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d_position_embedding(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h·grid_w, dim) float32: row embedding then column embedding, each [sin, cos]."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10_000.0 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        ang = pos.astype(np.float64)[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.concatenate([one_axis(dim // 2, rows.reshape(-1)),
                           one_axis(dim // 2, cols.reshape(-1))], axis=1).astype(np.float32)


class ConditionEmbedding(nn.Module):
    """c = fc2(SiLU(fc1(sinusoid(σ·1000)))) + class_table[cond]: (B,), (B,) -> (B, dim)."""

    def __init__(self, dim: int, num_classes: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.class_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = sinusoidal_embedding(sigma * SIGMA_SCALE, self.freq_dim)
        return self.fc2(F.silu(self.fc1(t))) + self.class_table(cond)


def _attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv (B, T, 3·D) laid out as (3, heads, D/heads) per token -> (B, T, D)."""
    b, t, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.reshape(b, t, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)            # (B, heads, T, D/heads)
    return out.transpose(1, 2).reshape(b, t, d)


# ----------------------------------------------------------------------------------------------
# U-Net (twin of normguard_jax/models/unet.py).
# ----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=-1)
        h = self.norm2(h) * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv2(F.silu(h))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, ch, eps=1e-6)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)       # (B, h·w, ch)
        out = self.proj(_attention(self.qkv(tokens), self.num_heads))
        return x + out.transpose(1, 2).reshape(b, ch, h, w)


class UNet(nn.Module):
    """Twin of ``normguard_jax.models.unet.UNet`` (same constructor arguments, NCHW)."""

    def __init__(self, *, image_shape: tuple[int, int, int], num_classes: int,
                 base_channels: int, channel_mults: Sequence[int], num_res_blocks: int,
                 num_groups: int, attention: bool = True, num_heads: int = 1,
                 emb_dim: int | None = None, freq_dim: int | None = None, **unused: Any):
        super().__init__()
        del unused  # dtype / remat options of the JAX model
        _, _, ch_in = image_shape
        widths = [base_channels * m for m in channel_mults]
        emb_dim = emb_dim or 4 * base_channels
        freq_dim = freq_dim or base_channels
        self.cond_embed = ConditionEmbedding(emb_dim, num_classes, freq_dim)
        self.stem = nn.Conv2d(ch_in, widths[0], 3, padding=1)
        down, skip_widths, ch = [], [widths[0]], widths[0]
        for level, out in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(ResBlock(ch, out, emb_dim, num_groups))
                ch = out
                skip_widths.append(ch)
            if level != len(widths) - 1:
                down.append(Downsample(ch))
                skip_widths.append(ch)
        self.down = nn.ModuleList(down)
        middle = [ResBlock(ch, ch, emb_dim, num_groups)]
        if attention:
            middle.append(AttentionBlock(ch, num_heads, num_groups))
        middle.append(ResBlock(ch, ch, emb_dim, num_groups))
        self.middle = nn.ModuleList(middle)
        up = []
        for level in reversed(range(len(widths))):
            out = widths[level]
            for _ in range(num_res_blocks + 1):
                up.append(ResBlock(ch + skip_widths.pop(), out, emb_dim, num_groups))
                ch = out
            if level != 0:
                up.append(Upsample(ch))
        self.up = nn.ModuleList(up)
        self.out_norm = nn.GroupNorm(num_groups, ch, eps=1e-6)
        self.out_conv = nn.Conv2d(ch, ch_in, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.cond_embed(sigma, cond)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))


# ----------------------------------------------------------------------------------------------
# DiT (twin of normguard_jax/models/dit.py).
# ----------------------------------------------------------------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sa, ca, ga, sm, cm, gm = self.modulation(F.silu(c)).chunk(6, dim=-1)
        attn = self.proj(_attention(self.qkv(_modulate(self.norm1(x), sa, ca)), self.num_heads))
        x = x + ga[:, None, :] * attn
        h = self.fc2(F.gelu(self.fc1(_modulate(self.norm2(x), sm, cm)), approximate="tanh"))
        return x + gm[:, None, :] * h


class ConvRefiner(nn.Module):
    def __init__(self, image_channels: int, channels: int, cond_dim: int, extra_channels: int):
        super().__init__()
        groups = 4 if channels % 4 == 0 else 1
        self.conv_in = nn.Conv2d(2 * image_channels + extra_channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.cond_proj = nn.Linear(cond_dim, 2 * channels)
        self.conv_mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, image_channels, 3, padding=1)

    def forward(self, v, x, c, features=None):
        parts = [v, x] if features is None else [v, x, features]
        h = self.conv_in(torch.cat(parts, dim=1))
        scale, shift = self.cond_proj(F.silu(c)).chunk(2, dim=-1)
        h = self.norm(h) * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv_mid(F.silu(h))
        return v + self.conv_out(F.silu(h))


class DiT(nn.Module):
    """Twin of ``normguard_jax.models.dit.DiT`` (same constructor arguments, NCHW)."""

    def __init__(self, *, image_shape: tuple[int, int, int], num_classes: int, patch_size: int,
                 hidden_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 freq_dim: int = 256, refine_channels: int = 0, input_skip: bool = False,
                 stem_channels: int = 0, **unused: Any):
        super().__init__()
        del unused
        h, w, ch = image_shape
        self.image_shape = tuple(image_shape)
        self.patch_size = patch_size
        if stem_channels:
            self.stem = nn.ModuleList([nn.Conv2d(ch, stem_channels, 3, padding=1),
                                       nn.Conv2d(stem_channels, stem_channels, 3, padding=1)])
        else:
            self.stem = None
        self.patch_embed = nn.Linear(patch_size * patch_size * (stem_channels or ch), hidden_dim)
        self.cond_embed = ConditionEmbedding(hidden_dim, num_classes, freq_dim)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_dim, eps=1e-6, elementwise_affine=False)
        self.final_modulation = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.final_linear = nn.Linear(hidden_dim, patch_size * patch_size * ch)
        self.refiner = (ConvRefiner(ch, refine_channels, hidden_dim, stem_channels)
                        if refine_channels else None)
        self.skip_gain = nn.Linear(hidden_dim, ch) if input_skip else None
        pos = sincos_2d_position_embedding(hidden_dim, h // patch_size, w // patch_size)
        self.register_buffer("pos", torch.from_numpy(pos)[None], persistent=False)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, p·p·C), values ordered (row in patch, column, channel)."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w, c = self.image_shape
        p = self.patch_size
        b = tokens.shape[0]
        x = tokens.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        features = None
        if self.stem is not None:
            features = self.stem[1](F.silu(self.stem[0](x)))
        tokens = self.patch_embed(self._patchify(x if features is None else features)) + self.pos
        c = self.cond_embed(sigma, cond)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        out = self._unpatchify(self.final_linear(_modulate(self.final_norm(tokens), shift, scale)))
        if self.refiner is not None:
            out = self.refiner(out, x, c, features)
        if self.skip_gain is not None:
            out = out + self.skip_gain(F.silu(c))[:, :, None, None] * x
        return out


TWINS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}


def build_twin(name: str, *, image_shape, num_classes: int, **size_kwargs: Any) -> nn.Module:
    """The twin of ``normguard_jax.models.build_generator(name, ...)`` (random init)."""
    return TWINS[name](image_shape=tuple(image_shape), num_classes=num_classes, **size_kwargs)


# ----------------------------------------------------------------------------------------------
# Parameters and sampling.
# ----------------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = np.asarray(value)
    return out


def jax_params_to_state_dict(params: Any) -> dict[str, torch.Tensor]:
    """Flax parameters (``nnx.State`` or nested dict) -> a twin's ``state_dict``.

    Names map path for path (``down/0/conv1/kernel`` -> ``down.0.conv1.weight``); kernels are
    transposed to PyTorch layouts (see the module docstring).
    """
    if hasattr(params, "to_pure_dict"):
        params = params.to_pure_dict()
    state = {}
    for path, value in _flatten(params).items():
        module, _, leaf = path.rpartition(".")
        if leaf == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        state[f"{module}.{leaf}"] = torch.from_numpy(np.array(value, np.float32, copy=True, order="C"))
    return state


def load_jax_params(twin: nn.Module, params: Any) -> nn.Module:
    """Copies Flax parameters into ``twin`` (strict: every tensor of the twin must be set)."""
    twin.load_state_dict(jax_params_to_state_dict(params), strict=True)
    return twin


def guided_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, *,
                    guidance_scale: float, null_class: int) -> torch.Tensor:
    """CFG ``v_u + w·(v_c - v_u)`` from one call on ``[x; x]`` with ``[cond; null]``; w = 1:
    the plain conditional velocity (one call on x)."""
    if guidance_scale == 1.0:
        return model(x, sigma, cond)
    b = x.shape[0]
    both = model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                 torch.cat([cond, torch.full_like(cond, null_class)]))
    v_cond, v_uncond = both[:b], both[b:]
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def euler_sample(model, x: torch.Tensor, cond: torch.Tensor, sigmas: np.ndarray, *,
                 guidance_scale: float, null_class: int) -> torch.Tensor:
    """Deterministic Euler sampling ``x ← x + (σ_{k+1} - σ_k)·v`` over a schedule.

    Args:
      model: a twin (or its ``torch.compile`` wrapper).
      x: (B, C, H, W) starting noise at σ = sigmas[0] = 1.
      cond: (B,) int64 labels.
      sigmas: (N+1,) float32 schedule ending in 0, e.g. ``normguard_jax.flow.inference_sigmas``.
      guidance_scale, null_class: classifier-free guidance.

    Returns:
      (B, C, H, W) final states (σ = 0).
    """
    sig = torch.from_numpy(np.array(sigmas, np.float32))
    for k in range(len(sigmas) - 1):
        s = sig[k].expand(x.shape[0])
        v = guided_velocity(model, x, s, cond, guidance_scale=guidance_scale,
                            null_class=null_class)
        x = x + (sig[k + 1] - sig[k]) * v
    return x
