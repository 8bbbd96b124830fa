"""03 · 3D VQ-GAN with Lad's locality loss: the latent space of everything after (paper §3.2, Fig. 2a).

Reads  --prep (default data/prep): images/ (from 01), masks/ (from 02), split.json.
Writes --out  (default runs/vqgan):
    ckpt.pt          models, codebook, discriminators, optimisers, scaler, RNG, step, args and the
                     constructor arguments (04/05 rebuild the autoencoder from it alone)
    log.csv          one row per log interval: losses, perplexity, ms/step, volumes/s, peak memory
    previews/        input vs reconstruction at each save, the locality box drawn
    metrics.json     PSNR and SSIM on the test split, holistic and inside the box

Architecture and losses follow Medical Diffusion's VQ-GAN as configured by Lad (docs/reference.md
§2): encoder/decoder of "same"-padded (replicate) 3-D convs and ResBlocks, 4×4×4 downsampling to
an 8-channel latent, an EMA codebook of 16384 codes, a 2-D (random slice) and a 3-D PatchGAN with
hinge loss and feature matching, LPIPS-VGG16 on a random slice. Lad adds the locality loss
(Eq. 2-3): L1 between x and x̂ inside each sample's bounding box of the mask (organ or tumour),
averaged over the samples with a box, weighted by λ = --lambda-loc (0 = Medical Diffusion). The
release summed over the batch (at batch 2 its λ = 1 weighs up to twice ours); we keep Eq. 2.

Schedule: the paper's "100k steps" are Lightning 1.6 global steps, and with two optimisers
Lightning counts two per batch. The release's checkpoint (epoch=124-step=100000, 800 volumes,
batch 2, one GPU) is therefore 50k iterations with the discriminators from 25k, which is what
the defaults run. Gradient norms are clipped to 1.0 per optimiser (--grad-clip), and volumes are
[0, 1] on disk (01) and [-1, 1] inside the networks, as in the release.

    python 03_vqgan.py                                    # paper: 50k iterations, batch 2, λ = 1 (one GPU)
    torchrun --nproc_per_node 2 03_vqgan.py --batch-size 1   # the same effective batch on two GPUs (DDP)
    python 03_vqgan.py --lambda-loc 0 --out runs/vqgan_l0 # Medical Diffusion baseline (Table 2, V3 vs Full)
    make demo                                             # CPU demo: small settings, see the Makefile
"""
import errno
import math
import time
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (ArgumentParser, at_least, bar, checkpoint_parts, csv_logger, ddp_check, eta,
                    first_step_line, load_checkpoint, open_resume, peak_memory_gb, positive, prepare_out,
                    print0, read_nifti, read_split, resume, run_stage, save_checkpoint, save_json,
                    save_preview, sizing_note, soft_tissue, start_run, teardown_distributed,
                    training_data_record, training_state, xyz_to_dhw)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    p.add_argument("--prep", type=Path, default=Path("data/prep"),
                   help="01/02 output folder (images/, masks/, split.json)")
    p.add_argument("--out", type=Path, default=Path("runs/vqgan"),
                   help="run folder (ckpt.pt, log.csv, previews/, metrics.json)")
    m = p.add_argument_group("model (docs/reference.md §2, Lad config)")
    m.add_argument("--n-hiddens", type=at_least(1), default=16, help="channels after the first conv")
    m.add_argument("--downsample", type=at_least(1), nargs=3, default=(4, 4, 4),
                   help="compression per axis (D, H, W), paper §4.1.3")
    m.add_argument("--embedding-dim", type=at_least(1), default=8, help="latent channels")
    m.add_argument("--n-codes", type=at_least(2), default=16384, help="codebook size")
    m.add_argument("--num-groups", type=at_least(1), default=32, help="GroupNorm groups")
    m.add_argument("--disc-channels", type=at_least(1), default=64, help="PatchGAN base width (ndf)")
    m.add_argument("--disc-layers", type=at_least(1), default=3, help="PatchGAN layers")
    w = p.add_argument_group("losses (docs/reference.md §2; Eq. 1-3)")
    w.add_argument("--l1-weight", type=at_least(0.0, float), default=4.0, help="reconstruction L1")
    w.add_argument("--perceptual-weight", type=at_least(0.0, float), default=4.0,
                   help="LPIPS on a random slice (0 = off, no weights needed)")
    w.add_argument("--perceptual-weights", default=None,
                   help="folder with vgg16-397923af.pth and vgg.pth (LPIPS v0.1), or 'auto' to download")
    w.add_argument("--image-gan-weight", type=at_least(0.0, float), default=0.25, help="2-D discriminator")
    w.add_argument("--volume-gan-weight", type=at_least(0.0, float), default=0.25, help="3-D discriminator")
    w.add_argument("--gan-feat-weight", type=at_least(0.0, float), default=4.0, help="feature matching")
    w.add_argument("--disc-start", type=at_least(0), default=25_000,
                   help="iteration the discriminators start at (the release's 50k Lightning steps)")
    w.add_argument("--lambda-loc", type=at_least(0.0, float), default=1.0,
                   help="locality loss λ (Eq. 3); 0 = Medical Diffusion")
    t = p.add_argument_group("training (paper §4.1.3)")
    t.add_argument("--steps", type=at_least(1), default=50_000,
                   help="iterations, a generator and a discriminator update each: the release's 50k "
                        "batches, the paper's '100k' Lightning steps (see the module docstring)")
    t.add_argument("--batch-size", type=at_least(1), default=2,
                   help="volumes per iteration per GPU (× GPUs in DDP); the paper's 2 on one GPU")
    t.add_argument("--grad-clip", type=at_least(0.0, float), default=1.0,
                   help="per-optimiser grad-norm clip (Medical Diffusion, release: 1.0); 0 = off")
    t.add_argument("--lr", type=positive, default=3e-4,
                   help="Adam lr of both optimisers: paper 3e-4 (the release's scaling: ≈1.9e-5)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA where supported, fp16 + GradScaler on older GPUs, fp32 on CPU. "
                        "The release trained the VQ-GAN in fp32 (scripts/reproduce_paper.sh passes fp32)")
    t.add_argument("--device", default="auto")
    t.add_argument("--log-every", type=at_least(1), default=50, help="steps per log line / CSV row")
    t.add_argument("--save-every", type=at_least(1), default=1000, help="steps per checkpoint + preview")
    t.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out, start again")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the autoencoder and discriminators (GPU)")
    args = p.parse_args(argv)
    if any(f & (f - 1) for f in args.downsample):  # the encoder halves an axis per stride-2 conv
        got = " ".join(map(str, args.downsample))
        p.error(f"argument --downsample: each factor must be a power of 2, got {got}")
    if args.perceptual_weight > 0 and args.perceptual_weights is None:
        p.error("the perceptual loss needs pretrained VGG16/LPIPS weights: --perceptual-weights DIR "
                "(with vgg16-397923af.pth and vgg.pth) or --perceptual-weights auto (download); or "
                "--perceptual-weight 0")
    return args


