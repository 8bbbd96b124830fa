"""07 · Synthetic volumes for self-supervised organ segmentation: SSL-ALPNet (paper §4.3, Fig. 6).

Reads  --prep (default data/prep): images/ ([0, 1]), labels/ (1 liver, 2 kidney, 3 spleen, 4 pancreas,
       5 tumour), split.json, config.json (01's HU window); each --synthetic NAME=DIR (default
       lad=runs/samples): 05's <id>.nii.gz (int16 HU; the <id>_mask.nii.gz condition masks are not used).
Writes --out (default runs/ssl):
    results.json      every run (training set × seed): Dice per organ and query volume, timings; the
                      mean ± std over seeds per set; finished runs are not redone unless --overwrite
    table.md          Fig. 6 as a table: Dice per organ and the mean, mean ± std over the runs
    dice.png          Fig. 6: bars per organ, one per training set, error bars = std over the runs
    settings.json     the settings the folder was made with (a rerun with others needs --overwrite)
    superpixels/<source>/<name>.npz   pseudo-labels per volume, void when the volume file changes
    checkpoints/<set>_seed<k>.pt      the network of each run (resumed from, if a run was interrupted)
    logs/<set>_seed<k>.csv            training loss, ms/iter and memory per log interval
  where <set> is real, synthetic-NAME or mixed-NAME.

The method is SSL-ALPNet (Ouyang et al., ECCV 2020; public code cheng-01037/Self-supervised-Fewshot-
Medical-Image-Segmentation, "the reference" below), trained without any label (docs/reference.md §7):
  pseudo-labels  Felzenszwalb superpixels of each axial slice inside the body (data/pseudolabel_gen.ipynb);
  episodes       one slice and one of its superpixels; support and query are two independent random
                 augmentations of it (affine, elastic, gamma; dataloaders/GenericSuperDatasetv2.py);
  network        ResNet-101 with output stride 8 and a 1×1 conv to 256 channels (models/backbone/), then
                 adaptive local prototype pooling: the query is compared (cosine × 20) with local prototypes
                 (average-pooled support features in windows that lie inside the class) and, for the
                 foreground, the masked average too (models/alpmodule.py);
  loss           weighted cross-entropy [0.05, 1.0] on the query + the prototype alignment loss (the
                 query with its prediction as support must segment the support; models/grid_proto_fewshot.py);
  test           1-shot: a labelled real support volume is cut into 3 chunks along z, its middle slice of
                 each chunk segments the matching chunk of every query volume (validation.py); Dice per
                 volume over the slices that hold the organ, then the mean over volumes.
The training sets follow §4.3 (--train): real (the training split), synthetic (§4.3.1: each --synthetic
set alone) and mixed (§4.3.2: the real set plus synthetic volumes of about 20% of its size); --runs 5
seeds each.

    python 07_ssl_seg.py   # real, synthetic-lad, mixed-lad; 5 runs each
    python 07_ssl_seg.py --synthetic lad=runs/samples --synthetic v0=runs/samples_v0   # Fig. 6: Lad vs V0
    python 07_ssl_seg.py --backbone-weights resnet101-63fe2227.pth # a torchvision ResNet-101 to start from
    torchrun --nproc_per_node 4 07_ssl_seg.py   # the runs shared out over 4 GPUs, each trained whole by one
    python 07_ssl_seg.py --prep data/demo/prep --synthetic lad=runs/demo/samples --out runs/demo/ssl \\
        --backbone resnet18 --iters 500 --lr 1e-2 --lr-step 100 --runs 1 --sp-min-size 100 \\
        --pool-train 1 --pool-test 1 --shift 1.25 --elastic-alpha 2.5 --elastic-sigma 1.25 --workers 2
The CPU demo's 64² slices give 8² feature maps (stride 8), so its windows are 1 feature pixel and its
superpixels ~1.5 feature pixels (paper: 256², windows 4 and 2, superpixels ~6 feature pixels).
"""
import json
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from common import (ArgumentParser, at_least, atomic_path, bar, check_order, csv_logger, eta,
                    first_step_line, guard_settings, in_range, load_checkpoint, load_stage, named_dir,
                    peak_memory_gb, positive, prepare_out, print0, read_nifti, read_split, run_stage,
                    save_checkpoint, save_figure, save_json, seed_everything, sizing_note, start_run,
                    xyz_to_dhw)

# from earlier stages: 02's Dice, 03's Gaussian smoothing; 06's volume_to_unit (05's HU -> [0, 1]),
# fake_pairs and ResNet blocks
dice = load_stage("02_masks").dice   # one Dice: None for two empty masks
vqgan = load_stage("03_vqgan")      # gaussian_smooth
evaluation = load_stage("06_eval")

