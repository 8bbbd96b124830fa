"""04 · Latent DDPM with Lad's locality condition and classifier-free guidance (paper §3.3, Fig. 2b, 3).

Reads  --prep (default data/prep): images/, masks/ (02), split.json; --vqgan (default runs/vqgan/ckpt.pt).
Writes --out  (default runs/diffusion):
    cache.pt    training latents, mask latents, Betti vectors; reused while the VQ-GAN is unchanged
    ckpt.pt     denoiser + EMA weights, optimiser, scaler, RNG, step, args and constructor arguments
    log.csv     loss, ms/step, volumes/s, peak memory per log interval
    previews/   EMA samples conditioned on held-out masks at each save, mask outlined

Denoiser: Medical Diffusion's pseudo-3-D Unet3D (docs/reference.md §3): (1, 3, 3) convs, per-slice
linear attention, depth attention with a relative position bias, full attention in the middle, on
VQ-GAN latents scaled to [-1, 1]. Diffusion: 300 steps, cosine schedule, noise prediction, L1 loss.

The locality condition c (§3.3.2) joins the time embedding:
  content   the mask (labels 0/1/2 as floats) through the frozen VQ-GAN encoder, then two
            *learnable* stride-2 Conv3d 8 -> 4 -> 1, flattened (512 at the paper's shapes);
  structure per slice and label 0/1/2 the Betti numbers β0, β1 (cubical complex, cripser's
            T-construction): 32 × 6 = 192, fed as log(1 + β).
--cond selects Table 2's rows: none (V0, Medical Diffusion), content (V1), structure (V2), both
(V3; "Full" when the VQ-GAN was trained with the locality loss). Classifier-free guidance: with
probability --p-uncond 0.25 the condition is replaced by a *learned* null embedding.
Beyond the paper, --spatial also puts the mask where the organ goes: its latent (the content
extractor's input) joins z_t as 8 more input channels, a learned null map when the condition is
dropped; alone with --cond none, beside the paper's vector with --cond both (docs/spatial.md).

Where we differ from the authors' release, on purpose (docs/reference.md §3):
  1. the two content convs are trained parameters (the release created them anew inside each
     forward call: fixed random projections that no optimiser ever saw);
  2. the null condition is learned (the release drew fresh Gaussian noise: ε(z) was ill-defined);
  3. sampling applies Eq. 4 for every w, including w = 1 (05_sample.py; the release returned
     the conditional prediction alone when cond_scale = 1).

    python 04_diffusion.py                                 # the paper: 150k steps, batch 20, --cond both
    torchrun --nproc_per_node 2 04_diffusion.py --batch-size 10
    python 04_diffusion.py --cond none --out runs/diffusion_v0   # Medical Diffusion (V0)
    python 04_diffusion.py --spatial --out runs/diffusion_spatial # beyond the paper: + the mask as channels
"""
import copy
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cripser
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (MASK_NAMES, ArgumentParser, at_least, bar, checkpoint_parts, csv_logger, ddp_check,
                    duration, eta, file_fingerprint, first_step_line, free_memory, in_range, load_checkpoint,
                    load_stage, open_resume, peak_memory_gb, positive, prepare_out, print0, read_nifti,
                    read_split, resume, run_stage, save_checkpoint, save_preview, sizing_note,
                    soft_tissue, start_run, teardown_distributed, training_data_record,
                    training_state, xyz_to_dhw)


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    p.add_argument("--prep", type=Path, default=Path("data/prep"),
                   help="01/02 output (images/, masks/, split.json)")
    p.add_argument("--vqgan", type=Path, default=Path("runs/vqgan/ckpt.pt"),
                   help="03's checkpoint (frozen here)")
    p.add_argument("--out", type=Path, default=Path("runs/diffusion"), help="run folder")
    m = p.add_argument_group("model (docs/reference.md §3)")
    m.add_argument("--cond", choices=["none", "content", "structure", "both"], default="both",
                   help="locality condition (Table 2): none = V0, content = V1, structure = V2, "
                        "both = V3/Full")
    m.add_argument("--spatial", action="store_true",
                   help="beyond the paper: the mask's latent also joins z_t as input channels")
    m.add_argument("--dim", type=at_least(1), default=64, help="Unet3D base width")
    m.add_argument("--dim-mults", type=at_least(1), nargs="+", default=(1, 2, 4, 8),
                   help="width multipliers per level")
    m.add_argument("--attn-heads", type=at_least(1), default=8)
    m.add_argument("--attn-dim-head", type=at_least(1), default=32)
    m.add_argument("--timesteps", type=at_least(1), default=300, help="diffusion steps T")
    m.add_argument("--p-uncond", type=in_range(0, 1), default=0.25,
                   help="condition dropout for classifier-free guidance (§3.4.2)")
    t = p.add_argument_group("training (paper §4.1.3)")
    t.add_argument("--steps", type=at_least(1), default=150_000)
    t.add_argument("--batch-size", type=at_least(1), default=20,
                   help="latents per step per GPU (effective batch = this × GPUs × accum)")
    t.add_argument("--grad-accum", type=at_least(1), default=1)
    t.add_argument("--micro-batch", type=at_least(0), default=0,
                   help="samples per forward/backward piece of a batch; 0 = what fits in free memory. "
                        "The same step either way (the batch's random draws are made at once)")
    t.add_argument("--lr", type=positive, default=1e-4)
    t.add_argument("--ema-decay", type=in_range(0, 1), default=0.995)
    t.add_argument("--ema-every", type=at_least(1), default=10, help="steps between EMA updates (reference)")
    t.add_argument("--ema-start", type=at_least(0), default=2000,
                   help="before this step the EMA copies the weights (reference)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    t.add_argument("--device", default="auto")
    t.add_argument("--log-every", type=at_least(1), default=50)
    t.add_argument("--save-every", type=at_least(1), default=1000, help="checkpoint + preview samples")
    t.add_argument("--n-preview", type=at_least(0), default=None,
                   help="EMA samples per preview (held-out masks), DDIM; default 2 on a GPU, 0 on a CPU")
    t.add_argument("--preview-steps", type=at_least(1), default=50, help="DDIM steps of a preview")
    t.add_argument("--preview-guidance", type=at_least(0.0, float), default=1.0,
                   help="w of Eq. 4 for the previews")
    t.add_argument("--workers", type=at_least(1), default=min(8, os.cpu_count() or 1),
                   help="processes for the Betti vectors")
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start again")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser (GPU; the first steps are slow)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- structure extractor E_str
def betti_vector(mask: np.ndarray) -> np.ndarray:
    """(D, H, W) label volume -> (D·6,) int64: per slice and label 0/1/2, Betti numbers β0
    (components) and β1 (holes) of `slice == label` (§3.3.2, Fig. 3b). Cubical complex by cripser's
    T-construction (pixels are closed squares: the region is 8-connected, holes 4-connected; outside
    the image is background). Filtration 0 on the region, 1 elsewhere; a class counts if born at 0
    and alive at 1. An empty region has β0 = 0 (the release counted 1; docs/reference.md §4)."""
    out = np.zeros((len(mask), 6), np.int64)
    for j, sl in enumerate(mask):
        for label in range(3):
            region = sl == label
            if not region.any():
                continue
            if region.all():
                out[j, 2 * label] = 1
                continue
            ph = cripser.computePH_T(np.where(region, 0.0, 1.0), maxdim=1)
            alive = (ph[:, 1] <= 0.5) & (ph[:, 2] > 0.5)
            out[j, 2 * label] = np.count_nonzero(alive & (ph[:, 0] == 0))
            out[j, 2 * label + 1] = np.count_nonzero(alive & (ph[:, 0] == 1))
    return out.reshape(-1)


def structure_features(betti):
    """log(1 + β): a speckled mask's dozens of components must not dwarf the usual 0-3."""
    return torch.log1p(betti.float())


# --------------------------------------------------------------------------- Unet3D (Medical Diffusion)
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        f = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        e = t.float()[:, None] * f[None]
        return torch.cat([e.sin(), e.cos()], -1)


class ChannelNorm(nn.Module):
    """LayerNorm over channels with a gain only (the reference's LayerNorm)."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.gamma = eps, nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma

    def last(self, x):
        """The same norm on a tensor with channels last (..., C): F.layer_norm, contiguous and fast."""
        return F.layer_norm(x, x.shape[-1:], self.gamma.view(-1), None, self.eps)


class Block(nn.Module):
    """(1, 3, 3) conv -> GroupNorm(8) -> optional scale/shift from the embedding -> SiLU."""
    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = nn.Conv3d(dim, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            x = torch.addcmul(scale_shift[1], x, scale_shift[0] + 1)
        return F.silu(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim, dim_out, emb_dim=None, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2)) if emb_dim else None
        self.block1, self.block2 = Block(dim, dim_out, groups), Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, emb=None):
        ss = self.mlp(emb)[:, :, None, None, None].chunk(2, 1) if self.mlp is not None else None
        return self.block2(self.block1(x, ss)) + self.res_conv(x)


class SpatialLinearAttention(nn.Module):
    """Linear attention within each slice (softmax over features for q, over positions for k).
    Runs on channels-last tensors (B·D, H·W, C): the 1×1 convolutions are then plain matmuls."""
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):  # x (B·D, H·W, C)
        qkv = F.linear(x, self.to_qkv.weight.flatten(1)).unflatten(-1, (3, self.heads, -1))
        q, k, v = qkv.unbind(2)                                      # (B·D, H·W, heads, dim_head)
        q, k = q.softmax(-1) * self.scale, k.softmax(1)
        context = torch.einsum("bnhd,bnhe->bhde", k, v)
        out = torch.einsum("bhde,bnhd->bnhe", context, q).flatten(2)
        return F.linear(out, self.to_out.weight.flatten(1), self.to_out.bias)


_ROTARY = {}


def rotary_factors(n, dim_head, device, rotary_dim=32):
    """Rotary position embedding as complex numbers: e^{i·p·θ_k} for position p and pair k, the first
    min(32, dim_head) features rotated (1 for the rest). Fixed: made once per length and device."""
    key = (n, dim_head, str(device))
    if key not in _ROTARY:
        rd = min(rotary_dim, dim_head)
        theta = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
        angles = torch.arange(n, dtype=torch.float64)[:, None] * F.pad(theta, (0, (dim_head - rd) // 2))
        _ROTARY[key] = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device)
    return _ROTARY[key]


def rotate(x, factors):
    """x (..., n, heads, dim_head): interleaved pairs (x0, x1), (x2, x3), ... as x0 + i·x1, times the
    factors (n, dim_head / 2). One complex product, in the factors' precision (float32 under autocast)."""
    pairs = torch.view_as_complex(x.to(factors.real.dtype).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * factors[:, None]).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention over the second-to-last axis (scaled_dot_product_attention); along depth
    (the reference's "temporal" attention) with rotary factors and a relative position bias."""
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, bias=None, rotary=None):  # x (..., n, dim); bias (heads, n, n)
        *lead, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(-1, n, 3, self.heads, self.dim_head).unbind(2)
        if rotary is not None:
            q, k = rotate(q, rotary), rotate(k, rotary)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.to_out(out.transpose(1, 2).reshape(*lead, n, -1))


class RelativePositionBias(nn.Module):
    """T5-style bucketed relative positions (32 buckets, max distance 32) -> a bias per head. The
    buckets depend only on the length: made once per length and device."""
    def __init__(self, heads, buckets=32, max_distance=32):
        super().__init__()
        self.buckets, self.max_distance = buckets, max_distance
        self.relative_attention_bias = nn.Embedding(buckets, heads)
        self._buckets = {}

    def bucket(self, n, device):
        pos = torch.arange(n, device=device)
        rel = -(pos[None, :] - pos[:, None])                    # n = -(k - q)
        half = self.buckets // 2
        ret = (rel < 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float().clamp_min(1) / exact) / math.log(self.max_distance / exact)
                         * (half - exact)).long()
        return ret + torch.where(rel < exact, rel, large.clamp_max(half - 1))

    def forward(self, n, device):
        key = (n, str(device))
        if key not in self._buckets:
            self._buckets[key] = self.bucket(n, device)
        return self.relative_attention_bias(self._buckets[key]).permute(2, 0, 1)  # (heads, n, n)


