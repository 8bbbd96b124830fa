"""06 · Quality evaluation, holistic and localised, plus mask fidelity (paper §4.2, §4.4; Tables 1-3, Fig. 4).

Reads  --real (default data/prep): images/ ([0, 1]), masks/ (02, the original mask set), split.json,
       config.json (01's HU window); each --fake NAME=DIR (default lad=runs/samples): 05's
       <id>.nii.gz (int16 HU) and <id>_mask.nii.gz (the condition, used by the fidelity test).
Writes --out (default runs/eval):
    metrics.json   every figure below, per method, with the settings that produced it
    table.md       laid out like Table 1: Real and each method; holistic and localised FID / MMD,
                   MS-SSIM diversity, mask-fidelity Dice, organ contrast
    mds.png        Figure 4: classical MDS of the features, a least-squares ellipse per method
    cache/         features per folder (keyed on the files, the network, its weights and the crop)

Sets are evaluated one at a time (the real set stays loaded; each synthetic set is read, measured,
dropped), so memory holds two sets: all of Table 2's nine at the paper's size would be some 75 GB.

The protocol is HA-GAN's, as the paper uses it (docs/reference.md §6):
  features  MedicalNet 3D ResNet-50 (global average pooled, 2048-d), volumes fed in [-1, 1];
  FID       Fréchet distance between Gaussian fits of the features;
  MMD       unbiased MMD² with a Gaussian kernel, bandwidth from the median heuristic;
  localised the same on every volume (real and synthetic) cropped to the organ's maximum bounding
            box over the original mask set (02's masks of the training split; see organ_box);
  MS-SSIM   3-D, averaged over --pairs random pairs within a set (lower = more diverse); the
            real set's value is the reference row.
Without --med3d-weights the network keeps a fixed-seed random initialisation; every output then
says "random features — not comparable to the paper". The features still rank sets (a random
network is a fixed non-linear embedding), but the scale of the numbers means nothing.

Our additions, not in the paper: does the generated anatomy follow the mask it was conditioned on?
Mask fidelity trains a small 2-D segmentation network on axial slices of (synthetic volume, its
condition mask) and tests it on the real test split; the same network trained on the real training
split is the reference: a generator that puts the organ where the mask says yields a network that
finds it in real CT. Its training slices are randomly shifted and flipped (--fidelity-shift), or
masks that ignore their volumes would still teach where the organ usually lies and score by position
alone. Organ contrast, a direct check: mean HU inside each volume's mask minus the 2-voxel shell
around it, with the next volume's mask as a control (what the organ's usual position alone gives).

    python 06_eval.py                                                     # runs/samples vs data/prep
    python 06_eval.py --fake lad=runs/samples --fake v0=runs/samples_v0 --med3d-weights pretrain/resnet_50.pth
"""
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg, ndimage
from scipy.spatial.distance import cdist
from torch import nn

from common import (ArgumentParser, at_least, atomic_path, bar, check_masks_current, first_step_line,
                    in_range, load_stage, named_dir, pick_device, prepare_out, read_nifti, read_split,
                    run_stage, save_figure, save_json, seed_everything, sizing_note, xyz_to_dhw)

dice = load_stage("02_masks").dice  # one Dice (None for two empty masks); the fidelity probe's
vqgan = load_stage("03_vqgan")  # mask_box, ssim_and_cs

RANDOM_NOTE = "random features — not comparable to the paper"


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    p.add_argument("--real", type=Path, default=Path("data/prep"),
                   help="01/02 output: images/, masks/, split.json")
    p.add_argument("--real-split", choices=["all", "train", "test"], default="all",
                   help="real volumes the synthetic sets are compared with (FID, MMD, MS-SSIM)")
    p.add_argument("--fake", action="append", type=named_dir, metavar="NAME=DIR", default=None,
                   help="a synthetic set (05's output), one per method; default lad=runs/samples")
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    f = p.add_argument_group("features (HA-GAN protocol, docs/reference.md §6)")
    f.add_argument("--med3d-depth", type=int, choices=sorted(MEDICALNET_ARCH), default=50,
                   help="MedicalNet ResNet depth")
    f.add_argument("--med3d-weights", default=None,
                   help="MedicalNet checkpoint (pretrain/resnet_50.pth, the one HA-GAN's "
                        "evaluation used), or 'auto' to download; none = random features")
    f.add_argument("--batch-size", type=at_least(1), default=4, help="volumes per feature batch")
    f.add_argument("--pairs", type=at_least(1), default=400,
                   help="random pairs for the MS-SSIM diversity (§4.2)")
    q = p.add_argument_group("mask fidelity (our addition)")
    q.add_argument("--fidelity-steps", type=at_least(0), default=2000,
                   help="training steps of each 2-D network; 0 = skip")
    q.add_argument("--fidelity-batch", type=at_least(1), default=16, help="slices per step")
    q.add_argument("--fidelity-width", type=at_least(1), default=16, help="base width of the 2-D U-Net")
    q.add_argument("--fidelity-shift", type=in_range(0, 0.5), default=0.25,
                   help="largest random in-plane shift of a training batch, as a fraction of the slice size: "
                        "the network cannot learn where the organ usually lies, only what it looks like")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    args.fake = dict(args.fake or [named_dir("lad=runs/samples")])
    if "real" in (k.lower() for k in args.fake):
        p.error("--fake: 'real' is the name of the reference row")
    return args