DEEPLAB_URL = "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth"
RANDOM_NOTE = ("backbone randomly initialised (the reference starts from COCO weights): "
               "not comparable to the paper")


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    p.add_argument("--prep", type=Path, default=Path("data/prep"),
                   help="01's output: images/, labels/, split.json")
    p.add_argument("--synthetic", action="append", type=named_dir, metavar="NAME=DIR", default=None,
                   help="05's output, repeatable (Fig. 6: lad and v0); default: lad=runs/samples")
    p.add_argument("--out", type=Path, default=Path("runs/ssl"),
                   help="results, table, figure, caches, checkpoints")
    p.add_argument("--train", nargs="+", choices=["real", "synthetic", "mixed"],
                   default=["real", "synthetic", "mixed"],
                   help="training sets (§4.3): the real training split; each synthetic set alone (§4.3.1); "
                        "the real set plus synthetic volumes (§4.3.2)")
    p.add_argument("--mix-fraction", type=at_least(0.0, float), default=0.2,
                   help="synthetic volumes in 'mixed' per real volume (§4.3.2: about 20%%)")
    p.add_argument("--runs", type=at_least(1), default=5,
                   help="runs per training set, seeds 0..runs-1 (§4.3: 5 runs)")
    p.add_argument("--organs", nargs="+", default=["liver=1", "kidney=2", "spleen=3", "pancreas=4,5"],
                   help="NAME=IDS test classes (Fig. 6); pancreas includes its tumour (01's label 5)")
    p.add_argument("--support-case", default=None,
                   help="the labelled 1-shot support volume; the other test cases are the queries "
                        "(default: the first test case; reference: a held-out scan, validation.py)")
    m = p.add_argument_group("network (models/backbone/torchvision_backbones.py)")
    m.add_argument("--backbone", choices=sorted(RESNETS), default="resnet101",
                   help="ResNet, output stride 8 (reference: deeplabv3_resnet101); CPU: resnet18")
    m.add_argument("--backbone-weights", default=None,
                   help="torchvision ResNet or DeepLabV3 state dict (heads dropped, rest strict); "
                        "'auto': get the reference's COCO DeepLabV3-ResNet-101; none: random init")
    m.add_argument("--channels", type=at_least(1), default=256,
                   help="feature channels after the 1×1 conv (reference: 256)")
    s = p.add_argument_group("superpixel pseudo-labels (data/pseudolabel_gen.ipynb)")
    s.add_argument("--window", type=float, nargs=2, default=(-125.0, 275.0),
                   help="input and superpixel HU window (data/SABS/intensity_normalization.ipynb)")
    s.add_argument("--sp-min-size", type=at_least(1), default=400,
                   help="Felzenszwalb min_size, pixels (reference 400 at 256²)")
    s.add_argument("--sp-sigma", type=at_least(0.0, float), default=1.0,
                   help="Felzenszwalb Gaussian pre-smoothing σ (reference 1)")
    s.add_argument("--sp-scale", type=positive, default=1.0,
                   help="Felzenszwalb scale (reference: the default, 1)")
    s.add_argument("--workers", type=at_least(1), default=1, help="processes computing superpixels")
    a = p.add_argument_group("episode augmentation (dataloaders/augutils.py sabs_aug), "
                             "pixels at the data's size")
    a.add_argument("--rotate", type=at_least(0.0, float), default=5.0, help="max rotation, degrees")
    a.add_argument("--shift", type=at_least(0.0, float), default=5.0,
                   help="max shift, pixels (reference at 256²: 5)")
    a.add_argument("--shear", type=at_least(0.0, float), default=5.0, help="max shear, degrees")
    a.add_argument("--scale", type=positive, nargs=2, default=(0.9, 1.2), help="isotropic scaling range")
    a.add_argument("--elastic-alpha", type=at_least(0.0, float), default=10.0,
                   help="elastic displacement scale, pixels (0 = off)")
    a.add_argument("--elastic-sigma", type=positive, default=5.0, help="elastic smoothing σ, pixels")
    a.add_argument("--gamma", type=positive, nargs=2, default=(0.5, 1.5), help="image gamma range")
    q = p.add_argument_group("prototypes and loss (models/alpmodule.py, util/utils.py)")
    q.add_argument("--pool-train", type=at_least(1), default=4,
                   help="local pooling window L in training, feature pixels "
                        "(reference: 32 / proto_grid_size 8 = 4)")
    q.add_argument("--pool-test", type=at_least(1), default=2,
                   help="local pooling window at test (reference val_wsize 2)")
    q.add_argument("--proto-thresh", type=in_range(0, 1), default=0.95,
                   help="a window is a prototype if this much is in the class")
    q.add_argument("--ce-weights", type=at_least(0.0, float), nargs=2, default=(0.05, 1.0),
                   help="cross-entropy weights bg, fg")
    t = p.add_argument_group("training (config_ssl_upload.py)")
    t.add_argument("--iters", type=at_least(0), default=100100,
                   help="iterations of one episode each (reference n_steps)")
    t.add_argument("--lr", type=positive, default=1e-3, help="SGD learning rate")
    t.add_argument("--momentum", type=in_range(0, 1), default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=at_least(0.0, float), default=5e-4, help="SGD weight decay")
    t.add_argument("--lr-step", type=at_least(1), default=1000,
                   help="decay the lr every this many iterations ...")
    t.add_argument("--lr-gamma", type=in_range(0, 1), default=0.95, help="... by this factor")
    t.add_argument("--log-every", type=at_least(1), default=100,
                   help="log interval (reference print_interval)")
    t.add_argument("--save-every", type=at_least(1), default=25000,
                   help="checkpoint interval (reference snapshot interval)")
    e = p.add_argument_group("test (validation.py)")
    e.add_argument("--chunks", type=at_least(1), default=3,
                   help="support chunks along z (reference n_sup_part 3)")
    e.add_argument("--eval-batch", type=at_least(1), default=32, help="query slices per forward pass")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast (auto: bf16 on CUDA, fp32 on the CPU); prototypes always fp32")
    p.add_argument("--device", default="auto", help="auto: the first GPU if there is one, else the CPU")
    p.add_argument("--overwrite", action="store_true", help="redo finished runs and accept changed settings")
    args = p.parse_args(argv)
    for flag in ("--window", "--scale", "--gamma"):
        check_order(p, args, flag, strict=flag == "--window")
    args.synthetic = dict(args.synthetic or [named_dir("lad=runs/samples")])
    try:
        args.organs = {o.split("=", 1)[0]: [int(i) for i in o.split("=", 1)[1].split(",")]
                       for o in args.organs}
    except (IndexError, ValueError):
        p.error("argument --organs: must be NAME=ID[,ID]")
    # the training sets, in Fig. 6's order: real, each synthetic set alone, each mixed with the real set
    args.sets = (["real"] if "real" in args.train else []) + \
        [f"{kind}-{n}" for kind in ("synthetic", "mixed") if kind in args.train for n in args.synthetic]
    args.seeds = list(range(args.runs))
    if args.chunks < 1 or args.chunks % 2 == 0:
        p.error("--chunks must be odd (the reference asserts npart % 2 == 1)")
    return args