class DepthAttention(nn.Module):
    """Residual(PreNorm(attention along depth)): (B, C, D, H, W), each (h, w) column on its own."""
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.norm, self.attn = ChannelNorm(dim), Attention(dim, heads, dim_head)

    def forward(self, x, bias, rotary):
        b, c, d, h, w = x.shape
        y = self.norm.last(x.permute(0, 3, 4, 2, 1).reshape(b, h * w, d, c))
        return x + self.attn(y, bias, rotary).reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)


class SpatialAttention(nn.Module):
    """Residual(PreNorm(full attention within each slice)) for the middle block."""
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.norm, self.attn = ChannelNorm(dim), Attention(dim, heads, dim_head)

    def forward(self, x):
        b, c, d, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b, d, h * w, c)
        return x + self.attn(y).reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


class LinearAttentionBlock(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.norm, self.attn = ChannelNorm(dim), SpatialLinearAttention(dim, heads, dim_head)

    def forward(self, x):
        b, c, d, h, w = x.shape
        y = self.attn(self.norm.last(x.permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c)))
        return x + y.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


class Unet3D(nn.Module):
    """ε_θ(z_t, t, c): (B, C, D, H, W) -> predicted ε; H, W halved per level, D kept (pseudo-3-D).
    `cond` (B, cond_dim) joins the time embedding; `drop` (B,) picks the learned null embedding."""
    def __init__(self, channels=8, dim=64, dim_mults=(1, 2, 4, 8), cond_dim=0, heads=8, dim_head=32,
                 in_channels=None):
        super().__init__()
        in_channels = in_channels or channels  # more than `channels` when a map joins z_t (--spatial)
        self.kwargs = dict(channels=channels, dim=dim, dim_mults=list(dim_mults), cond_dim=cond_dim,
                           heads=heads, dim_head=dim_head, in_channels=in_channels)
        self.rel_pos_bias = RelativePositionBias(heads)
        self.init_conv = nn.Conv3d(in_channels, dim, (1, 7, 7), padding=(0, 3, 3))
        self.init_depth_attn = DepthAttention(dim, heads, dim_head)
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.null_cond = nn.Parameter(torch.randn(1, cond_dim)) if cond_dim else None
        emb = time_dim + cond_dim
        dims = [dim, *(dim * m for m in dim_mults)]
        pairs = list(zip(dims[:-1], dims[1:]))
        last = len(pairs) - 1

        def level(cin, cout, resample):  # 2 ResNet blocks, linear + depth attention, then down/up in H, W
            re = {"down": nn.Conv3d, "up": nn.ConvTranspose3d}.get(resample)
            return nn.ModuleList([ResnetBlock(cin, cout, emb), ResnetBlock(cout, cout, emb),
                                  LinearAttentionBlock(cout, heads, dim_head),
                                  DepthAttention(cout, heads, dim_head),
                                  re(cout, cout, (1, 4, 4), (1, 2, 2), (0, 1, 1)) if re else nn.Identity()])

        self.downs = nn.ModuleList(level(a, b, "down" if i < last else None)
                                   for i, (a, b) in enumerate(pairs))
        mid = dims[-1]
        self.mid_block1, self.mid_block2 = ResnetBlock(mid, mid, emb), ResnetBlock(mid, mid, emb)
        self.mid_spatial_attn = SpatialAttention(mid, heads, dim_head)
        self.mid_depth_attn = DepthAttention(mid, heads, dim_head)
        self.ups = nn.ModuleList(level(2 * b, a, "up" if i < last else None)
                                 for i, (a, b) in enumerate(reversed(pairs)))
        self.final_block = ResnetBlock(dim * 2, dim)
        self.final_conv = nn.Conv3d(dim, channels, 1)

    def forward(self, x, t, cond=None, drop=None):
        bias = self.rel_pos_bias(x.shape[2], x.device)
        rot = rotary_factors(x.shape[2], self.kwargs["dim_head"], x.device)
        x = r = self.init_conv(x)
        x = self.init_depth_attn(x, bias, rot)
        emb = self.time_mlp(t)
        if self.null_cond is not None:
            if drop is not None:  # classifier-free guidance: the learned null condition
                cond = torch.where(drop[:, None], self.null_cond.to(cond.dtype), cond)
            emb = torch.cat([emb, cond.to(emb.dtype)], -1)
        skips = []
        for block1, block2, lin_attn, depth_attn, down in self.downs:
            x = depth_attn(lin_attn(block2(block1(x, emb), emb)), bias, rot)
            skips.append(x)
            x = down(x)
        x = self.mid_spatial_attn(self.mid_block1(x, emb))
        x = self.mid_block2(self.mid_depth_attn(x, bias, rot), emb)
        for block1, block2, lin_attn, depth_attn, up in self.ups:
            x = torch.cat([x, skips.pop()], 1)
            x = up(depth_attn(lin_attn(block2(block1(x, emb), emb)), bias, rot))
        return self.final_conv(self.final_block(torch.cat([x, r], 1)))