# --------------------------------------------------------------------------- MedicalNet (Med3D 3-D ResNet)
# depth -> (block, blocks per layer, shortcut type of the released checkpoint; note that ResNet-10
# is B), as in Tencent/MedicalNet README.md ("Network structure parameter settings" and the
# 2019/07/30 *_23dataset.pth update) and Project-MONAI/MONAI monai/networks/nets/resnet.py
# (get_medicalnet_pretrained_resnet_args, "after testing"; it loads these files with strict=True).
# Only these types make the README's parameter counts (14.36 / 32.99 / 63.31 / 46.21 M for
# 10 / 18 / 34 / 50) equal this backbone's parameters plus BN running statistics.
MEDICALNET_ARCH = {
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
    101: ("bottleneck", (3, 4, 23, 3), "B"),
    152: ("bottleneck", (3, 8, 36, 3), "B"),
    200: ("bottleneck", (3, 24, 36, 3), "B"),
}

# `--med3d-weights auto` fetches the Hugging Face copy that MONAI's resnet.py downloads; Tencent's
# README distributes the same files only inside a zip archive (MEDICALNET_HELP).
MEDICALNET_URL = ("https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}/resolve/main/"
                  "resnet_{depth}.pth")
MEDICALNET_HELP = """MedicalNet weights: the Tencent/MedicalNet README distributes them in one archive,
MedicalNet_pytorch_files.zip, on Google Drive
  https://drive.google.com/file/d/13tnSvXY7oDIEloNFiGTsjUIYfS3g3BfG/view?usp=sharing
or Tencent Weiyun
  https://share.weiyun.com/55sZyIx
Unzip it and pass --med3d-weights pretrain/resnet_{depth}.pth (HA-GAN's evaluation used resnet_50.pth).
On a machine with internet, --med3d-weights auto downloads the copy MONAI uses:
  """ + MEDICALNET_URL


class ZeroPadShortcut(nn.Module):
    """Shortcut A: subsample by the stride and append zero channels (MedicalNet's
    `downsample_basic_block`: avg_pool3d with kernel 1 is plain subsampling). No parameters,
    hence no state-dict keys, as in the released 18/34 checkpoints."""
    def __init__(self, out_channels, stride):
        super().__init__()
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x):
        s = self.stride
        x = x[:, :, ::s, ::s, ::s]
        zeros = x.new_zeros(x.shape[0], self.out_channels - x.shape[1], *x.shape[2:])
        return torch.cat([x, zeros], 1)


def conv_bn_shortcut(in_channels, out_channels, stride, dims=3):
    """Shortcut B: 1×1(×1) conv (stride) + BN, keys downsample.0.weight and downsample.1.*."""
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, bias=False), bn(out_channels))