# ---------------------------------------------------------------- backbone: ResNet, output stride 8
# torchvision's layout and key names (conv1, bn1, layer1..4, downsample.0/1), so its ImageNet ResNets
# and the DeepLabV3 backbone the reference uses load strictly. Layers 3 and 4 trade their stride for
# dilation (replace_stride_with_dilation=[False, True, True], as torchvision's deeplabv3_resnet101): a
# 256² slice gives 32² features. The residual blocks are 06's MedicalNet blocks in 2-D (dims=2):
# torchvision's layers and key names; torchvision refuses dilation in BasicBlock, these allow it, so
# resnet18/34 give output stride 8 too (CPU runs).
RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


class ResNet(nn.Module):
    """(B, 3, H, W) -> (B, 512·expansion, H/8, W/8). No fc head (ALPNet uses the feature map)."""
    def __init__(self, name="resnet101"):
        super().__init__()
        kind, blocks = RESNETS[name]
        block = evaluation.BasicBlock if kind == "basic" else evaluation.Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        e = block.expansion
        self.layer1 = evaluation.resnet_layer(block, 64, 64, blocks[0], dims=2)
        self.layer2 = evaluation.resnet_layer(block, 64 * e, 128, blocks[1], stride=2, dims=2)
        # stride traded for dilation: the first block keeps the previous layer's dilation
        self.layer3 = evaluation.resnet_layer(block, 128 * e, 256, blocks[2],
                                              dilation=2, first_dilation=1, dims=2)
        self.layer4 = evaluation.resnet_layer(block, 256 * e, 512, blocks[3],
                                              dilation=4, first_dilation=2, dims=2)
        self.out_channels = 512 * e
        for mod in self.modules():  # torchvision's initialisation
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SliceEncoder(nn.Module):
    """A CT slice (B, 1, H, W), z-scored, -> features (B, channels, H/8, W/8): the backbone, then a 1×1 conv
    without bias (the reference's `localconv`). The slice is repeated to 3 channels, as the reference does
    (tile_z_dim = 3): conv1 keeps torchvision's (64, 3, 7, 7) shape, so pretrained weights load unchanged;
    it costs one 3-channel input layer, nothing else."""
    def __init__(self, backbone="resnet101", channels=256):
        super().__init__()
        self.backbone = ResNet(backbone)
        self.localconv = nn.Conv2d(self.backbone.out_channels, channels, 1, bias=False)

    def forward(self, x):
        return self.localconv(self.backbone(x.expand(-1, 3, -1, -1)))