# --------------------------------------------------------------------------- condition extractor + denoiser
class ConditionExtractor(nn.Module):
    """E_c = [E_con ; E_str] (Fig. 3a): mask latent (B, 8, d, h, w) -> stride-2 Conv3d 8 -> 4 -> 1
    -> (B, 1, 2, 16, 16) at the paper's shapes, flattened; Betti vector (B, D·6) -> log(1 + β)."""
    def __init__(self, mode, latent_shape=(8, 8, 64, 64), depth=32):
        super().__init__()
        self.kwargs = dict(mode=mode, latent_shape=list(latent_shape), depth=depth)
        self.use_content, self.use_structure = mode in ("content", "both"), mode in ("structure", "both")
        c, *s = latent_shape
        self.content = (nn.Sequential(nn.Conv3d(c, 4, 3, 2, 1), nn.Conv3d(4, 1, 3, 2, 1))
                        if self.use_content else None)
        reduce = lambda n: (n + 1) // 2
        self.dim = ((math.prod(reduce(reduce(n)) for n in s) if self.use_content else 0)
                    + (depth * 6 if self.use_structure else 0))

    def forward(self, mask_latent, betti):
        parts = []
        if self.use_content:
            parts.append(self.content(mask_latent).flatten(1))
        if self.use_structure:
            parts.append(structure_features(betti))
        return torch.cat(parts, 1) if parts else None