# --------------------------------------------------------------------------- autoencoder
def _same_pad(kernel, stride):
    """Replicate padding (F.pad order W, H, D) of k - s per axis, split (ceil, floor)."""
    pads = [kernel - s for s in ((stride,) * 3 if isinstance(stride, int) else stride)]
    return tuple(v for p in reversed(pads) for v in (p // 2 + p % 2, p // 2))


class SamePadConv3d(nn.Module):
    """Conv3d with output size = input size / stride (Medical Diffusion's SamePadConv3d)."""
    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        self.pad = _same_pad(kernel, stride)
        self.conv = nn.Conv3d(cin, cout, kernel, stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class SamePadConvTranspose3d(nn.Module):
    """Transposed conv with output size = input size × stride (kernel 4, padding k - 1)."""
    def __init__(self, cin, cout, kernel=4, stride=2):
        super().__init__()
        self.pad = _same_pad(kernel, stride)
        self.convt = nn.ConvTranspose3d(cin, cout, kernel, stride, padding=kernel - 1)

    def forward(self, x):
        return self.convt(F.pad(x, self.pad, mode="replicate"))


def group_norm(channels, groups):
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv3(SiLU(GN(conv3(SiLU(GN(x))))))."""
    def __init__(self, channels, groups):
        super().__init__()
        self.norm1, self.conv1 = group_norm(channels, groups), SamePadConv3d(channels, channels, 3)
        self.norm2, self.conv2 = group_norm(channels, groups), SamePadConv3d(channels, channels, 3)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _stages(factors):
    """Strides per stage: (4, 4, 4) -> [(2, 2, 2)] * 2; (2, 4, 4) -> [(2, 2, 2), (1, 2, 2)]."""
    times = [int(math.log2(f)) for f in factors]
    return [tuple(2 if t > i else 1 for t in times) for i in range(max(times))]


class Encoder(nn.Module):
    """(B, 1, D, H, W) -> (B, C, D/4, H/4, W/4): conv3; per stage a stride-2 conv (kernel 4)
    doubling the channels + one ResBlock; GroupNorm + SiLU. C = n_hiddens · 4 = 64 at the defaults."""
    def __init__(self, n_hiddens, downsample, groups):
        super().__init__()
        self.conv_first = SamePadConv3d(1, n_hiddens, 3)
        self.blocks = nn.ModuleList()
        ch = n_hiddens
        for stride in _stages(downsample):
            self.blocks.append(nn.ModuleDict({"down": SamePadConv3d(ch, 2 * ch, 4, stride),
                                              "res": ResBlock(2 * ch, groups)}))
            ch *= 2
        self.final = nn.Sequential(group_norm(ch, groups), nn.SiLU())
        self.out_channels = ch

    def forward(self, x):
        h = self.conv_first(x)
        for b in self.blocks:
            h = b["res"](b["down"](h))
        return self.final(h)


class Decoder(nn.Module):
    """Mirror: GroupNorm + SiLU; per stage a stride-2 transposed conv (kernel 4) + two
    ResBlocks (64 -> 64 -> 32 channels at the defaults); conv3 to one channel."""
    def __init__(self, n_hiddens, upsample, groups):
        super().__init__()
        stages = _stages(upsample)
        ch = n_hiddens * 2 ** len(stages)
        self.first = nn.Sequential(group_norm(ch, groups), nn.SiLU())
        self.blocks = nn.ModuleList()
        for i, stride in enumerate(stages):
            out = n_hiddens * 2 ** (len(stages) - i)
            self.blocks.append(nn.ModuleDict({"up": SamePadConvTranspose3d(ch, out, 4, stride),
                                              "res1": ResBlock(out, groups), "res2": ResBlock(out, groups)}))
            ch = out
        self.conv_last = SamePadConv3d(ch, 1, 3)

    def forward(self, z):
        h = self.first(z)
        for b in self.blocks:
            h = b["res2"](b["res1"](b["up"](h)))
        return self.conv_last(h)


class Codebook(nn.Module):
    """EMA vector quantiser (VQ-VAE-2 style, as in Medical Diffusion): initialised from the first
    training batch's encoder outputs (random rows, tiled with a little noise when there are fewer
    vectors than codes); EMA (decay 0.99) of code usage N and of the sum of assigned vectors;
    codes = sum / N; codes whose EMA usage falls below `restart_threshold` restart at random
    encoder outputs; commitment loss 0.25·MSE(z, sg(e)); straight-through gradient; perplexity of
    the usage. Usage and sums accumulate with index_add_ (no one-hot of size vectors × codes, no
    host sync), nearest codes are found in chunks, and all of it runs in fp32 under autocast."""
    def __init__(self, n_codes, dim, decay=0.99, restart_threshold=1.0):
        super().__init__()
        self.n_codes, self.decay, self.restart_threshold = n_codes, decay, restart_threshold
        self.register_buffer("embeddings", torch.randn(n_codes, dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        self.register_buffer("initialized", torch.tensor(False))
        self._need_init = True  # a Python mirror of `initialized`: reading the buffer each step would sync

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._need_init = not bool(self.initialized)

    def _random_vectors(self, flat):
        """n_codes rows drawn from `flat` (tiled + jittered when it has fewer rows); the same on all ranks."""
        n, d = flat.shape
        if n < self.n_codes:
            flat = flat.repeat((self.n_codes + n - 1) // n, 1)
            flat = flat + torch.randn_like(flat) * (0.01 / d**0.5)
        rows = flat[torch.randperm(len(flat), device=flat.device)[: self.n_codes]]
        if dist.is_initialized():
            dist.broadcast(rows, 0)
        return rows

    def nearest(self, flat, chunk=16384):
        """Index of the nearest code for each row of flat (N, dim); |x|² is constant per row."""
        e = self.embeddings
        e2 = (e * e).sum(1)
        return torch.cat([torch.argmin(e2[None] - 2 * c @ e.t(), 1) for c in flat.split(chunk)])

    def forward(self, z):
        """z (B, C, D, H, W) -> (quantised z with straight-through gradient, code indices (B, D, H, W),
        commitment loss, perplexity)."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            flat = z.movedim(1, -1).reshape(-1, z.shape[1])                          # (B·D·H·W, C)
            if self.training and self._need_init:
                with torch.no_grad():
                    v = self._random_vectors(flat.detach())
                    self.embeddings.copy_(v)
                    self.z_avg.copy_(v)
                    self.N.fill_(1.0)
                    self.initialized.fill_(True)
                self._need_init = False
            idx = self.nearest(flat.detach())
            e = F.embedding(idx, self.embeddings).view(*z.shape[:1], *z.shape[2:], z.shape[1]).movedim(-1, 1)
            commitment = 0.25 * F.mse_loss(z, e.detach())
            counts = torch.zeros(self.n_codes, device=z.device).index_add_(
                0, idx, torch.ones_like(idx, dtype=torch.float))
            if self.training:
                with torch.no_grad():
                    sums = torch.zeros_like(self.embeddings).index_add_(0, idx, flat.detach())
                    if dist.is_initialized():
                        dist.all_reduce(counts)
                        dist.all_reduce(sums)
                    self.N.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                    self.z_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
                    n = self.N.sum()
                    weights = (self.N + 1e-7) / (n + self.n_codes * 1e-7) * n  # Laplace-smoothed
                    self.embeddings.copy_(self.z_avg / weights[:, None])
                    used = (self.N >= self.restart_threshold)[:, None]
                    self.embeddings.copy_(torch.where(used, self.embeddings,
                                                      self._random_vectors(flat.detach())))
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
            return z + (e - z).detach(), idx.view(z.shape[0], *z.shape[2:]), commitment, perplexity


class VQGAN(nn.Module):
    """Encoder -> 1×1×1 conv to embedding_dim -> codebook -> 1×1×1 conv -> decoder; at the defaults
    a (1, 32, 256, 256) volume has an (8, 8, 64, 64) latent. 04 uses `encode(x, quantize=False)`
    (the pre-quantisation latent) and `decode(z, quantize=True)`."""
    def __init__(self, n_hiddens=16, downsample=(4, 4, 4), embedding_dim=8, n_codes=16384, num_groups=32):
        super().__init__()
        self.kwargs = dict(n_hiddens=n_hiddens, downsample=list(downsample), embedding_dim=embedding_dim,
                           n_codes=n_codes, num_groups=num_groups)
        self.encoder = Encoder(n_hiddens, downsample, num_groups)
        self.decoder = Decoder(n_hiddens, downsample, num_groups)
        self.pre_vq_conv = SamePadConv3d(self.encoder.out_channels, embedding_dim, 1)
        self.post_vq_conv = SamePadConv3d(embedding_dim, self.encoder.out_channels, 1)
        self.codebook = Codebook(n_codes, embedding_dim)

    def encode(self, x, quantize=True):
        z = self.pre_vq_conv(self.encoder(x))
        return self.codebook(z)[0] if quantize else z

    def decode(self, z, quantize=False):
        z = self.codebook(z)[0] if quantize else z
        return self.decoder(self.post_vq_conv(z))

    def forward(self, x):
        """x (B, 1, D, H, W) in [-1, 1] -> (reconstruction, commitment loss, perplexity)."""
        e, _, commitment, perplexity = self.codebook(self.pre_vq_conv(self.encoder(x)))
        return self.decoder(self.post_vq_conv(e)), commitment, perplexity


def load_vqgan(path, device="cpu"):
    """Rebuild the trained autoencoder from a 03 checkpoint alone (eval mode, frozen)."""
    ckpt = checkpoint_parts(load_checkpoint(path, map_location="cpu"), path, ("model_kwargs", "model"),
                            "03_vqgan.py")
    model = VQGAN(**ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- discriminators
class PatchGAN(nn.Module):
    """PatchGAN (pix2pixHD style): conv k4 s2 + LeakyReLU(0.2); (n_layers - 1) × [conv k4 s2 +
    BatchNorm + LeakyReLU]; conv k4 s1 + BatchNorm + LeakyReLU; conv k4 s1 to one logit map.
    Returns (logits, [features of every layer]) for feature matching. dims = 2 (slices) or 3."""
    def __init__(self, dims, ndf=64, n_layers=3):
        super().__init__()
        Conv, Norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        conv = lambda cin, cout, stride: Conv(cin, cout, 4, stride, padding=2)
        act = lambda: nn.LeakyReLU(0.2)
        layers = [nn.Sequential(conv(1, ndf, 2), act())]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = min(ch * 2, 512)
            layers.append(nn.Sequential(conv(ch, out, 2 if i < n_layers else 1), Norm(out), act()))
            ch = out
        layers.append(nn.Sequential(conv(ch, 1, 1)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return x, feats


def hinge_d_loss(real, fake):
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


# --------------------------------------------------------------------------- perceptual loss
VGG_CONV = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
            (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 (Zhang et al. 2018), plain PyTorch. `features` has torchvision's VGG16
    layout (features.0 ... features.28, so vgg16-397923af.pth loads into it); `lin0..lin4.model.1`
    are the LPIPS linear layers (v0.1 vgg.pth). (B, 1, H, W) in [-1, 1], repeated to RGB -> (B,)."""
    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self):
        super().__init__()
        layers = []
        for c in VGG_CONV:
            layers += [nn.MaxPool2d(2)] if c == "M" else [nn.Conv2d(*c, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers[:30])
        for i, ch in enumerate((64, 128, 256, 512, 512)):
            self.add_module(f"lin{i}", nn.ModuleDict(
                {"model": nn.Sequential(nn.Dropout(), nn.Conv2d(ch, 1, 1, bias=False))}))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def _taps(self, x):
        x = (x.expand(-1, 3, -1, -1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a, b):
        return sum(getattr(self, f"lin{i}")["model"]((fa - fb) ** 2).mean((1, 2, 3))
                   for i, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b))))


def load_lpips(source):
    """LPIPS with pretrained weights from a folder (vgg16-397923af.pth + vgg.pth) or 'auto'
    (downloads both). Loaded strictly; frozen, eval mode."""
    model = LPIPS()
    try:
        if source == "auto":
            get = lambda url: torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            vgg, lin = get(VGG16_URL), get(LPIPS_URL)
        else:
            files = [Path(source) / name for name in ("vgg16-397923af.pth", "vgg.pth")]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(errno.ENOENT, "no such file", str(f))
            vgg, lin = (load_checkpoint(f) for f in files)
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"error: cannot get the LPIPS/VGG16 weights ({e}). Put vgg16-397923af.pth "
                         f"({VGG16_URL}) and vgg.pth ({LPIPS_URL}) in a folder and pass "
                         f"--perceptual-weights DIR, or train without them: --perceptual-weight 0")
    state = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) < 30}
    state.update(lin, shift=model.shift, scale=model.scale)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- locality loss, metrics
def box_mask(boxes, shape):
    """(B, 6) boxes [z0, z1, y0, y1, x0, x1) -> (B, 1, D, H, W) bool, built on the device (no sync)."""
    d, h, w = (torch.arange(n, device=boxes.device) for n in shape)
    inside = lambda a, lo, hi: (a[None] >= lo[:, None]) & (a[None] < hi[:, None])
    z, y, x = (inside(d, boxes[:, 0], boxes[:, 1]), inside(h, boxes[:, 2], boxes[:, 3]),
               inside(w, boxes[:, 4], boxes[:, 5]))
    return (z[:, :, None, None] & y[:, None, :, None] & x[:, None, None, :])[:, None]


def locality_loss(x, x_rec, boxes, has_box):
    """Eq. 2: per sample, mean |x - x̂| inside its mask's bounding box, averaged over the samples
    with a box (an empty mask adds nothing). The release summed over the batch and built the box
    on the CPU each step; we average as the paper does, over boxes precomputed per case."""
    m = box_mask(boxes, x.shape[2:]).to(x.dtype)
    per_sample = ((x - x_rec).abs() * m).sum((1, 2, 3, 4)) / m.sum((1, 2, 3, 4)).clamp_min(1)
    return (per_sample * has_box).sum() / has_box.sum().clamp_min(1)


def gaussian_kernel(sigma, radius, like):
    """1-D Gaussian of σ on -radius..radius, summing to 1, in like's dtype and device: (2·radius + 1,)."""
    r = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    k = torch.exp(-r**2 / (2 * sigma**2))
    return k / k.sum()


def gaussian_smooth(x, kernel, pad=None):
    """Separable smoothing of (N, C, H, W) or (N, C, D, H, W) by a 1-D kernel per spatial axis, the
    last first. pad="reflect"/"replicate" keeps the size; None: "valid" (an axis shrinks by len - 1,
    one shorter than the kernel stays unsmoothed: pytorch-msssim warns and does the same)."""
    n, c, *spatial = x.shape
    conv = F.conv3d if len(spatial) == 3 else F.conv2d
    x = x.reshape(n * c, 1, *spatial)                      # every channel smoothed alike
    k = len(kernel)
    for axis in reversed(range(len(spatial))):
        if pad is None and x.shape[2 + axis] < k:
            continue
        if pad is not None:
            widths = [0, 0] * len(spatial)                 # F.pad lists the last axis first
            j = 2 * (len(spatial) - 1 - axis)
            widths[j:j + 2] = [k // 2, k // 2]
            x = F.pad(x, widths, mode=pad)
        shape = [1] * len(spatial)
        shape[axis] = k
        x = conv(x, kernel.view(1, 1, *shape))
    return x.reshape(n, c, *x.shape[2:])


# SSIM as pytorch-msssim computes it (Wang et al. 2004): Gaussian window 11, σ 1.5, no padding
SSIM_WINDOW, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)


def ssim_and_cs(x, y, data_range=1.0):
    """Mean SSIM and mean contrast-structure term cs per channel of two (N, C, D, H, W) batches,
    each (N, C); C1 = (0.01·L)², C2 = (0.03·L)² for data range L. 06's MS-SSIM builds on it."""
    c1, c2 = ((k * data_range) ** 2 for k in SSIM_K)
    win = gaussian_kernel(SSIM_SIGMA, SSIM_WINDOW // 2, x)
    mu_x = gaussian_smooth(x, win)
    mu_y = gaussian_smooth(y, win)
    var_x = gaussian_smooth(x * x, win) - mu_x**2
    var_y = gaussian_smooth(y * y, win) - mu_y**2
    cov = gaussian_smooth(x * y, win) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def psnr(a, b, mask=None, data_range=1.0):
    se = (a - b) ** 2
    mse = se.mean() if mask is None else se[mask].mean()
    return float(10 * torch.log10(data_range**2 / mse.clamp_min(1e-12)))


# --------------------------------------------------------------------------- data
def mask_box(mask):
    """(D, H, W) mask -> [z0, z1, y0, y1, x0, x1) around voxels in {1, 2}, or None when empty."""
    fg = mask > 0
    if not fg.any():
        return None
    box = []
    for axis in range(3):
        idx = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        box += [int(idx[0]), int(idx[-1]) + 1]
    return box


def load_split(prep, names):
    """Volumes (N, 1, D, H, W) float16 in [0, 1], boxes (N, 6) int64 and has_box (N,) float."""
    if not names:
        return None
    vols, boxes, has = [], [], []
    for n in names:
        vols.append(xyz_to_dhw(read_nifti(prep / "images" / f"{n}.nii.gz")[0]))
        mpath = prep / "masks" / f"{n}.nii.gz"
        if not mpath.exists():
            raise SystemExit(f"error: {mpath} not found: run 02_masks.py first (the locality loss "
                             "needs the masks)")
        box = mask_box(xyz_to_dhw(read_nifti(mpath, None)[0]))
        boxes.append(box or [0] * 6)
        has.append(box is not None)
    return (torch.from_numpy(np.stack(vols)[:, None]).half(), torch.tensor(boxes),
            torch.tensor(has, dtype=torch.float))


# --------------------------------------------------------------------------- training step
def clip_gradients(nets, opt, prec, max_norm):
    """Clip the gradient norm of one optimiser's parameters to `max_norm`, as Lightning's
    gradient_clip_val does in the release (unscaled first under fp16; no host sync)."""
    if max_norm <= 0:
        return
    prec.scaler.unscale_(opt)
    nets = nets if isinstance(nets, tuple) else (nets,)
    torch.nn.utils.clip_grad_norm_([p for net in nets for p in net.parameters()], max_norm)


def train_step(nets, opts, lpips, prec, x, batch_boxes, batch_has_box, gan_on, args):
    """One step of Eq. 1 + λ·Eq. 2 for the autoencoder and (once `gan_on`) one hinge step for both
    discriminators; x (B, 1, D, H, W) in [-1, 1], with its precomputed organ boxes. Returns x̂ and
    the detached [l1, commitment, perceptual, g_image, g_volume, feat_match, locality, d_loss,
    perplexity]. Nothing here waits for the device (bench.py times this function)."""
    model_t, d2_t, d3_t = nets
    opt_ae, opt_d = opts
    device = x.device
    with prec.autocast():
        x_rec, commitment, perplexity = model_t(x)
        x_rec = x_rec.float()
        # one random slice per volume, the same for x and x̂ (2-D discriminator and LPIPS)
        z = torch.randint(x.shape[2], (len(x),), device=device)
        b = torch.arange(len(x), device=device)  # built on the device: no host-to-device copy per step
        sl, sl_rec = x[b, :, z], x_rec[b, :, z]                                # (B, 1, H, W)
        l1 = F.l1_loss(x_rec, x)
        perceptual = lpips(sl, sl_rec).mean() if lpips is not None else torch.zeros((), device=device)
        loc = locality_loss(x, x_rec, batch_boxes, batch_has_box)
        zero = torch.zeros((), device=device)
        g_img = g_vol = feat = d_loss = zero
        if gan_on:
            # each discriminator sees x and x̂ once: the logits on x̂ serve both the generator's loss
            # and the hinge loss (the discriminators change only after both backward passes)
            (lf2, ff2), (lf3, ff3) = d2_t(sl_rec), d3_t(x_rec)
            (lr2, fr2), (lr3, fr3) = d2_t(sl), d3_t(x)
            g_img, g_vol = -lf2.mean(), -lf3.mean()
            # feature matching, weight 4 / (n_layers + 1) per layer as in the reference
            fw = 4.0 / (args.disc_layers + 1)
            match = lambda ff, fr: sum(fw * F.l1_loss(a, b.detach()) for a, b in zip(ff, fr))
            feat = (match(ff2[:-1], fr2[:-1]) * (args.image_gan_weight > 0)
                    + match(ff3[:-1], fr3[:-1]) * (args.volume_gan_weight > 0))
            d_loss = (args.image_gan_weight * hinge_d_loss(lr2, lf2)
                      + args.volume_gan_weight * hinge_d_loss(lr3, lf3))
        loss = (args.l1_weight * l1 + commitment + args.perceptual_weight * perceptual
                + args.image_gan_weight * g_img + args.volume_gan_weight * g_vol
                + args.gan_feat_weight * feat + args.lambda_loc * loc)                  # Eq. 1 + λ·Eq. 2
    # each loss reaches only its own optimiser's weights (`inputs`): the hinge loss stops at x̂, the
    # generator's loss passes through the discriminators without a gradient for their weights
    weights = lambda opt: [p for group in opt.param_groups for p in group["params"]]
    opt_ae.zero_grad(set_to_none=True)
    if gan_on:
        opt_d.zero_grad(set_to_none=True)
        prec.scaler.scale(d_loss).backward(inputs=weights(opt_d), retain_graph=True)
    prec.scaler.scale(loss).backward(inputs=weights(opt_ae))
    clip_gradients(model_t, opt_ae, prec, args.grad_clip)
    prec.scaler.step(opt_ae)
    if gan_on:
        clip_gradients((d2_t, d3_t), opt_d, prec, args.grad_clip)
        prec.scaler.step(opt_d)
    prec.scaler.update()
    return x_rec, torch.stack([l1, commitment, perceptual, g_img, g_vol, feat, loc, d_loss,
                               perplexity]).detach().float()


# --------------------------------------------------------------------------- main
CPU_SIZED = ("64×64×16 volumes (01 --size 64 --depth 16 --spacing 4 4 4.6), --n-hiddens 8 --num-groups 8 "
             "--n-codes 512 --disc-channels 16 --perceptual-weight 0 --steps 300 --disc-start 200")


def gpu_sized(shape, args):
    """The settings that make a run GPU-sized (the paper's are): large volumes, a wide model, many steps."""
    big = [("×".join(map(str, shape)) + " volumes", shape[1] * shape[2] >= 128 * 128),
           (f"--n-hiddens {args.n_hiddens}", args.n_hiddens >= 16),
           (f"--steps {args.steps}", args.steps > 5000)]
    return ", ".join(text for text, on in big if on)


# settings a resumed run must share with its checkpoint (--steps may grow, logging may change)
RESUME_KEYS = ("data", "lr", "batch_size", "l1_weight", "perceptual_weight", "image_gan_weight",
               "volume_gan_weight", "gan_feat_weight", "disc_start", "lambda_loc", "grad_clip", "seed",
               "precision")


def main(args):
    run, prec = start_run(args.device, args.precision, args.seed)
    device, rank, world = run.device, run.rank, run.world_size
    out = args.out
    if rank == 0:
        prepare_out(out, [args.prep])
    split = read_split(args.prep, masks=True)  # a volume without a mask (02 skipped it) is left out
    train = load_split(args.prep, split["train"])
    if train is None:
        raise SystemExit(f"error: no training volume with a mask in {args.prep}: run 02_masks.py first")
    # what this run trains on, so that a resume on other data (or a redone 01/02) is refused
    args.data = training_data_record(args.prep, split["train"])
    vols, boxes, has_box = train
    # The training set stays in memory; on the GPU too when it fits easily (no loader, no copies per step).
    on_gpu = device.type == "cuda" and vols.numel() * 2 < 0.25 * torch.cuda.mem_get_info(device)[0]
    home = device if on_gpu or device.type == "cpu" else torch.device("cpu")  # where the training set lives
    vols, boxes, has_box = vols.to(home), boxes.to(home), has_box.to(home)
    # a batch gathered in host memory reaches the GPU by one pinned, non-blocking copy (no sync)
    to_device = (lambda t: t.pin_memory().to(device, non_blocking=True)) if home != device else (lambda t: t)
    n_train = len(vols)
    shape = tuple(vols.shape[2:])

    model = VQGAN(args.n_hiddens, args.downsample, args.embedding_dim, args.n_codes,
                  args.num_groups).to(device)
    disc2d = PatchGAN(2, args.disc_channels, args.disc_layers).to(device)
    disc3d = PatchGAN(3, args.disc_channels, args.disc_layers).to(device)
    lpips = load_lpips(args.perceptual_weights).to(device) if args.perceptual_weight > 0 else None
    opt_ae = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=device.type == "cuda")
    opt_d = torch.optim.Adam(list(disc2d.parameters()) + list(disc3d.parameters()), lr=args.lr,
                             betas=(0.5, 0.9), fused=device.type == "cuda")
    gen = torch.Generator(device=home).manual_seed(args.seed + 1000 * rank)  # batch sampling

    # everything a resumed run needs, by the names the checkpoint stores them under
    parts = {"model": model, "disc2d": disc2d, "disc3d": disc3d, "opt_ae": opt_ae, "opt_d": opt_d,
             "scaler": prec.scaler}
    ckpt_path = out / "ckpt.pt"
    ckpt = open_resume(ckpt_path, args.fresh, ("model_kwargs", "model", "args", "step"), "03_vqgan.py",
                     args, RESUME_KEYS, device)
    step = 0 if ckpt is None else resume(ckpt, ckpt_path, parts, gen, device, model.kwargs)
    if world > 1:
        if device.type == "cuda":  # BatchNorm statistics over all GPUs (the reference used SyncBatchNorm)
            disc2d, disc3d = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (disc2d, disc3d))
        ddp = lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
        model_t, d2_t, d3_t = ddp(model), ddp(disc2d), ddp(disc3d)
    else:
        model_t, d2_t, d3_t = model, disc2d, disc3d
    if args.compile:
        model_t, d2_t, d3_t = (torch.compile(m) for m in (model_t, d2_t, d3_t))

    def save(step):
        if rank != 0:
            return
        save_checkpoint(training_state(step, args, model.kwargs, parts, gen, device), ckpt_path)
        with torch.no_grad():  # preview: first sample of the last batch, box drawn
            b = box_mask(batch_boxes[:1], shape)[0, 0].cpu().numpy().astype(np.uint8)
            save_preview(out / "previews" / f"step{step:07d}.png",
                         [(x[0, 0] + 1) / 2, (x_rec[0, 0].float().clamp(-1, 1) + 1) / 2],
                         [b, b], ["input", f"reconstruction, step {step}"], vrange=soft_tissue(args.prep),
                         names={1: "organ box"})

    print0(f"VQ-GAN {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params (encoder "
           f"{sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M, decoder "
           f"{sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M); {n_train} training volumes "
           f"{shape}{' on the GPU' if on_gpu else ''}; {world} process(es) on {device}, {prec.name}; "
           f"batch {args.batch_size}×{world}, lr {args.lr}, λ_loc {args.lambda_loc}")
    sizing_note(device, gpu_sized(shape, args), CPU_SIZED)
    log_path = out / "log.csv"
    fields = ["step", "l1", "commitment", "perceptual", "g_image", "g_volume", "feat_match", "locality",
              "d_loss", "perplexity", "ms_per_step", "volumes_per_s", "peak_mem_gb"]
    log_row = csv_logger(log_path, fields, start_step=step, enabled=rank == 0)
    sums = torch.zeros(len(fields) - 4, device=device)
    t_last, n_last = time.perf_counter(), step
    first = step + 1  # the step that gets a timing line
    for net in (model_t, d2_t, d3_t):
        net.train()
    while step < args.steps:
        idx = torch.randint(n_train, (args.batch_size,), generator=gen, device=home)
        x = to_device(vols[idx]).float() * 2 - 1  # (B, 1, D, H, W) in [-1, 1]
        batch_boxes, batch_has_box = to_device(boxes[idx]), to_device(has_box[idx])  # (B, 6), (B,)
        gan_on = step >= args.disc_start  # disc_factor of the reference: 0 before, 1 after
        x_rec, stats = train_step((model_t, d2_t, d3_t), (opt_ae, opt_d), lpips, prec, x, batch_boxes,
                                  batch_has_box, gan_on, args)
        step += 1
        sums += stats
        if step == first:
            first_step_line(device, t_last, step, args.steps, args.log_every)
        if step % args.log_every == 0 or step == args.steps:  # the only host syncs: once per interval
            vals = (sums / (step - n_last)).tolist()
            dt = time.perf_counter() - t_last
            ms = 1000 * dt / (step - n_last)
            vps = (step - n_last) * args.batch_size * world / dt
            row = [step, *vals, ms, vps, peak_memory_gb(device)]
            log_row(row)
            print0(f"step {step:>7} | l1 {vals[0]:.4f} commit {vals[1]:.4f} perc {vals[2]:.4f} "
                   f"g {vals[3]:.3f}/{vals[4]:.3f} feat {vals[5]:.4f} loc {vals[6]:.4f} "
                   f"d {vals[7]:.3f} | perplexity {vals[8]:.1f} | "
                   f"{ms:.0f} ms/step, {vps:.2f} vol/s, peak {row[-1]:.2f} GB, {eta(ms, args.steps - step)}")
            sums.zero_()
            t_last, n_last = time.perf_counter(), step
        if step % args.save_every == 0 or step == args.steps:
            save(step)

    ddp_check((model, disc2d, disc3d), world)

    if rank == 0:
        evaluate(model, args.prep, split["test"], out, device, prec)
        print(f"wrote {ckpt_path} (step {step}), {log_path}, previews in {out / 'previews'}")
    teardown_distributed()


@torch.no_grad()
def evaluate(model, prep, names, out, device, prec):
    """PSNR and SSIM on the test split, in [0, 1] units: of the whole volume and of the sub-volume
    inside the mask's box."""
    test = load_split(prep, names)
    if test is None:
        print("no test volumes in split.json: metrics skipped")
        return
    model.eval()
    vols, boxes, has_box = test
    rows = []
    for name, v, b, h in bar(zip(names, vols, boxes, has_box), total=len(names), desc="test volumes"):
        x = v[None].to(device).float()
        with prec.autocast():
            rec = model(x * 2 - 1)[0].float()
        rec = (rec.clamp(-1, 1) + 1) / 2
        r = {"case": name, "psnr": psnr(x, rec), "ssim": float(ssim_and_cs(x, rec)[0].mean())}
        if h:
            z0, z1, y0, y1, x0, x1 = b.tolist()
            inside = (..., slice(z0, z1), slice(y0, y1), slice(x0, x1))  # the box's sub-volume
            r.update(psnr_box=psnr(x[inside], rec[inside]),
                     ssim_box=float(ssim_and_cs(x[inside], rec[inside])[0].mean()))
        rows.append(r)
    mean = lambda k: (round(float(np.mean([r[k] for r in rows if k in r])), 4)
                      if any(k in r for r in rows) else None)
    metrics = {k: mean(k) for k in ("psnr", "ssim", "psnr_box", "ssim_box")}
    save_json({**metrics, "n_test": len(rows), "cases": rows}, out / "metrics.json")
    print(f"test ({len(rows)} volumes): PSNR {metrics['psnr']} dB, SSIM {metrics['ssim']}; inside the box: "
          f"PSNR {metrics['psnr_box']} dB, SSIM {metrics['ssim_box']} -> {out / 'metrics.json'}")


if __name__ == "__main__":
    run_stage(main, get_args)