def load_backbone_weights(backbone, path):
    """Load a torchvision-layout state dict into `backbone`: a ResNet's (its `fc.*` head dropped) or a
    DeepLabV3's (`backbone.*` kept, `classifier.*` / `aux_classifier.*` dropped). Everything else must match
    exactly (names and shapes), else ValueError; BN's num_batches_tracked may be absent (older files)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # DeepLabV3: the backbone's keys carry a prefix
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()
              if not k.startswith(("classifier.", "aux_classifier."))}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(k for k in own.keys() - sd.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(sd.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit this {type(backbone).__name__}: "
                         f"{len(missing)} missing {missing[:4]}, "
                         f"{len(unexpected)} unexpected {unexpected[:4]}, "
                         f"{len(wrong)} of other shape {wrong[:4]}")
    backbone.load_state_dict(sd, strict=False)  # strict up to num_batches_tracked, checked above


def resolve_weights(arg):
    """--backbone-weights: None, a path, or 'auto' (DEEPLAB_URL, downloaded once into torch.hub's cache)."""
    if arg is None or arg != "auto":
        return None if arg is None else Path(arg)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(DEEPLAB_URL).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(DEEPLAB_URL, str(path))
        except Exception as e:  # no network, proxy: say what to do instead
            raise SystemExit(f"error: cannot download {DEEPLAB_URL} ({type(e).__name__}: {e}); "
                             "fetch it elsewhere and pass --backbone-weights PATH") from e
    return path


# ---------------------------------------------------------- ALPNet: adaptive local prototype pooling
def safe_norm(x, dim=1, eps=1e-4):
    """x / max(‖x‖, eps) along `dim` (models/alpmodule.py safe_norm)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def alp_score(qry, sup, mask, window, thresh=0.95, with_global=False, gate_window=None):
    """Score (Q, 1, h, w) of each query pixel for one class (models/alpmodule.py, MultiProtoAsConv):
    qry (Q, C, h, w), sup (S, C, h, w) features; mask (S, 1, h, w) the class in the support, in
    [0, 1], at feature resolution. Local prototypes: support features average-pooled over
    window × window cells whose pooled mask exceeds `thresh`. with_global adds each shot's masked
    average (the reference's 'gridconv+', foreground; without: 'gridconv', background). gate_window:
    the local prototypes count only if some gate_window² cell is ≥ thresh inside the class, else the
    global one alone ('mask' mode; the reference tests avg_pool(mask, 4)). Returns
    Σ_k softmax_k(s) s_k, s_k = 20 · cos(query, prototype k) over the valid prototypes; 0 if none.
    Invalid prototypes are masked, not dropped: shapes never depend on the data (no host sync)."""
    c = sup.shape[1]
    protos = F.avg_pool2d(sup, window).flatten(2).transpose(1, 2).reshape(-1, c)   # (S·cells, C)
    valid = F.avg_pool2d(mask, window).flatten() > thresh                          # (S·cells,)
    if gate_window is not None:
        valid = valid & (F.avg_pool2d(mask, gate_window).amax() >= thresh)
    if with_global:
        glob = (sup * mask).sum((2, 3)) / (mask.sum((2, 3)) + 1e-5)  # (S, C) masked average pooling
        protos, valid = torch.cat([protos, glob]), torch.cat([valid, valid.new_ones(len(glob))])
    sim = 20 * torch.einsum("qchw,pc->qphw", safe_norm(qry), safe_norm(protos))     # (Q, P, h, w)
    keep = valid[None, :, None, None]
    weight = torch.softmax(sim.masked_fill(~keep, -1e4), 1) * keep
    return (weight * sim).sum(1, keepdim=True)


def alp_logits(qry, sup, fg, window, thresh, gate_window):
    """Background and foreground scores (Q, 2, h, w) of the query, from support features and the support's
    foreground mask fg (S, 1, h, w); the background is 1 − fg (the reference's label != class)."""
    return torch.cat([alp_score(qry, sup, 1 - fg, window, thresh),
                      alp_score(qry, sup, fg, window, thresh, with_global=True, gate_window=gate_window)], 1)


def episode_loss(feats, sup_fg, qry_fg, args, ce_weight):
    """One episode's losses. feats (2, C, h, w) = support, query; sup_fg, qry_fg (1, 1, H, W) 0/1
    pseudo-labels. Query loss: weighted CE of the upsampled scores. Alignment (PANet): the query's own
    prediction (argmax at feature resolution) as the support must segment the support image (plain CE;
    models/grid_proto_fewshot.py)."""
    size, fsize = sup_fg.shape[-2:], feats.shape[-2:]
    fs, fq = feats[:1], feats[1:]
    scores = alp_logits(fq, fs, F.interpolate(sup_fg, fsize, mode="bilinear"),
                        args.pool_train, args.proto_thresh, args.pool_train)
    loss_q = F.cross_entropy(F.interpolate(scores, size, mode="bilinear"), qry_fg[:, 0].long(),
                             weight=ce_weight)
    pred = scores.argmax(1, keepdim=True).float()                                    # (1, 1, h, w)
    back = alp_logits(fs, fq, pred, args.pool_train, args.proto_thresh, args.pool_train)
    loss_a = F.cross_entropy(F.interpolate(back, size, mode="bilinear"), sup_fg[:, 0].long())
    return loss_q, loss_a


# --------------------------------------------------------------------------- superpixel pseudo-labels
def to_window(vol, hu, window):
    """[0, 1] volume (01's HU window `hu`) -> the abdominal window `window`, mapped to [0, 1]."""
    x = vol * (hu[1] - hu[0]) + hu[0]
    return ((np.clip(x, *window) - window[0]) / (window[1] - window[0])).astype(np.float32)


def body_mask(slice255, thresh=1e-4):
    """Body: above `thresh`, largest component, holes filled (pseudolabel_gen.ipynb fg_mask2d)."""
    fg = slice255 > thresh
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    return ndimage.binary_fill_holes(lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def superpixels(win, min_size=400, sigma=1.0, scale=1.0):
    """(D, H, W) windowed [0, 1] volume -> (D, H, W) int16: Felzenszwalb superpixels of each slice, numbered
    1..n inside the body, 0 outside. As the reference, on the window scaled to 0..255 (the scale parameter
    acts on absolute intensity differences). All segments inside the body are kept; the reference's
    superpix_masking drops Felzenszwalb's segment 0 by an indexing slip, which we do not copy."""
    from skimage.segmentation import felzenszwalb
    out = np.zeros(win.shape, np.int16)
    for z, sl in enumerate(win * 255.0):
        seg = felzenszwalb(sl, scale=scale, sigma=sigma, min_size=min_size)
        body = body_mask(sl)
        _, ids = np.unique(seg[body], return_inverse=True)
        out[z][body] = ids + 1
    return out


def cache_key(path, args, hu):
    st = Path(path).stat()
    return (f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|hu{list(hu)}|window{list(args.window)}|"
            f"min_size{args.sp_min_size}|sigma{args.sp_sigma}|scale{args.sp_scale}")


def load_volume(job):
    """(path, cache path, key, hu, window, sp args) -> (windowed volume (D, H, W), superpixels), computing the
    superpixels or reading them from the cache. A process-pool worker: everything comes in `job`."""
    path, cache, key, hu, window, sp = job
    arr = np.asarray(read_nifti(path, None)[0])
    if arr.ndim != 3:
        raise ValueError(f"{path}: {arr.ndim}-D volume, expected 3-D")
    vol = to_window(xyz_to_dhw(evaluation.volume_to_unit(arr, hu, path)), hu, window)
    if cache.exists():
        try:
            with np.load(cache) as f:
                if str(f["key"]) == key and f["superpixels"].shape == vol.shape:
                    return vol, f["superpixels"], True
        except (OSError, ValueError, KeyError, EOFError) as e:
            print(f"superpixel cache {cache} unreadable ({type(e).__name__}), recomputing")
    sp_vol = superpixels(vol, *sp)
    with atomic_path(cache) as tmp:
        np.savez_compressed(tmp, superpixels=sp_vol, key=np.array(key))
    return vol, sp_vol, False


def load_sources(jobs, workers):
    """{(source, name): job} -> {(source, name): (vol, superpixels)}; skips unreadable volumes."""
    out, cached, bad = {}, 0, 0
    keys = list(jobs)
    if workers <= 1:
        results = [safe_load(jobs[k]) for k in bar(keys, desc="superpixels")]
    else:
        with ProcessPoolExecutor(workers) as pool:
            loads = pool.map(safe_load, [jobs[k] for k in keys])
            results = list(bar(loads, total=len(keys), desc="superpixels"))
    for k, r in zip(keys, results):
        if isinstance(r, str):
            print0(f"skipped: {r}")
            bad += 1
            continue
        out[k] = r[:2]
        cached += r[2]
    print0(f"superpixels: {len(out)} volumes ({cached} from the cache, {len(out) - cached} computed), "
           f"{bad} skipped")
    return out


def safe_load(job):
    try:
        return load_volume(job)
    except ValueError as e:
        return str(e)


def load_labelled(prep, case, hu, window):
    """A real case with its label map -> (case, windowed volume (D, H, W), labels (D, H, W) int64)."""
    img_path, lab_path = prep / "images" / f"{case}.nii.gz", prep / "labels" / f"{case}.nii.gz"
    img, lab = np.asarray(read_nifti(img_path, None)[0]), np.asarray(read_nifti(lab_path, None)[0])
    if img.ndim != 3 or lab.shape != img.shape:
        raise ValueError(f"{case}: image {img.shape} and labels {lab.shape} are not one 3-D shape")
    vol = to_window(xyz_to_dhw(evaluation.volume_to_unit(img, hu, img_path)), hu, window)
    return case, vol, xyz_to_dhw(lab).astype(np.int64)


# ------------------------------------------------ episodes: sampling and augmentation, on the device
def inv2x2(a):
    """Inverse of (N, 2, 2) matrices in closed form (torch.linalg.inv checks for errors with a host sync)."""
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    return torch.stack([torch.stack([a[:, 1, 1], -a[:, 0, 1]], -1),
                        torch.stack([-a[:, 1, 0], a[:, 0, 0]], -1)], 1) / det[:, None, None]


def sampling_grid(h, w, a_inv, t, disp):
    """grid_sample grid (N, H, W, 2) of the warp out(p) = in(c + A⁻¹ (p + d(p) − c − t)): an affine
    map about the centre c (linear part A, shift t, in (x, y) pixels), then the elastic displacement
    d (N, 2, H, W), in one resampling. align_corners=False: pixel i sits at (2i + 1)/size − 1."""
    ys, xs = torch.meshgrid(torch.arange(h, device=t.device), torch.arange(w, device=t.device), indexing="ij")
    cx, cy = (w - 1) / 2, (h - 1) / 2                     # Python numbers: no host-to-device copy per step
    qx = xs + disp[:, 0] - cx - t[:, 0, None, None]       # (N, H, W)
    qy = ys + disp[:, 1] - cy - t[:, 1, None, None]
    a = a_inv[:, :, :, None, None]
    sx, sy = a[:, 0, 0] * qx + a[:, 0, 1] * qy + cx, a[:, 1, 0] * qx + a[:, 1, 1] * qy + cy
    return torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], -1)


def augment(x, m, gen, args):
    """Independent random augmentations of N slices: x (N, 1, H, W) z-scored images, m (N, 1, H, W)
    0/1 masks -> the same, warped. As sabs_aug: rotation, shift, shear, isotropic scaling, elastic
    field (α × Gaussian-smoothed uniform noise), then gamma on the image. Bilinear resampling, zero
    padding (the dataset mean, as cv2's constant border on the normalised image); masks then > 0.5.
    We rotate, shear and scale about the centre; the reference shears about the corner."""
    n, _, h, w = x.shape
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen, device=x.device)
    th = torch.deg2rad(u(-args.rotate, args.rotate))
    ph = torch.deg2rad(u(-args.shear, args.shear))
    s = u(*args.scale)
    t = torch.stack([u(-args.shift, args.shift), u(-args.shift, args.shift)], 1)
    rot = torch.stack([torch.stack([th.cos(), -th.sin()], -1), torch.stack([th.sin(), th.cos()], -1)], 1)
    shear = torch.stack([torch.stack([torch.ones_like(ph), -ph.sin()], -1),
                         torch.stack([torch.zeros_like(ph), ph.cos()], -1)], 1)
    a = s[:, None, None] * shear @ rot  # the reference composes zoom · shear · (shift) · rotation
    disp = torch.zeros(n, 2, h, w, device=x.device)
    if args.elastic_alpha > 0 and args.elastic_sigma > 0:
        noise = torch.rand(n, 2, h, w, generator=gen, device=x.device) * 2 - 1
        # cv2.GaussianBlur as the reference's elastic_transform_nd calls it (dataloaders/
        # image_transforms.py): kernel width int(4σ)|1, reflected borders (BORDER_REFLECT_101)
        radius = (int(4 * args.elastic_sigma) | 1) // 2
        kernel = vqgan.gaussian_kernel(args.elastic_sigma, radius, noise)
        disp = args.elastic_alpha * vqgan.gaussian_smooth(noise, kernel, pad="reflect")  # (N, 2, H, W)
    grid = sampling_grid(h, w, inv2x2(a), t, disp)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = (F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    g = u(*args.gamma)[:, None, None, None]               # augutils.py gamma_tansform
    lo = x.amin((1, 2, 3), keepdim=True)
    rng = x.amax((1, 2, 3), keepdim=True) - lo + 1e-5
    return rng * ((x - lo + 1e-5) / rng) ** g + lo, m


def sample_episode(data, gen, args, tries=4):
    """A random slice and one of its superpixels, augmented twice -> support image, mask, query
    image, mask, each (1, 1, H, W). data: imgs (N, H, W), sps (N, H, W) ids 1..n_i, nsp (N,) float
    n_i ≥ 1. A superpixel at the edge of the field of view can leave it when the augmentation zooms
    in; the reference skips such foreground-less "faulty batches" (training.py, try/except). Here
    `tries` candidates are drawn and augmented at once and the first whose support and query both
    keep some foreground is returned (on phantoms ~0.3% of single draws fail). Indices stay on the
    device (index_select, argmax): nothing waits for the GPU."""
    imgs, sps, nsp = data
    dev = imgs.device
    i = (torch.rand(tries, generator=gen, device=dev) * len(imgs)).long().clamp_max(len(imgs) - 1)
    # uniform over 1..n_i
    k = (torch.rand(tries, generator=gen, device=dev) * nsp.index_select(0, i)).long() + 1
    fg = (sps.index_select(0, i).long() == k[:, None, None]).float()    # (T, H, W)
    x, m = augment(imgs.index_select(0, i)[:, None].repeat_interleave(2, 0),
                   fg[:, None].repeat_interleave(2, 0), gen, args)      # (2T, 1, H, W): support, query
    ok = m.flatten(1).amax(1).view(tries, 2).amin(1)                    # (T,) 1 if both keep some
    j = torch.argmax(ok)                                                # the first such candidate
    pick = torch.stack([2 * j, 2 * j + 1])
    x, m = x.index_select(0, pick), m.index_select(0, pick)
    return x[:1], m[:1], x[1:], m[1:]


# --------------------------------------------------------------------------- 1-shot test (validation.py)
def chunk_percentiles(n):
    """Where the support slices sit in the support's organ extent: the middle of each of n chunks
    (ManualAnnoDatasetv2.get_support): [1/6, 1/2, 5/6] for n = 3."""
    return [0.5] if n == 1 else [1 / (2 * n) + (1 - 1 / n) / (n - 1) * i for i in range(n)]


def query_chunk(z, z_min, z_max, n):
    """The support chunk of query slice z, from the query's organ extent [z_min, z_max] (ValidationDataset,
    with its float floor division; a one-slice extent goes to chunk 0)."""
    return 0 if z_max == z_min else int(min(max((z - z_min) // ((z_max - z_min) / n), 0), n - 1))


@torch.no_grad()
def slice_features(model, vol, batch, prec):
    """(D, H, W) z-scored tensor -> (D, C, h, w) float32 features, in batches of slices."""
    out = []
    for i in range(0, len(vol), batch):
        with prec.autocast():
            out.append(model(vol[i:i + batch, None]).float())
    return torch.cat(out)


@torch.no_grad()
def one_shot_dice(model, support, queries, organs, args, prec):
    """1-shot Dice {organ: {query: Dice}}, without organs absent from the support or a query.
    support, each query: (name, z-scored image (D, H, W) tensor, labels (D, H, W) numpy). Query
    slices from the first to the last organ slice are segmented with their chunk's support slice
    (chunk_percentiles, query_chunk); Dice per query over those slices only (z_margin 0)."""
    model.eval()
    _, s_img, s_lab = support
    out = {o: {} for o in organs}
    sup = {}
    for organ, ids in organs.items():
        zs = np.nonzero(np.isin(s_lab, ids).any((1, 2)))[0]
        if len(zs):
            pick = [int(zs[int(p * len(zs))]) for p in chunk_percentiles(args.chunks)]
            fs = slice_features(model, s_img[pick], args.eval_batch, prec)  # (chunks, C, h, w)
            fg = torch.from_numpy(np.isin(s_lab[pick], ids)).float()[:, None].to(fs.device)
            sup[organ] = (fs, F.interpolate(fg, fs.shape[-2:], mode="bilinear"))
    for name, q_img, q_lab in bar(queries, desc="query volumes"):
        fq = slice_features(model, q_img, args.eval_batch, prec)
        for organ, ids in organs.items():
            zq = np.nonzero(np.isin(q_lab, ids).any((1, 2)))[0]
            if organ not in sup or not len(zq):
                continue
            fs, fg = sup[organ]
            z0, z1 = int(zq.min()), int(zq.max())
            pred = np.zeros((z1 - z0 + 1, *q_lab.shape[1:]), bool)
            parts = np.array([query_chunk(z, z0, z1, args.chunks) for z in range(z0, z1 + 1)])
            for k in range(args.chunks):
                zz = np.nonzero(parts == k)[0]
                if len(zz):
                    sc = alp_logits(fq[z0 + zz], fs[k:k + 1], fg[k:k + 1],
                                    args.pool_test, args.proto_thresh, args.pool_train)
                    pred[zz] = (F.interpolate(sc, q_lab.shape[1:], mode="bilinear").argmax(1)
                                == 1).cpu().numpy()
            out[organ][name] = dice(pred, np.isin(q_lab[z0:z1 + 1], ids))
    return out


# --------------------------------------------------------------------------- training one run
def train_step(model, data, gen, opt, sched, prec, ce_weight, args):
    """One SGD step on one episode -> detached losses (2,) = query, alignment, on the device."""
    sup, sup_m, qry, qry_m = sample_episode(data, gen, args)
    with prec.autocast():
        feats = model(torch.cat([sup, qry]))                          # (2, C, h, w)
    loss_q, loss_a = episode_loss(feats.float(), sup_m, qry_m, args, ce_weight)  # prototypes in float32
    opt.zero_grad(set_to_none=True)
    prec.scaler.scale(loss_q + loss_a).backward()
    prec.scaler.step(opt)
    prec.scaler.update()
    sched.step()
    return torch.stack([loss_q.detach(), loss_a.detach()])


def train_run(data, args, prec, device, seed, ckpt_path, log_path, settings, fingerprint, tag):
    """Train a fresh SliceEncoder on the episodes of `data` for args.iters iterations (resuming from ckpt_path
    when it holds an unfinished run with the same settings and data). Returns (model, stats)."""
    seed_everything(seed)
    model = SliceEncoder(args.backbone, args.channels)
    weights = resolve_weights(args.backbone_weights)
    if weights is not None:
        load_backbone_weights(model.backbone, weights)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # config_ssl_upload.py
    milestones = [args.lr_step * (k + 1) for k in range(args.iters // args.lr_step - 1)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, args.lr_gamma)
    gen = torch.Generator(device=device).manual_seed(seed)
    ce_weight = torch.tensor(args.ce_weights, device=device)
    start = 0
    if ckpt_path.exists() and not args.overwrite:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["settings"] == json.loads(json.dumps(settings)) and ckpt["fingerprint"] == fingerprint:
            model.load_state_dict(ckpt["model"])
            start = ckpt["iter"]
            if start < args.iters:
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
                gen.set_state(ckpt["generator"])
            print0(f"[{tag}] resumed from {ckpt_path} at iteration {start}")

    def save(it):  # a finished run keeps the network only (a ResNet-101's SGD state would double the file)
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state()}
        save_checkpoint({"model": model.state_dict(), **(state if it < args.iters else {}), "iter": it,
                         "settings": json.loads(json.dumps(settings)), "fingerprint": fingerprint,
                         "model_kwargs": {"backbone": args.backbone, "channels": args.channels}}, ckpt_path)

    log = csv_logger(log_path, ["iter", "loss_query", "loss_align", "lr", "ms_per_iter", "peak_memory_gb"],
                     start_step=start)
    acc = torch.zeros(2, device=device)  # summed losses on the device; read once per log interval
    t0, it0 = time.perf_counter(), start
    t_start = time.perf_counter()
    for it in range(start, args.iters):
        acc += train_step(model, data, gen, opt, sched, prec, ce_weight, args)
        if it == start:
            first_step_line(device, t0, it + 1, args.iters, args.log_every, "iteration", f"[{tag}] ")
        if (it + 1) % args.log_every == 0 or it + 1 == args.iters:
            lq, la = (acc / (it + 1 - it0)).tolist()                  # the one host sync per interval
            ms = (time.perf_counter() - t0) * 1000 / (it + 1 - it0)
            mem, lr = peak_memory_gb(device), sched.get_last_lr()[0]
            print0(f"[{tag}] iter {it + 1}/{args.iters}  loss {lq:.4f}  align {la:.4f}  lr {lr:.2e}  "
                   f"{ms:.1f} ms/iter  {1000 / ms:.1f} iters/s  peak {mem:.2f} GB  "
                   f"{eta(ms, args.iters - it - 1)}")
            log([it + 1, lq, la, lr, ms, mem])
            acc.zero_()
            t0, it0 = time.perf_counter(), it + 1
        if (it + 1) % args.save_every == 0 or it + 1 == args.iters:
            save(it + 1)
    seconds = time.perf_counter() - t_start
    return model, {"iters": args.iters, "resumed_at": start, "train_seconds": round(seconds, 1),
                   "ms_per_iter": round(seconds * 1000 / max(args.iters - start, 1), 2),
                   "peak_memory_gb": round(peak_memory_gb(device), 3)}


# --------------------------------------------------------------------------- outputs
def summarise(runs, sets, organs):
    """Mean ± std over seeds of each organ's mean Dice (over query volumes) and of the organ mean."""
    out = {}
    for s in sets:
        rs = [r for r in runs.values() if r["set"] == s]
        if not rs:
            continue
        row = {"runs": len(rs), "volumes": rs[0]["volumes"]}
        for o in [*organs, "mean"]:
            v = [r["organ_dice"][o] for r in rs if r["organ_dice"].get(o) is not None]
            row[o] = {"mean": float(np.mean(v)), "std": float(np.std(v))} if v else None
        out[s] = row
    return out


def write_table(path, summary, organs, note):
    cell = lambda v: "–" if v is None else f"{v['mean']:.3f} ± {v['std']:.3f}"
    head = "| Training set | volumes | runs | " + " | ".join(o.capitalize() for o in organs) + " | Mean |\n"
    head += "|---" * (4 + len(organs)) + "|\n"
    rows = [f"| {s} | {' + '.join(f'{n} {k}' for k, n in r['volumes'].items())} | {r['runs']} | "
            + " | ".join(cell(r[o]) for o in organs) + f" | {cell(r['mean'])} |" for s, r in summary.items()]
    text = f"{note}\n\n{head}" + "\n".join(rows) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return text


def plot_dice(path, summary, organs, title):
    """Fig. 6: bars per organ (and the mean), one per training set, std over runs as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*organs, "mean"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 3.6))
    width = 0.8 / max(len(summary), 1)
    for i, (s, r) in enumerate(summary.items()):
        mu = [r[o]["mean"] if r[o] else np.nan for o in cols]
        sd = [r[o]["std"] if r[o] else 0 for o in cols]
        ax.bar(np.arange(len(cols)) + (i - (len(summary) - 1) / 2) * width, mu, width,
               yerr=sd, capsize=2, label=s)
    ax.set_xticks(range(len(cols)), [c.capitalize() for c in cols])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(textwrap.fill(title, 110), fontsize=7)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------- main
def main(args):
    t_start = time.perf_counter()
    run, prec = start_run(args.device, args.precision, seed=0)
    device, rank, world = run.device, run.rank, run.world_size
    split = read_split(args.prep)
    hu = json.loads((args.prep / "config.json").read_text())["hu"]
    if rank == 0:
        prepare_out(args.out, [args.prep, *args.synthetic.values()])
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                if k not in ("train", "sets", "runs", "seeds", "synthetic", "out", "workers", "device",
                             "eval_batch", "log_every", "save_every", "overwrite", "prep")}
    settings["prep"], settings["hu"] = str(args.prep.resolve()), hu
    if rank == 0:
        guard_settings(args.out / "settings.json", settings, args.overwrite)
    res_path = args.out / "results.json"
    runs = {} if args.overwrite or not res_path.exists() else json.loads(res_path.read_text()).get("runs", {})

    # --- volumes: which files each training set uses, then one load (+ superpixels) for all of them
    n_real = len(split["train"])
    real = [("real", args.prep / "images" / f"{c}.nii.gz") for c in split["train"]]
    plan = {"real": real}
    for name, folder in args.synthetic.items():
        if set(args.train) & {"synthetic", "mixed"}:
            if not folder.is_dir():
                raise SystemExit(f"error: --synthetic {name}={folder}: "
                                 "no such folder (run 05_sample.py first)")
            syn = [(name, img) for img, _ in evaluation.fake_pairs(folder)]
            plan[f"synthetic-{name}"] = syn
            plan[f"mixed-{name}"] = real + syn[:round(args.mix_fraction * n_real)]  # the first ones, by name
    plan = {s: plan[s] for s in args.sets}
    sp_args = (args.sp_min_size, args.sp_sigma, args.sp_scale)
    jobs = {}
    for s in plan.values():
        for src, f in s:
            cache = args.out / "superpixels" / src / f"{f.name.removesuffix('.nii.gz')}.npz"
            if (src, f) not in jobs and f.exists():
                jobs[(src, f)] = (f, cache, cache_key(f, args, hu), hu, tuple(args.window), sp_args)
            elif not f.exists():
                print0(f"skipped: {f}: no such file")
    loaded = load_sources(jobs, args.workers) if rank == 0 else None
    if world > 1:  # torchrun: the other ranks read the superpixels rank 0 computed and cached
        torch.distributed.barrier()
        loaded = load_sources(jobs, args.workers) if rank > 0 else loaded

    # --- test volumes: the support and the queries, with their labels
    test = []
    for c in split["test"]:
        try:
            test.append(load_labelled(args.prep, c, hu, args.window))
        except ValueError as e:
            print0(f"skipped test case: {e}")
    support_name = args.support_case or (test[0][0] if test else None)
    support = next((t for t in test if t[0] == support_name), None)
    # e.g. a training case (its labels are never used in training)
    if support is None and support_name is not None:
        try:
            support = load_labelled(args.prep, support_name, hu, args.window)
        except ValueError as e:
            raise SystemExit(f"error: support case: {e}") from None
    if support is None:
        raise SystemExit(f"error: no readable labelled test case in {args.prep}")
    queries = [t for t in test if t[0] != support_name]
    if not queries:
        raise SystemExit("error: no query volume left (the test split needs 2 cases, or pass --support-case)")
    print0(f"test: support {support_name}, {len(queries)} query volumes; organs "
           + ", ".join(f"{o} {ids}" for o, ids in args.organs.items()))
    if args.iters > 5000 or args.backbone == "resnet101":
        sizing_note(device, f"--backbone {args.backbone}, --iters {args.iters}",
                    "`make demo-ssl`'s --backbone resnet18 --iters 500 --lr 1e-2 --lr-step 100 "
                    "--sp-min-size 100")

    note = (f"SSL-ALPNet, {args.backbone} "
            f"({Path(args.backbone_weights).name if args.backbone_weights else RANDOM_NOTE}), "
            f"{args.iters} iterations, {args.runs} run(s) per set; 1-shot, {args.chunks} chunks, "
            f"support {support_name}, {len(queries)} query volumes")

    def pending(s, seed, fp):  # not recorded yet, or recorded from other files
        return args.overwrite or f"{s}/seed{seed}" not in runs or runs[f"{s}/seed{seed}"]["fingerprint"] != fp

    def record():  # results.json after every run; the summary over this command's sets and seeds
        summary = summarise({k: r for k, r in runs.items() if r["seed"] in args.seeds},
                            args.sets, args.organs)
        if rank == 0:
            save_json({"settings": settings, "note": note, "runs": runs, "summary": summary}, res_path)
        return summary

    for s in args.sets:
        members = [(src, f) for src, f in plan[s] if (src, f) in loaded]
        if not members:
            print0(f"[{s}] no readable volumes, skipped")
            continue
        shape = loaded[members[0]][0].shape[1:]
        for m in [m for m in members if loaded[m][0].shape[1:] != shape]:
            print0(f"skipped: {m[1]}: slices {loaded[m][0].shape[1:]}, the set's first volume has {shape}")
            members.remove(m)
        fp = evaluation.file_key([(f, None) for _, f in members])
        todo = [seed for seed in args.seeds if pending(s, seed, fp)]
        volumes = {src: sum(1 for m in members if m[0] == src)
                   for src in dict.fromkeys(src for src, _ in members)}
        if not todo:
            print0(f"[{s}] {args.runs} run(s) recorded in {res_path} already (--overwrite redoes them)")
            continue
        # z-score with the training set's statistics (the reference's CT_normalize), test volumes included
        vols = np.concatenate([loaded[m][0] for m in members])
        mean, std = float(vols.mean(dtype=np.float64)), float(vols.std(dtype=np.float64)) or 1.0
        sps = np.concatenate([loaded[m][1] for m in members])
        nsp = sps.reshape(len(sps), -1).max(1)
        keep = nsp >= 1                                        # slices with no body have no pseudo-label
        data = (torch.from_numpy((vols[keep] - mean) / std).to(device),
                torch.from_numpy(sps[keep]).to(device),
                torch.from_numpy(nsp[keep].astype(np.float32)).to(device))
        del vols, sps
        norm = lambda t: (t[0], torch.from_numpy((t[1] - mean) / std).to(device), t[2])
        sup_n, qry_n = norm(support), [norm(q) for q in queries]
        print0(f"[{s}] {len(members)} volumes ({', '.join(f'{n} {k}' for k, n in volumes.items())}), "
               f"{int(keep.sum())} slices with superpixels (mean {nsp[keep].mean():.1f} per slice); "
               f"z-score {mean:.3f} ± {std:.3f}")
        mine = todo[rank::world]  # torchrun: the runs (seeds) are shared out, each trained whole by one rank
        for seed in mine:
            tag = f"{s}/seed{seed}"
            model, stats = train_run(data, args, prec, device, seed,
                                     args.out / "checkpoints" / f"{s}_seed{seed}.pt",
                                     args.out / "logs" / f"{s}_seed{seed}.csv", settings, fp, tag)
            t0 = time.perf_counter()
            dice = one_shot_dice(model, sup_n, qry_n, args.organs, args, prec)
            organ = {o: (float(np.mean(list(d.values()))) if d else None) for o, d in dice.items()}
            known = [v for v in organ.values() if v is not None]
            organ["mean"] = float(np.mean(known)) if known else None
            runs[tag] = {"set": s, "seed": seed, "fingerprint": fp, "volumes": volumes,
                         "slices": int(keep.sum()), "norm": [mean, std], "dice": dice,
                         "organ_dice": organ, **stats,
                         "eval_seconds": round(time.perf_counter() - t0, 1)}
            record()
            dice_line = ", ".join(f"{o} {'–' if v is None else f'{v:.3f}'}" for o, v in organ.items())
            print(f"[{tag}] Dice {dice_line}", flush=True)  # every rank: its own runs
            del model
        if world > 1:  # every rank's runs of this set, recorded by rank 0
            got = [None] * world
            torch.distributed.all_gather_object(got, {f"{s}/seed{k}": runs[f"{s}/seed{k}"] for k in mine})
            runs.update({k: v for g in got for k, v in g.items()})
            record()

    summary = record()
    if rank > 0:
        return summary
    print0(write_table(args.out / "table.md", summary, list(args.organs), note))
    plot_dice(args.out / "dice.png", summary, list(args.organs), note)
    print0(f"wrote {res_path} ({len(runs)} runs), {args.out / 'table.md'}, {args.out / 'dice.png'}; "
           f"superpixels in {args.out / 'superpixels'}, checkpoints in {args.out / 'checkpoints'}; "
           f"{time.perf_counter() - t_start:.0f} s")
    return summary


if __name__ == "__main__":
    run_stage(main, get_args)