class Denoiser(nn.Module):
    """Condition extractor + Unet3D, trained (and EMA-averaged, checkpointed) together. spatial=True
    (beyond the paper): the mask latent also joins z_t as channels, a learned null map when dropped."""
    def __init__(self, extractor_kwargs, unet_kwargs, spatial=False):
        super().__init__()
        self.extractor = ConditionExtractor(**extractor_kwargs)
        latent_shape = self.extractor.kwargs["latent_shape"]
        self.null_map = nn.Parameter(torch.zeros(1, *latent_shape)) if spatial else None
        self.unet = Unet3D(**{**unet_kwargs, "cond_dim": self.extractor.dim,
                              "in_channels": latent_shape[0] * (2 if spatial else 1)})
        self.kwargs = dict(extractor_kwargs=self.extractor.kwargs, unet_kwargs=self.unet.kwargs,
                           spatial=spatial)

    @property
    def conditional(self):
        return self.extractor.dim > 0 or self.null_map is not None

    def forward(self, z_t, t, mask_latent=None, betti=None, drop=None):
        if self.null_map is not None:
            m = mask_latent if drop is None else torch.where(drop[:, None, None, None, None], self.null_map,
                                                             mask_latent)
            z_t = torch.cat([z_t, m.to(z_t.dtype)], 1)
        return self.unet(z_t, t, self.extractor(mask_latent, betti), drop)