class BasicBlock(nn.Module):
    """3³ conv (stride, dilation) -> BN -> ReLU -> 3³ conv (dilation) -> BN, + shortcut, ReLU.
    dims=2 gives the same block in 2-D (07_ssl_seg.py's ResNet, torchvision's key names)."""
    expansion = 1

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None, dims=3):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.conv1 = conv(in_channels, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = bn(planes)
        self.conv2 = conv(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = bn(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1³ conv -> 3³ conv (stride, dilation) -> 1³ conv to 4·planes, BN after each, + shortcut, ReLU
    (the stride on the 3³ conv, as MedicalNet and torchvision's v1.5). dims=2: the 2-D block."""
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None, dims=3):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.conv1 = conv(in_channels, planes, 1, bias=False)
        self.bn1 = bn(planes)
        self.conv2 = conv(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = bn(planes)
        self.conv3 = conv(planes, planes * 4, 1, bias=False)
        self.bn3 = bn(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet_layer(block, in_channels, planes, n, stride=1, dilation=1, first_dilation=None,
                 shortcut="B", dims=3):
    """One ResNet layer: n blocks, the first with the stride, `first_dilation` (default: the
    layer's) and, where the shape changes, the shortcut (A: zero-padded, B: conv + BN). MedicalNet
    gives every block of a layer its dilation; torchvision (07) keeps the previous one in the first."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = (ZeroPadShortcut(out_channels, stride) if shortcut == "A"
                      else conv_bn_shortcut(in_channels, out_channels, stride, dims))
    layers = [block(in_channels, planes, stride, first_dilation or dilation, downsample, dims)]
    layers += [block(out_channels, planes, 1, dilation, dims=dims) for _ in range(1, n)]
    return nn.Sequential(*layers)


class MedicalNet(nn.Module):
    """Med3D 3-D ResNet-{10, 18, 34, 50, 101, 152, 200} as a feature extractor: conv1 7³ stride 2
    (64 ch) -> BN -> ReLU -> maxpool 3³ stride 2 -> layer1 (64) -> layer2 (128, stride 2) -> layer3
    (256, dilation 2) -> layer4 (512, dilation 4): output stride 8. The released `conv_seg` decoder
    is replaced by global average pooling (HA-GAN), giving (N, 512 · expansion)."""
    def __init__(self, depth=50):
        super().__init__()
        if depth not in MEDICALNET_ARCH:
            raise ValueError(f"MedicalNet depth must be one of {sorted(MEDICALNET_ARCH)}, got {depth}")
        kind, blocks, shortcut = MEDICALNET_ARCH[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.shortcut = depth, shortcut
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        e = block.expansion
        self.layer1 = resnet_layer(block, 64, 64, blocks[0], shortcut=shortcut)
        self.layer2 = resnet_layer(block, 64 * e, 128, blocks[1], stride=2, shortcut=shortcut)
        self.layer3 = resnet_layer(block, 128 * e, 256, blocks[2], dilation=2, shortcut=shortcut)
        self.layer4 = resnet_layer(block, 256 * e, 512, blocks[3], dilation=4, shortcut=shortcut)
        self.out_features = 512 * e

    def forward(self, x):  # (N, 1, D, H, W) -> (N, F)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, F, D/8, H/8, W/8)
        return x.mean((2, 3, 4))  # global average pooling in place of conv_seg


def init_random(model, seed=0):
    """The release's initialisation (Kaiming normal, fan_out, for convs; BN weight 1, bias 0) from a
    local generator: reproducible, and the global RNG is left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                fan_out = m.out_channels * math.prod(m.kernel_size)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def read_medicalnet_state_dict(path):
    """A released checkpoint -> plain state dict: unwraps {'state_dict': ...}, strips the `module.`
    prefix of nn.DataParallel and drops the `conv_seg.*` head, which we replace."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict or {{'state_dict': ...}}, found {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("conv_seg.")}


def download_medicalnet(depth):
    """resnet_<depth>.pth in torch.hub's checkpoint folder, downloaded the first time."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"resnet_{depth}.pth"
    if not path.is_file():
        url = MEDICALNET_URL.format(depth=depth)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path))
        except Exception as e:  # no network, proxy, moved file: say what to do instead
            raise FileNotFoundError(f"cannot download {url} ({type(e).__name__}: {e}).\n"
                                    + MEDICALNET_HELP.format(depth=depth)) from e
    return path


def load_medicalnet(depth=50, weights=None, device="cpu"):
    """-> (model in eval mode on `device`, note on where its weights came from). weights: None =
    random (seed 0; the note says the features are not comparable to the paper); a path = a released
    resnet_<depth>.pth whose keys must all match (strict), else ValueError; "auto" = download
    MEDICALNET_URL once into torch.hub's cache (needs internet)."""
    with torch.random.fork_rng(devices=[]):  # PyTorch's default init must not move the caller's RNG
        model = MedicalNet(depth)
    if weights is None:
        init_random(model, seed=0)
        note = f"MedicalNet ResNet-{depth}, random weights (seed 0): {RANDOM_NOTE}"
    else:
        path = download_medicalnet(depth) if str(weights) == "auto" else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file.\n" + MEDICALNET_HELP.format(depth=depth))
        sd = read_medicalnet_state_dict(path)
        # BN's num_batches_tracked is optional (torch fills it in when absent)
        expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - model.state_dict().keys())
        if missing or unexpected:
            raise ValueError(f"{path} does not fit MedicalNet ResNet-{depth} (shortcut {model.shortcut}): "
                             f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                             f"{unexpected[:5]} (is it resnet_{depth}.pth?)")
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:  # shapes that differ
            raise ValueError(f"{path} does not fit MedicalNet ResNet-{depth}: {e}") from None
        note = f"MedicalNet ResNet-{depth} weights from {path}"
    return model.to(device).eval(), note


@torch.no_grad()
def features(model, volumes, batch_size=4):
    """(N, 1, D, H, W) volumes in [-1, 1] (HA-GAN feeds them without z-scoring) -> (N, F) float64 numpy."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in bar(range(0, len(volumes), batch_size), desc="features"):
        x = torch.as_tensor(volumes[i:i + batch_size]).to(device, torch.float32)
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"features expects (N, 1, D, H, W) volumes, got {tuple(x.shape)}")
        if x.abs().max() > 1 + 1e-3:
            raise ValueError(f"features expects volumes scaled to [-1, 1], found values up to "
                             f"{x.abs().max():.3g}")
        out.append(model(x).double().cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------- FID and MMD on features
def as_float64(x):
    """numpy array or torch tensor -> float64 numpy (N, F)."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return np.atleast_2d(x.astype(np.float64))


def fid(a, b, eps=1e-6):
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F):
    ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), as pytorch-fid and HA-GAN compute it (float64,
    scipy sqrtm; if the square root is not finite, eps·I is added to both covariances; a small
    imaginary part from round-off is dropped, a large one raises)."""
    a, b = as_float64(a), as_float64(b)
    if min(len(a), len(b)) < 2:  # one sample has no covariance (NaN), and sqrtm of NaN never returns
        raise ValueError(f"fid: needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("fid: features hold NaN or inf")
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # with fewer volumes than features Σ is singular; the check below decides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid: singular covariance product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm(Σa Σb)")
        covmean = covmean.real
    diff = a.mean(0) - b.mean(0)  # μa − μb
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def mmd(a, b):
    """Unbiased MMD² of feature sets a (N, F) and b (M, F) with k(x, y) = exp(−α‖x − y‖²), as HA-GAN
    computes it: batmanlab/HA-GAN evaluation/fid_score.py uses MMDStatistic(..., alphas='median') of
    Li Sun's torch-two-sample (josipd/torch-two-sample PR #10, torch_two_sample/statistics_diff.py):
      α = 1 / median², the median taken over the whole (N+M)² matrix of pooled pairwise distances —
          zero diagonal and both triangles included — and, as torch.median, the lower of the two
          middle values; distances are sqrt(‖x − y‖² + 1e-5) (torch_two_sample/util.py pdist);
      MMD² = mean_{i≠j} k(a_i, a_j) + mean_{i≠j} k(b_i, b_j) − 2 mean_{i,j} k(a_i, b_j)."""
    a, b = as_float64(a), as_float64(b)
    n, m = len(a), len(b)
    x = np.concatenate([a, b])
    d2 = cdist(x, x, "sqeuclidean") + 1e-5         # (N+M, N+M) squared distances, pdist's eps
    dist = np.sqrt(d2)
    median = np.sort(dist, axis=None)[(dist.size - 1) // 2]  # lower median, diagonal included
    k = np.exp(-d2 / median**2)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


# --------------------------------------------------------------------------- MS-SSIM in 3-D
# pytorch-msssim (VainF/pytorch-msssim pytorch_msssim/ssim.py) semantics on (N, C, D, H, W), on 03's SSIM.
# Medical Diffusion's own 3-D MS-SSIM raises the last scale to the wrong power; we do not copy that.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_3d(x, y, data_range):
    """MS-SSIM of two (N, C, D, H, W) batches -> (N,), averaged over channels (the caller
    averages over N). 5 scales with weights MS_SSIM_WEIGHTS; between scales avg_pool3d(kernel 2)
    with padding 1 on odd axes (zeros counted in the mean, as pytorch-msssim); ReLU on each cs
    and on the last SSIM; result ∏_{i<5} cs_i^{w_i} · ssim_5^{w_5}. Unlike pytorch-msssim there
    is no minimum-size assert: axes shorter than the 11-voxel window are not smoothed (03's
    gaussian_smooth), and an axis pooled down to one voxel is not pooled further (so 8 or 12
    slices work). Float64 for float64 inputs, else float32."""
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"ms_ssim_3d expects two (N, C, D, H, W) tensors of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=dtype, device=x.device)
    mcs = []
    for scale in range(len(weights)):
        ssim, cs = vqgan.ssim_and_cs(x, y, data_range)
        if scale < len(weights) - 1:
            mcs.append(F.relu(cs))
            kernel = [2 if s > 1 else 1 for s in x.shape[2:]]  # an axis down to one voxel stays one voxel
            padding = [s % 2 if s > 1 else 0 for s in x.shape[2:]]
            x, y = F.avg_pool3d(x, kernel, kernel, padding), F.avg_pool3d(y, kernel, kernel, padding)
    terms = torch.stack(mcs + [F.relu(ssim)])  # (5, N, C): cs_1..cs_4, ssim_5
    return torch.prod(terms ** weights[:, None, None], 0).mean(1)


def diversity(vols, pairs, rng, batch=8):
    """Mean MS-SSIM over `pairs` random pairs of distinct volumes of one set (all pairs when there are
    fewer): (N, D, H, W) in [0, 1], data range 1. Lower = more diverse (§4.2)."""
    n = len(vols)
    if n < 2:
        return None
    every = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chosen = (every if len(every) <= pairs
              else [every[k] for k in rng.choice(len(every), pairs, replace=False)])
    total = 0.0
    for s in bar(range(0, len(chosen), batch), desc="MS-SSIM pairs"):
        i, j = map(list, zip(*chosen[s:s + batch]))
        x, y = torch.from_numpy(vols[i])[:, None], torch.from_numpy(vols[j])[:, None]
        total += ms_ssim_3d(x, y, 1.0).sum().item()
    return total / len(chosen)


# --------------------------------------------------------------------------- volumes and boxes
def volume_to_unit(arr, hu, path):
    """A volume on 01's [0, 1] scale: 01's float output as it is, HU (05's int16) windowed to `hu`."""
    if np.issubdtype(arr.dtype, np.integer) or arr.min() < -0.01 or arr.max() > 1.01:
        return np.clip((arr.astype(np.float32) - hu[0]) / (hu[1] - hu[0]), 0, 1)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: non-finite values")
    return arr.astype(np.float32)


def load_set(pairs, hu, shape=None):
    """[(image path, mask path or None)] -> (names, volumes (N, D, H, W) float32 [0, 1], masks list).
    A file that cannot be read, or whose shape differs from `shape` (the real set's), is reported
    and skipped: one bad volume does not stop an evaluation."""
    names, vols, masks = [], [], []
    for img, msk in bar(pairs, desc="read"):
        try:
            arr = read_nifti(img, None)[0]
            vol = xyz_to_dhw(volume_to_unit(np.asarray(arr), hu, img))
            if shape is not None and vol.shape != tuple(shape):
                raise ValueError(f"{img}: shape {vol.shape} (D, H, W), expected {tuple(shape)} "
                                 f"like the real set")
            if vol.min() == vol.max():  # one value everywhere: what a diverged generator writes
                raise ValueError(f"{img}: every voxel is {vol.min():g}: not an image "
                                 f"(a diverged model?)")
            m = None
            if msk is not None and msk.exists():
                m = xyz_to_dhw(read_nifti(msk, None)[0]).astype(np.uint8)
                if m.shape != vol.shape:
                    raise ValueError(f"{msk}: shape {m.shape} differs from its volume's {vol.shape}")
        except ValueError as e:
            print(f"skipped: {e}")
            continue
        names.append(img.name.removesuffix(".nii.gz"))
        vols.append(vol)
        masks.append(m)
    return names, (np.stack(vols) if vols else np.zeros((0, *(shape or (0, 0, 0))), np.float32)), masks


def real_pairs(prep, names):
    return [(prep / "images" / f"{n}.nii.gz", prep / "masks" / f"{n}.nii.gz") for n in names]


def fake_pairs(folder):
    """A synthetic set's (volume, condition mask) paths: the samples 05's samples.json lists, or, for
    a folder from elsewhere, every NIfTI but masks and hidden (temporary) files."""
    index = folder / "samples.json"
    if index.is_file():
        imgs = [folder / f"{sid}.nii.gz" for sid in sorted(json.loads(index.read_text())["samples"])]
    else:
        imgs = sorted(p for p in folder.glob("*.nii.gz") if not p.name.endswith("_mask.nii.gz")
                      and not p.name.startswith("."))
    return [(p, p.with_name(p.name.replace(".nii.gz", "_mask.nii.gz"))) for p in imgs]


def set_composition(folder):
    """How many samples of a 05 set were conditioned on original and on augmented masks (None when
    the folder has no samples.json): what a table row is allowed to be built from (§4.4)."""
    index = folder / "samples.json"
    if not index.is_file():
        return None
    samples = json.loads(index.read_text())["samples"].values()
    return {kind: sum(r["mask"] == kind for r in samples) for kind in ("original", "augmented")}


def organ_box(masks, min_fraction=0.1):
    """[z0, z1, y0, y1, x0, x1): the maximum bounding box of the organ (labels > 0) over a mask set
    (§4.2, localised FID/MMD; the paper takes the original mask set, here its training masks). Per
    mask, components (26-connected) under `min_fraction` of its largest are left out, so a predicted
    mask's stray voxel cannot widen the box to the whole volume. None if every mask is empty."""
    box = None
    for m in masks:
        parts, n = ndimage.label(m > 0, structure=np.ones((3, 3, 3)))
        if n == 0:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        keep = np.isin(parts, 1 + np.flatnonzero(sizes >= min_fraction * sizes.max()))
        b = vqgan.mask_box(keep)
        box = b if box is None else [min(box[i], b[i]) if i % 2 == 0 else max(box[i], b[i]) for i in range(6)]
    return box


def crop(vols, box):
    """(N, D, H, W) -> the box's sub-volumes (N, z1-z0, y1-y0, x1-x0)."""
    z0, z1, y0, y1, x0, x1 = box
    return vols[:, z0:z1, y0:y1, x0:x1]


# --------------------------------------------------------------------------- features, cached
def file_key(pairs):
    """A fingerprint of a set's files (name, size, modification time): the cache is void when one changes."""
    h = hashlib.sha1()
    for img, _ in pairs:
        st = img.stat()
        h.update(f"{img.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_features(cache_dir, tag, key, compute, vols):
    """Features from cache_dir/<tag>_<key>.npy, or compute(vols) and store them (atomically)."""
    path = cache_dir / f"{tag}_{key}.npy"
    if path.exists():
        return np.load(path)
    feats = compute(vols)
    with atomic_path(path) as tmp:
        np.save(tmp, feats)
    return feats


# --------------------------------------------------------------------------- MDS and ellipses (Fig. 4)
def classical_mds(x, k=2):
    """(N, F) -> (N, k) classical (Torgerson) MDS: the top eigenvectors of the double-centred
    squared-distance matrix, scaled by the root of their eigenvalues."""
    x = np.asarray(x, np.float64)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    n = len(x)
    j = np.eye(n) - 1.0 / n
    w, v = np.linalg.eigh(-0.5 * j @ d2 @ j)
    top = np.argsort(w)[::-1][:k]
    return v[:, top] * np.sqrt(np.clip(w[top], 0, None))


def fit_ellipse(xy):
    """Direct least-squares ellipse fit (Fitzgibbon et al. 1999, in Halír & Flusser's stable form):
    xy (N, 2), N >= 5 -> (centre (2,), semi-axes (2,), angle of the first axis in radians),
    or None when the points admit no ellipse (collinear, too few)."""
    xy = np.asarray(xy, np.float64)
    if len(xy) < 5:
        return None
    mu = xy.mean(0)
    sc = xy.std(0).max() or 1.0
    x, y = ((xy - mu) / sc).T  # normalised for conditioning
    d1 = np.stack([x * x, x * y, y * y], 1)
    d2 = np.stack([x, y, np.ones_like(x)], 1)
    s1, s2, s3 = d1.T @ d1, d1.T @ d2, d2.T @ d2
    try:
        t = -np.linalg.solve(s3, s2.T)
    except np.linalg.LinAlgError:
        return None
    m = s1 + s2 @ t
    m = np.array([m[2] / 2, -m[1], m[0] / 2])  # C⁻¹ M with the constraint 4ac − b² = 1
    v = np.real(np.linalg.eig(m)[1])  # eigenvectors
    ok = 4 * v[0] * v[2] - v[1] ** 2 > 0
    if not ok.any():
        return None
    a1 = v[:, np.argmax(ok)]
    a, b, c, d, e, f = *a1, *(t @ a1)
    # conic a x² + b xy + c y² + d x + e y + f = 0 -> centre, axes, angle
    den = b * b - 4 * a * c
    cx, cy = (2 * c * d - b * e) / den, (2 * a * e - b * d) / den
    g = a * cx * cx + b * cx * cy + c * cy * cy + d * cx + e * cy + f
    lam, vec = np.linalg.eigh(np.array([[a, b / 2], [b / 2, c]]))
    if g == 0 or np.any(-g / lam <= 0):
        return None
    axes = np.sqrt(-g / lam)
    angle = float(np.arctan2(vec[1, 0], vec[0, 0]))
    return np.array([cx, cy]) * sc + mu, axes * sc, angle


def plot_mds(path, embed, groups, title):
    """Figure 4: one colour per set, real first; a least-squares ellipse per set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    s = np.linspace(0, 2 * np.pi, 200)
    for i, (name, idx) in enumerate(groups.items()):
        colour = "black" if name == "real" else f"C{i}"
        pts = embed[idx]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, color=colour, alpha=0.7, label=f"{name} ({len(pts)})")
        fit = fit_ellipse(pts)
        if fit is not None:
            (cx, cy), (ra, rb), ang = fit
            ex, ey = ra * np.cos(s), rb * np.sin(s)
            ax.plot(cx + ex * np.cos(ang) - ey * np.sin(ang),
                    cy + ex * np.sin(ang) + ey * np.cos(ang), color=colour, lw=1.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    save_figure(fig, path, dpi=110)


# -------------------------------------------------- mask fidelity (our addition, not in the paper)
class SegNet2D(nn.Module):
    """A small 2-D U-Net (3 levels): (B, 1, H, W) slice -> (B, 3, H, W) logits (background,
    organ, tumour). Only a probe of the data, so deliberately plain."""
    def __init__(self, width=16, classes=3):
        super().__init__()
        block = lambda i, o: nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.ReLU(inplace=True),
            nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(4, o), nn.ReLU(inplace=True))
        w = width
        self.enc = nn.ModuleList([block(1, w), block(w, 2 * w), block(2 * w, 4 * w)])
        self.dec = nn.ModuleList([block(6 * w, 2 * w), block(3 * w, w)])
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for dec in self.dec:
            skip = skips.pop()
            x = dec(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.head(x)


def train_segnet(vols, masks, steps, batch, width, device, seed, shift=0.0):
    """Train SegNet2D on the axial slices of (vols (N, D, H, W) [0, 1], masks (N, D, H, W) 0/1/2):
    cross-entropy + soft Dice on the organ, half of each batch drawn from slices that show it. Each
    batch is rolled by a random in-plane shift of up to `shift` × the slice size and flipped
    left-right half of the time, image and mask together (the module docstring says why)."""
    g = torch.Generator(device=device).manual_seed(seed)  # slices drawn on the device: no copy per step
    g_cpu = torch.Generator().manual_seed(seed)            # shifts and flips: Python ints, no device sync
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(vols)).flatten(0, 1)[:, None].to(device)    # (N·D, 1, H, W)
    y = torch.from_numpy(np.stack(masks).astype(np.int64)).flatten(0, 1).to(device)       # (N·D, H, W)
    pos = torch.nonzero(y.flatten(1).amax(1) > 0).flatten()                               # slices with organ
    half = batch // 2 if len(pos) else 0
    net = SegNet2D(width).to(device)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4,
                            fused=torch.device(device).type == "cuda")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=max(steps, 1), pct_start=0.1)
    t0 = time.perf_counter()
    for step in bar(range(1, steps + 1), desc="fidelity probe"):
        idx = torch.randint(0, len(x), (batch,), generator=g, device=device)
        if half:
            idx[:half] = pos[torch.randint(0, len(pos), (half,), generator=g, device=device)]
        xb, yb = x[idx], y[idx]
        if shift > 0:
            dy, dx = (int(torch.randint(-m, m + 1, (), generator=g_cpu))
                      for m in (int(shift * n) for n in x.shape[-2:]))
            flip = bool(torch.rand((), generator=g_cpu) < 0.5)
            xb, yb = xb.roll((dy, dx), (-2, -1)), yb.roll((dy, dx), (-2, -1))
            xb, yb = (xb.flip(-1), yb.flip(-1)) if flip else (xb, yb)
        logits = net(xb)
        fg = logits.softmax(1)[:, 1:].sum(1)  # organ or tumour probability
        ref = (yb > 0).float()
        soft_dice = 1 - (2 * (fg * ref).sum() + 1) / (fg.sum() + ref.sum() + 1)
        loss = F.cross_entropy(logits, yb) + soft_dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 1:
            first_step_line(device, t0, step, steps, steps, what="probe step")
    return net.eval()


@torch.no_grad()
def segment(net, vols, device, batch=64):
    """(N, D, H, W) volumes -> (N, D, H, W) uint8 label maps, slice by slice."""
    out = []
    for v in vols:
        s = torch.from_numpy(np.ascontiguousarray(v))[:, None]
        out.append(torch.cat([net(s[i:i + batch].to(device)).argmax(1).cpu()
                              for i in range(0, len(s), batch)]))
    return torch.stack(out).numpy().astype(np.uint8)


def fidelity(train_vols, train_masks, test_vols, test_masks, args, device):
    """Organ and tumour Dice on the real test volumes of a network trained on (train_vols, train_masks)."""
    net = train_segnet(train_vols, train_masks, args.fidelity_steps, args.fidelity_batch,
                       args.fidelity_width, device, args.seed, args.fidelity_shift)
    pred = segment(net, test_vols, device)
    # 02's Dice: a test mask without organ (or tumour) and a prediction without one score nothing
    organ = [dice(p > 0, m > 0) for p, m in zip(pred, test_masks)]
    organ = [d for d in organ if d is not None]
    tumour = [dice(p == 2, m == 2) for p, m in zip(pred, test_masks) if (m == 2).any()]
    return {"dice_organ": float(np.mean(organ)) if organ else None,
            "dice_tumour": float(np.mean(tumour)) if tumour else None,
            "n_train_volumes": len(train_vols), "n_test_volumes": len(test_vols),
            "n_test_with_tumour": len(tumour)}


# -------------------------------------------------- organ contrast (our addition, not in the paper)
def organ_contrast(vols, masks, shell=2):
    """Does the organ show where the mask says? Per volume: the mean intensity inside the mask's organ
    (labels > 0) minus the mean over the `shell`-voxel layer around it (6-connected dilation). (N,) on
    the volumes' scale; NaN where a mask is missing or empty. Phantoms and CT put the pancreas some
    50-150 HU above the fat and bowel around it; a generator that ignores its mask gives about 0."""
    out = np.full(len(vols), np.nan)
    for i, (v, m) in enumerate(zip(vols, masks)):
        if m is None or not (m > 0).any():
            continue
        organ = m > 0
        ring = ndimage.binary_dilation(
            organ, ndimage.generate_binary_structure(3, 1), iterations=shell) & ~organ
        out[i] = v[organ].mean() - v[ring].mean()
    return out


def contrast_summary(vols, masks, hu):
    """Organ contrast in HU with each volume's own mask, and with the next volume's mask (a control:
    what the position prior alone gives)."""
    scale = hu[1] - hu[0]
    own = organ_contrast(vols, masks) * scale
    shuffled = organ_contrast(vols, masks[1:] + masks[:1]) * scale if len(masks) > 1 else np.full(1, np.nan)
    mean = lambda a: float(np.nanmean(a)) if np.isfinite(a).any() else None
    return {"own_hu": mean(own), "shuffled_hu": mean(shuffled), "n": int(np.isfinite(own).sum())}


# --------------------------------------------------------------------------- table
def fmt(v, digits=4):
    return "–" if v is None else f"{v:.{digits}f}"


def write_table(path, results, note):
    head = ("| Method | N | FID ↓ | MMD ↓ | FID (local) ↓ | MMD (local) ↓ | MS-SSIM "
            "| Dice organ ↑ | Dice tumour ↑ | organ contrast HU (shuffled masks) |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for name, r in results.items():
        fd = r.get("fidelity") or {}
        oc = r.get("contrast") or {}
        con = ("–" if oc.get("own_hu") is None
               else f"{oc['own_hu']:.0f} ({fmt(oc.get('shuffled_hu'), 0)})")
        rows.append(f"| {name} | {r['n']} | {fmt(r.get('fid'))} | {fmt(r.get('mmd'))} | "
                    f"{fmt(r.get('fid_local'))} | {fmt(r.get('mmd_local'))} | "
                    f"{fmt(r.get('ms_ssim'))} | {fmt(fd.get('dice_organ'), 3)} | "
                    f"{fmt(fd.get('dice_tumour'), 3)} | {con} |")
    text = f"{note}\n\n{head}" + "\n".join(rows) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return text


# --------------------------------------------------------------------------- main
def main(args):
    t_start = time.perf_counter()
    seed_everything(args.seed)
    device = pick_device(args.device)
    split = read_split(args.real)
    check_masks_current(args.real)  # the real masks (box, contrast, fidelity) belong to these volumes
    hu = json.loads((args.real / "config.json").read_text())["hu"]
    for name, folder in args.fake.items():
        if not folder.is_dir():
            raise SystemExit(f"error: --fake {name}={folder}: no such folder (run 05_sample.py first)")
    prepare_out(args.out, [args.real, *args.fake.values()])
    real_names = {"all": split["train"] + split["test"], "train": split["train"],
                  "test": split["test"]}[args.real_split]
    real_pairs_ = real_pairs(args.real, real_names)
    names, real, real_masks = load_set(real_pairs_, hu)
    if len(real) < 2:
        raise SystemExit(f"error: {args.real}: fewer than 2 readable real volumes in split "
                         f"'{args.real_split}'")
    shape = real.shape[1:]
    train_masks = [xyz_to_dhw(read_nifti(m, None)[0])
                   for _, m in real_pairs(args.real, split["train"]) if m.exists()]
    box = organ_box(train_masks)
    print(f"real: {len(real)} volumes {tuple(shape)} ({args.real_split}); synthetic sets: "
          f"{', '.join(args.fake)}; organ box {box} (over {len(train_masks)} training masks)")

    model, note = load_medicalnet(args.med3d_depth, args.med3d_weights, device)
    random_features = args.med3d_weights is None
    print(f"features: {note}")
    if shape[1] * shape[2] >= 128 * 128 and args.med3d_depth >= 50:
        sizing_note(device, f"ResNet-{args.med3d_depth} on {'×'.join(map(str, shape))} volumes, "
                    f"{args.fidelity_steps} probe steps",
                    "--med3d-depth 10 --fidelity-steps 300 --fidelity-width 8 on 64×64×16 volumes")
    wpath = Path(str(args.med3d_weights))
    wid = f"{wpath.resolve()}|{wpath.stat().st_size}" if wpath.is_file() else str(args.med3d_weights)
    wkey = hashlib.sha1(f"{args.med3d_depth}|{wid}".encode()).hexdigest()[:8]  # cache key: network + weights
    seconds = {"features": 0.0, "metrics": 0.0, "fidelity": 0.0}

    # --- the real test split and the real training set of the fidelity probe (our addition)
    loaded = dict(zip(names, zip(real, real_masks)))  # the real volumes read above are not read again

    def real_split_set(wanted):
        new = [n for n in wanted if n not in loaded]
        if new:
            got_names, v, m = load_set(real_pairs(args.real, new), hu)
            loaded.update(zip(got_names, zip(v, m)))
        return [loaded[n][0] for n in wanted if n in loaded], [loaded[n][1] for n in wanted if n in loaded]

    usable = lambda v, m: ([x for x, y in zip(v, m) if y is not None], [y for y in m if y is not None])
    test_vols, test_masks = usable(*real_split_set(split["test"])) if args.fidelity_steps > 0 else ([], [])
    if args.fidelity_steps > 0 and not test_masks:
        print(f"mask fidelity skipped: no masks for the real test split in {args.real / 'masks'}")

    # --- one set at a time: features (holistic, localised), MS-SSIM, organ contrast, fidelity
    def set_features(vols):  # (N, D, H, W) in [0, 1] -> MedicalNet features (N, F)
        x = torch.from_numpy(np.ascontiguousarray(vols))[:, None] * 2 - 1  # (N, 1, D, H, W) in [-1, 1]
        return features(model, x, args.batch_size)

    feats, feats_local, results = {}, {}, {}
    for name in ["real", *args.fake]:
        print(f"[{name}] features, MS-SSIM, organ contrast" + (", mask fidelity" if test_masks else ""))
        t0 = time.perf_counter()
        if name == "real":
            pairs, vols, masks = real_pairs_, real, real_masks
        else:
            pairs = fake_pairs(args.fake[name])
            _, vols, masks = load_set(pairs, hu, shape)
            if len(vols) < 2:  # FID needs a covariance: two volumes at the very least
                raise SystemExit(f"error: --fake {name}={args.fake[name]}: {len(vols)} readable volume(s) of "
                                 f"shape {tuple(shape)}; a set needs at least 2 (the paper's hold as many as "
                                 f"the real set)")
        key = f"{file_key(pairs)}_{wkey}"
        feats[name] = cached_features(args.out / "cache", name, key, set_features, vols)
        if box is not None:
            bkey = hashlib.sha1(str(box).encode()).hexdigest()[:6]
            feats_local[name] = cached_features(args.out / "cache", f"{name}_local", f"{key}_{bkey}",
                                                set_features, crop(vols, box))
        seconds["features"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        r = {"n": len(vols), "folder": str(args.real if name == "real" else args.fake[name])}
        if name != "real":
            r["composition"] = set_composition(args.fake[name])
            r["fid"] = fid(feats["real"], feats[name])
            r["mmd"] = mmd(feats["real"], feats[name])
            if box is not None:
                r["fid_local"] = fid(feats_local["real"], feats_local[name])
                r["mmd_local"] = mmd(feats_local["real"], feats_local[name])
        # the same pairs for a set whatever else is evaluated with it: one set gives one figure in every table
        r["ms_ssim"] = diversity(vols, args.pairs, np.random.default_rng(args.seed))
        if any(m is not None for m in masks):
            r["contrast"] = contrast_summary(vols, masks, hu)
            print(f"organ contrast, {name}: {fmt(r['contrast']['own_hu'], 1)} HU inside its masks "
                  f"vs the shell around "
                  f"(another volume's mask: {fmt(r['contrast']['shuffled_hu'], 1)} HU)")
        seconds["metrics"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        if test_masks:  # mask fidelity: train on this set, test on the real test split
            train_vols, train_masks_ = (usable(*real_split_set(split["train"])) if name == "real"
                                        else usable(vols, masks))
            if not train_masks_:
                print(f"mask fidelity for {name}: no condition masks (<id>_mask.nii.gz) "
                      f"beside the volumes, skipped")
            else:
                r["fidelity"] = fidelity(np.stack(train_vols), train_masks_, np.stack(test_vols),
                                         test_masks, args, device)
                fd = r["fidelity"]
                print(f"mask fidelity, trained on {name} ({len(train_vols)} volumes): "
                      f"organ Dice {fmt(fd['dice_organ'], 3)}"
                      + (f", tumour Dice {fd['dice_tumour']:.3f}" if fd["dice_tumour"] is not None else ""))
        seconds["fidelity"] += time.perf_counter() - t0
        results[name] = r
        del vols, masks  # a synthetic set leaves memory before the next is read

    # --- outputs
    ends = np.cumsum([len(f) for f in feats.values()])  # each set's rows in the stacked features
    groups = {name: np.arange(end - len(f), end) for (name, f), end in zip(feats.items(), ends)}
    embed = classical_mds(np.concatenate(list(feats.values())))
    title = (f"MDS of MedicalNet ResNet-{args.med3d_depth} features"
             + (f"\n({RANDOM_NOTE})" if random_features else ""))
    plot_mds(args.out / "mds.png", embed, groups, title)
    meta = {"features": {"network": f"MedicalNet ResNet-{args.med3d_depth}",
                         "weights": "random" if random_features else str(args.med3d_weights), "note": note},
            "real_split": args.real_split, "organ_box": box,
            "organ_box_from": f"{len(train_masks)} masks of the training split", "pairs": args.pairs,
            "fidelity": {"steps": args.fidelity_steps, "batch": args.fidelity_batch,
                         "width": args.fidelity_width, "test": "real test split"},
            "seconds": seconds}
    save_json({"settings": meta, "results": results}, args.out / "metrics.json")
    print(write_table(args.out / "table.md", results, f"Features: {note}."))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'table.md'}, {args.out / 'mds.png'} in "
          f"{time.perf_counter() - t_start:.0f} s (features {seconds['features']:.0f} s, metrics "
          f"{seconds['metrics']:.0f} s, fidelity {seconds['fidelity']:.0f} s)")
    return results


if __name__ == "__main__":
    run_stage(main, get_args)