# --------------------------------------------------------------------------- Gaussian diffusion
class GaussianDiffusion(nn.Module):
    """DDPM (Ho et al. 2020) with the cosine schedule (Nichol & Dhariwal 2021), T steps,
    noise prediction. Schedule quantities are computed in float64, stored in float32."""
    def __init__(self, timesteps=300, s=0.008):
        super().__init__()
        self.T = timesteps
        x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
        ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
        betas = torch.clip(1 - ac[1:] / ac[:-1], 0, 0.9999)  # ᾱ_t = ac_t / ac_0; the ratio cancels ac_0
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = F.pad(abar[:-1], (1, 0), value=1.0)
        reg = lambda name, v: self.register_buffer(name, v.float(), persistent=False)
        reg("betas", betas)
        reg("alphas_cumprod", abar)
        reg("sqrt_abar", abar.sqrt())
        reg("sqrt_1m_abar", (1 - abar).sqrt())
        reg("sqrt_recip_abar", (1 / abar).sqrt())
        reg("sqrt_recipm1_abar", (1 / abar - 1).sqrt())
        post_var = betas * (1 - abar_prev) / (1 - abar)
        reg("posterior_variance", post_var)
        reg("posterior_log_variance", post_var.clamp_min(1e-20).log())
        reg("posterior_coef1", betas * abar_prev.sqrt() / (1 - abar))
        reg("posterior_coef2", (1 - abar_prev) * alphas.sqrt() / (1 - abar))

    @staticmethod
    def _at(a, t, x):
        return a[t].view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """z_t = sqrt(ᾱ_t)·z_0 + sqrt(1 - ᾱ_t)·ε."""
        return self._at(self.sqrt_abar, t, x0) * x0 + self._at(self.sqrt_1m_abar, t, x0) * noise

    def predict_x0(self, x_t, t, eps):
        return self._at(self.sqrt_recip_abar, t, x_t) * x_t - self._at(self.sqrt_recipm1_abar, t, x_t) * eps

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and log variance of q(z_{t-1} | z_t, z_0)."""
        mean = self._at(self.posterior_coef1, t, x_t) * x0 + self._at(self.posterior_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance, t, x_t)

    def draw(self, x0, p_uncond, generator=None):
        """Per sample: a uniform t, the noise, and a condition drop with probability p_uncond."""
        b = len(x0)
        t = torch.randint(0, self.T, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        drop = torch.rand(b, device=x0.device, generator=generator) < p_uncond
        return t, noise, drop

    def loss(self, denoiser, x0, cond_inputs, p_uncond, generator=None, draws=None):
        """L1 between the noise and its prediction, with `draws` (t, noise, drop) or fresh ones."""
        t, noise, drop = draws if draws is not None else self.draw(x0, p_uncond, generator)
        return F.l1_loss(denoiser(self.q_sample(x0, t, noise), t, *cond_inputs, drop=drop), noise)

    @torch.no_grad()
    def p_step(self, x_t, t, eps, noise):
        """Ancestral step from x̂0(ε) clipped to [-1, 1]: posterior mean + noise (none at t = 0)."""
        x0 = self.predict_x0(x_t, t, eps).clamp(-1, 1)
        mean, _, logvar = self.q_posterior(x0, x_t, t)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * (0.5 * logvar).exp() * noise


DOUBLED_ON_CPU = 2**18  # latent elements up to which one doubled batch beats two passes on the CPU


def guided_eps(denoiser, z, t, cond_inputs, w):
    """Eq. 4: ε̃ = (1 + w)·ε(z, c) − w·ε(z); w = 0 gives the conditional prediction, and an
    unconditional model (V0) ignores w. The two passes run as one doubled batch on a GPU and for small
    batches on the CPU; two passes are faster for large batches on the CPU (docs/performance.md)."""
    if not denoiser.conditional or w == 0:
        return denoiser(z, t, *cond_inputs)
    if z.is_cuda or 2 * z.numel() <= DOUBLED_ON_CPU:
        drop = torch.arange(2 * len(z), device=z.device) >= len(z)  # the second copy: unconditional
        eps = denoiser(torch.cat([z, z]), torch.cat([t, t]), *(torch.cat([c, c]) for c in cond_inputs),
                       drop=drop)
        eps_c, eps_u = eps.chunk(2)
    else:
        eps_c = denoiser(z, t, *cond_inputs)
        eps_u = denoiser(z, t, *cond_inputs, drop=torch.ones(len(z), dtype=torch.bool, device=z.device))
    return (1 + w) * eps_c - w * eps_u


def per_sample_noise(generators, shape, device):
    """Noise drawn per sample, each from its own generator: a trajectory ignores its batch-mates."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample_latents(ddpm, denoiser, cond, shape, w, sampler, steps, generators, device, precision,
                   desc=None):
    """DDPM (ancestral, all T steps) or DDIM (deterministic, `steps` steps, η = 0), guided by Eq. 4."""
    z = per_sample_noise(generators, shape, device)
    ts = list(reversed(range(ddpm.T))) if sampler == "ddpm" else \
        sorted(set(np.linspace(0, ddpm.T - 1, steps).round().astype(int).tolist()), reverse=True)
    for k, i in enumerate(bar(ts, desc=desc, unit="step")):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        with precision.autocast():
            eps = guided_eps(denoiser, z, t, cond, w).float()
        if sampler == "ddpm":
            z = ddpm.p_step(z, t, eps, per_sample_noise(generators, shape, device))
        else:
            z = ddim_step(ddpm, z, t, eps, ts[k + 1] if k + 1 < len(ts) else -1)
    return z


def ddim_step(ddpm, z, t, eps, t_prev):
    """DDIM (Song et al. 2021), η = 0: x̂0 (clipped), ε recomputed from it, then z at t_prev."""
    ab = ddpm._at(ddpm.alphas_cumprod, t, z)
    x0 = ddpm.predict_x0(z, t, eps).clamp(-1, 1)
    if t_prev < 0:
        return x0
    eps = (z - ab.sqrt() * x0) / (1 - ab).sqrt()
    ab_prev = ddpm.alphas_cumprod[t_prev]
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


# --------------------------------------------------------------------------- latents (cached)
def latent_scale(vqgan):
    """The codebook's min and max: latents are mapped to [-1, 1] with them (docs/reference.md §3)."""
    e = vqgan.codebook.embeddings
    return float(e.min()), float(e.max())


def latents_to_unit(z, lo, hi):
    return (z - lo) / (hi - lo) * 2 - 1


def latents_from_unit(z, lo, hi):
    return (z + 1) / 2 * (hi - lo) + lo


@torch.no_grad()
def encode_all(vqgan, arrays, device, batch=4):
    """(N, D, H, W) arrays -> pre-quantisation latents (N, C, d, h, w) on the CPU."""
    out = []
    for i in bar(range(0, len(arrays), batch), desc="encode"):
        x = torch.as_tensor(np.stack(arrays[i:i + batch]))[:, None].float().to(device)
        out.append(vqgan.encode(x, quantize=False).float().cpu())
    return torch.cat(out)


def locality_condition(vqgan, masks, device, workers=1):
    """The locality condition of (D, H, W) label masks (§3.3), on the CPU: content, the masks
    (labels 0/1/2 as floats) through the VQ-GAN encoder, (N, C, d, h, w); structure, their Betti
    vectors, (N, D·6) int64. 04 computes it once per training mask, 05 per sample."""
    if workers > 1:
        with ProcessPoolExecutor(min(workers, len(masks))) as pool:
            vectors = list(bar(pool.map(betti_vector, masks), total=len(masks), desc="Betti"))
    else:
        vectors = [betti_vector(m) for m in bar(masks, desc="Betti")]
    betti = torch.from_numpy(np.stack(vectors))
    mask_latent = encode_all(vqgan, [m.astype(np.float32) for m in masks], device)
    return mask_latent, betti


def build_cache(args, names, vqgan, device):
    """Volume latents ([0, 1] -> [-1, 1] -> encoder) and the masks' locality condition, cached."""
    stat = args.vqgan.stat()
    key = {"vqgan": str(args.vqgan.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "names": names}
    path = args.out / "cache.pt"
    if path.exists():
        cache = load_checkpoint(path)
        if cache["key"] == key:
            print0(f"latent cache {path} is current ({len(names)} volumes)")
            return cache
    t0 = time.perf_counter()
    print0(f"building the latent cache (once): {len(names)} volumes and masks, Betti vectors")
    vols = [xyz_to_dhw(read_nifti(args.prep / "images" / f"{n}.nii.gz")[0]) * 2 - 1
            for n in bar(names, desc="read")]
    masks = []
    for n in names:
        mp = args.prep / "masks" / f"{n}.nii.gz"
        if not mp.exists():
            raise SystemExit(f"error: {mp} not found: run 02_masks.py first")
        masks.append(xyz_to_dhw(read_nifti(mp, None)[0]))
    mask_latent, betti = locality_condition(vqgan, masks, device, args.workers)
    lo, hi = latent_scale(vqgan)
    cache = {"key": key, "names": names, "scale": [lo, hi],
             "latents": latents_to_unit(encode_all(vqgan, vols, device), lo, hi),
             "mask_latents": mask_latent, "betti": betti, "masks": torch.from_numpy(np.stack(masks))}
    save_checkpoint(cache, path)
    print0(f"encoded {len(names)} volumes and masks, {len(names)} Betti vectors in "
           f"{time.perf_counter() - t0:.1f} s -> {path}")
    return cache


# --------------------------------------------------------------------------- training step
def train_step(model_t, ddpm, opt, prec, data, batch_size, grad_accum, p_uncond, gen, micro=None,
               after_micro=None):
    """One optimiser step: `grad_accum` batches of `batch_size` drawn on the device from
    data = (latents, mask latents, Betti vectors), all resident there. A batch's random draws are
    made at once, then it runs forward and backward in pieces of `micro` samples (default: whole):
    the same step, in less memory. Returns the detached loss (a device tensor: nothing here waits
    for the device; bench.py times this function). `after_micro(i, n)` is called after piece i of n."""
    z0, mask_latents, betti = data
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=z0.device)
    micro = micro or batch_size
    pieces = [slice(s, s + micro) for s in range(0, batch_size, micro)]
    for _ in range(grad_accum):
        idx = torch.randint(len(z0), (batch_size,), device=z0.device, generator=gen)
        x0, cond = z0[idx], (mask_latents[idx], betti[idx])
        draws = ddpm.draw(x0, p_uncond, gen)
        for i, part in enumerate(pieces):
            share = len(idx[part]) / batch_size / grad_accum  # the piece's mean -> its share of the batch's
            with prec.autocast():
                loss = ddpm.loss(model_t, x0[part], tuple(c[part] for c in cond), p_uncond,
                                      draws=tuple(d[part] for d in draws)) * share
            prec.scaler.scale(loss).backward()
            total += loss.detach().float()
            if after_micro is not None:
                after_micro(i + 1, len(pieces))
    prec.scaler.step(opt)
    prec.scaler.update()
    return total


def activation_bytes(model, ddpm, data, prec, p_uncond):
    """What autograd keeps from one sample's forward pass (the bulk of a training step's memory,
    per sample): the storages its saved tensors use, counted once each."""
    z0, mask_latents, betti = data
    seen, total = set(), 0

    def keep(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), prec.autocast():
        ddpm.loss(model, z0[:1], (mask_latents[:1], betti[:1]), p_uncond, torch.Generator(device=z0.device))
    return total


def fitting_micro_batch(per_sample, batch_size, free):
    """Largest piece whose activations fit in half of `free` bytes (the backward needs as much)."""
    return max(1, min(batch_size, int(0.5 * free // max(per_sample, 1))))


@torch.no_grad()
def ema_update(ema_params, params, step, start, every, decay):
    """The reference's EMA: a copy of the weights before `start`, then a lerp every `every` steps."""
    if step < start:
        torch._foreach_copy_(ema_params, params)
    elif step % every == 0:
        torch._foreach_lerp_(ema_params, params, 1 - decay)


# --------------------------------------------------------------------------- main
CPU_SIZED = ("a VQ-GAN trained on 64×64×16 volumes, --dim 16 --attn-heads 4 --attn-dim-head 16 "
             "--batch-size 8 --steps 1600")


def gpu_sized(latent_shape, depth, args):
    """The settings that make a run GPU-sized (the paper's are): large latents, a wide U-Net, many steps."""
    big = []
    if latent_shape[-1] * latent_shape[-2] >= 32 * 32:
        big.append("latents " + "×".join(map(str, latent_shape)) + f" of {depth}-slice volumes")
    if args.dim >= 64:
        big.append(f"--dim {args.dim}")
    if args.steps > 5000:
        big.append(f"--steps {args.steps}")
    return ", ".join(big)


# settings a resumed run must share with its checkpoint (--steps may grow, logging and previews may change)
RESUME_KEYS = ("data", "vqgan_sha1", "timesteps", "p_uncond", "lr", "batch_size", "grad_accum", "ema_decay",
               "ema_every", "ema_start", "seed", "precision")


def main(args):
    run, prec = start_run(args.device, args.precision, args.seed)
    device, rank, world = run.device, run.rank, run.world_size
    if rank == 0:
        prepare_out(args.out, [args.prep, args.vqgan])
    vqgan = load_stage("03_vqgan").load_vqgan(args.vqgan, device)
    split = read_split(args.prep, masks=True)  # a volume without a mask (02 skipped it) is left out
    if not split["train"]:
        raise SystemExit(f"error: no training volume with a mask in {args.prep}: run 02_masks.py first")
    # what this run trains on: a resume with another VQ-GAN or other data is refused, and 05 checks the VQ-GAN
    args.data = training_data_record(args.prep, split["train"])
    args.vqgan_sha1 = file_fingerprint(args.vqgan)
    ckpt_path = args.out / "ckpt.pt"  # checked before anything in --out is rebuilt
    ckpt = open_resume(ckpt_path, args.fresh, ("model_kwargs", "model", "ema", "args", "step"),
                     "04_diffusion.py", args, RESUME_KEYS, device)
    cache = build_cache(args, split["train"], vqgan, device) if rank == 0 else None
    if world > 1:
        dist.barrier()  # the other ranks read what rank 0 built
    cache = cache or load_checkpoint(args.out / "cache.pt")
    lo, hi = cache["scale"]
    z0, mask_latents, betti = (cache[k].to(device) for k in ("latents", "mask_latents", "betti"))
    n_train, latent_shape, depth = len(z0), tuple(z0.shape[1:]), cache["masks"].shape[1]

    model = Denoiser(dict(mode=args.cond, latent_shape=latent_shape, depth=depth),
                     dict(channels=latent_shape[0], dim=args.dim, dim_mults=args.dim_mults,
                          heads=args.attn_heads, dim_head=args.attn_dim_head), args.spatial).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ddpm = GaussianDiffusion(args.timesteps).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1000 * rank)

    parts = {"model": model, "ema": ema, "opt": opt, "scaler": prec.scaler}  # what a resume restores
    step = 0 if ckpt is None else resume(ckpt, ckpt_path, parts, gen, device, model.kwargs)
    model_t = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    model_t = torch.compile(model_t) if args.compile else model_t
    if args.n_preview is None:  # a preview costs minutes at the paper's size on a CPU: asked for there
        args.n_preview = 2 if device.type == "cuda" else 0
        if rank == 0 and device.type == "cpu":
            print("previews skipped on the CPU (--n-preview 2 draws two at each save)")
    test_names = split["test"][: args.n_preview]

    def save(step):
        if rank != 0:
            return
        state = training_state(step, args, model.kwargs, parts, gen, device, timesteps=args.timesteps,
                               latent_scale=[lo, hi], vqgan=str(args.vqgan), vqgan_sha1=args.vqgan_sha1)
        save_checkpoint(state, ckpt_path)
        if test_names:
            preview(step)

    # the held-out masks of the previews and their conditions, prepared once
    masks = [xyz_to_dhw(read_nifti(args.prep / "masks" / f"{n}.nii.gz", None)[0]) for n in test_names]
    cond = tuple(c.to(device) for c in locality_condition(vqgan, masks, device)) if masks else None

    @torch.no_grad()
    def preview(step):  # EMA samples conditioned on held-out masks, decoded, mask outlined
        gens = [torch.Generator().manual_seed(i) for i in range(len(masks))]
        z = sample_latents(ddpm, ema, cond, (len(masks), *latent_shape), args.preview_guidance, "ddim",
                           args.preview_steps, gens, device, prec, desc=f"preview, step {step}")
        decoded = vqgan.decode(latents_from_unit(z, lo, hi), quantize=True).float()    # (N, 1, D, H, W)
        vols = ((decoded.clamp(-1, 1) + 1) / 2)[:, 0]
        save_preview(args.out / "previews" / f"step{step:07d}.png", list(vols), masks,
                     [f"{n} mask, w={args.preview_guidance}, DDIM-{args.preview_steps}" for n in test_names],
                     vrange=soft_tissue(args.prep), names=MASK_NAMES)

    n_params = sum(p.numel() for p in model.parameters())
    print0(f"Denoiser {n_params / 1e6:.2f}M params (condition '{args.cond}', {model.extractor.dim}-d"
           f"{' + the mask as channels' if args.spatial else ''}); "
           f"{n_train} latents {latent_shape}; {world} process(es) on {device}, {prec.name}; "
           f"batch {args.batch_size}×{world}×{args.grad_accum}, lr {args.lr}, p_uncond {args.p_uncond}")
    sizing_note(device, gpu_sized(latent_shape, depth, args), CPU_SIZED)
    log_path = args.out / "log.csv"
    log_row = csv_logger(log_path, ["step", "loss", "ms_per_step", "volumes_per_s", "peak_mem_gb"],
                         start_step=step, enabled=rank == 0)
    micro = args.micro_batch
    if not micro:  # a batch that does not fit in memory runs in pieces (a CPU would be killed, a GPU raise)
        per_sample = activation_bytes(model, ddpm, (z0, mask_latents, betti), prec, args.p_uncond)
        free = free_memory(device)
        micro = fitting_micro_batch(per_sample, args.batch_size, free)
        if micro < args.batch_size:
            gb = lambda n: f"{n / 2**30:.1f} GB"
            print0(f"batch {args.batch_size} runs in pieces of {micro} to fit in memory ({gb(per_sample)} of "
                   f"activations per sample, {gb(free)} free): the same step, in less memory")
    loss_sum, t_last, n_last = torch.zeros((), device=device), time.perf_counter(), step
    first = step + 1  # the step that gets a timing line

    def first_piece(i, n):  # a long first step in pieces: its first piece's time tells the cost at once
        if i == 1 and n > 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt, left = time.perf_counter() - t_last, args.steps - step
            steps = f"{left} step{'s' if left != 1 else ''}"
            print0(f"piece 1 of {n} of step {first} took {duration(dt)} (with warm-up): a step is about "
                   f"{duration(n * dt)}, the {steps} about {duration(n * dt * left)}")
    ema_params, params = list(ema.parameters()), list(model.parameters())
    model_t.train()
    while step < args.steps:
        loss_sum += train_step(model_t, ddpm, opt, prec, (z0, mask_latents, betti), args.batch_size,
                               args.grad_accum, args.p_uncond, gen, micro,
                               first_piece if step + 1 == first else None)
        step += 1
        ema_update(ema_params, params, step, args.ema_start, args.ema_every, args.ema_decay)
        if step == first:
            first_step_line(device, t_last, step, args.steps, args.log_every)
        if step % args.log_every == 0 or step == args.steps:
            dt = time.perf_counter() - t_last
            loss_v = loss_sum.item() / (step - n_last)
            ms = 1000 * dt / (step - n_last)
            vps = (step - n_last) * args.batch_size * args.grad_accum * world / dt
            row = [step, loss_v, ms, vps, peak_memory_gb(device)]
            log_row(row)
            print0(f"step {step:>7} | loss {loss_v:.4f} | {ms:.0f} ms/step, {vps:.1f} vol/s, "
                   f"peak {row[-1]:.2f} GB, {eta(ms, args.steps - step)}")
            loss_sum.zero_()
            t_last, n_last = time.perf_counter(), step
        if step % args.save_every == 0 or step == args.steps:
            save(step)
    ddp_check(model, world)
    previews = f", previews in {args.out / 'previews'}" if test_names else ""
    print0(f"wrote {ckpt_path} (step {step}), {log_path}{previews}")
    teardown_distributed()


def load_denoiser(path, device="cpu", ema=True):
    """Rebuild the (EMA) denoiser and its DDPM from a 04 checkpoint alone."""
    ckpt = checkpoint_parts(load_checkpoint(path, map_location="cpu"), path,
                          ("model_kwargs", "ema", "timesteps"), "04_diffusion.py")
    model = Denoiser(**ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return (model.to(device).eval().requires_grad_(False),
            GaussianDiffusion(ckpt["timesteps"]).to(device), ckpt)


if __name__ == "__main__":
    run_stage(main, get_args)
