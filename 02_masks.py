"""02 · Priori extraction: one organ/tumour mask per preprocessed volume (paper §3.1; docs/reference.md §5).

Reads --prep (default data/prep, from 01_preprocess.py): images/, labels/, split.json.
Writes --prep/masks/:
    <case>.nii.gz          uint8 mask on exactly the image's grid and affine:
                           0 background, 1 organ (pancreas by default), 2 tumour
    previews/<case>.png    middle slices, mask outlined (and the labels, when there are any)
    summary.json           per case: voxels, warnings, Dice against the labels when labelled;
                           counts (with_tumour) and warnings for the whole set
    config.json            the settings (a rerun with others needs --overwrite)

Lad's three phases all read this mask: it marks where the locality loss looks (03), what the
condition extractor encodes (04), and what the sampler augments (05).

--method labels     (the default and the CPU demo's: no weights, offline) masks straight from the
                    label maps (--organ 4, --tumour 5; any ids).
--method universeg  the paper's priori: UniverSeg (Butoi et al. 2023), a 2-D in-context segmenter,
                    slice by slice, with support slices from the labelled cases of --support-split
                    (default test: as in the paper, labelled cases are held out for testing and
                    training cases masked as if unlabelled). Organ and tumour are two binary tasks;
                    tumour overrides organ. --weights PATH, or auto to download the official file
                    (research-only licence). The authors' release in fact used UniSeg's masks; the
                    paper calls mask precision "insignificant": the mask says where to look.
--tumour-support D  another labelled set through 01 (MSD Task07 Pancreas, labels 1:4,2:5) giving
                    UniverSeg's tumour task its support slices: AbdomenCT-1K and TotalSegmentator
                    label no tumour, so without D the task has no example and the masks no label 2
                    (the release's do). A tumour-free set is flagged in the output and summary.json.

    python 02_masks.py                                          # labels -> data/prep/masks
    python 02_masks.py --method universeg --weights auto        # the paper's priori (GPU advised)
    python 02_masks.py --prep data/demo/prep --method labels    # the CPU demo
"""
import argparse
import json
import time
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from common import (MASK_NAMES, ArgumentParser, at_least, bar, choose_precision, file_fingerprint,
                    guard_settings, inputs_fingerprint, load_checkpoint, pick_device, prepare_out,
                    read_nifti, read_split, run_stage, save_json, save_preview, seed_everything, soft_tissue,
                    write_nifti, xyz_to_dhw)

UNIVERSEG_URL = "https://github.com/JJGO/UniverSeg/releases/download/weights/universeg_v1_nf64_ss64_STA.pt"
POSITIVE_FRACTION = 0.75  # share of support slices that contain the label ("mostly")
NO_TUMOUR = ("no mask holds a tumour (label 2): the release's masks do, and a third of the structure "
             "condition (the Betti numbers of label 2) is constant here. AbdomenCT-1K and "
             "TotalSegmentator label no tumour: give UniverSeg tumour examples with --tumour-support "
             "(MSD Task07 Pancreas through 01_preprocess.py)")


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    p.add_argument("--prep", type=Path, default=Path("data/prep"), help="01_preprocess.py output folder")
    p.add_argument("--method", choices=["labels", "universeg"], default="labels",
                   help="labels: from the label maps; universeg: predicted, as in the paper (§3.1)")
    p.add_argument("--organ", default="4", help="mask 1's label ids, comma-separated (4: pancreas)")
    p.add_argument("--tumour", default="5", help="mask 2's label ids, comma-separated ('' = none)")
    u = p.add_argument_group("universeg")
    u.add_argument("--weights", default=None,
                   help="UniverSeg state_dict file, or 'auto' to download the official weights")
    u.add_argument("--support-split", choices=["test", "train", "all"], default="test",
                   help="labelled cases the support slices come from (paper: the held-out labelled cases)")
    u.add_argument("--tumour-support", type=Path, default=None,
                   help="01 output of another labelled set with tumours (MSD Task07 Pancreas, "
                        "labels 1:4,2:5): its cases give the tumour support slices. AbdomenCT-1K "
                        "and TotalSegmentator label no tumour: without it none is predicted there")
    u.add_argument("--support-size", type=at_least(1), default=64,
                   help="support slices per prediction (UniverSeg v1 used 64)")
    u.add_argument("--ensemble", type=at_least(1), default=1,
                   help="average the probabilities over K random support sets")
    u.add_argument("--batch", type=at_least(1), default=4,
                   help="target slices per forward pass (memory grows with batch × support)")
    u.add_argument("--resolution", type=at_least(8), default=128,
                   help="slice size the model sees (v1 trained at 128; smaller for quick tests)")
    u.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--largest-component", action="store_true",
                   help="keep only the mask's largest 3-D connected component (organ + tumour)")
    p.add_argument("--seed", type=int, default=0, help="seed of the support sampling")
    p.add_argument("--previews", action=argparse.BooleanOptionalAction, default=True,
                   help="write a preview PNG per case")
    p.add_argument("--overwrite", action="store_true", help="redo cases that already have a mask")
    args = p.parse_args(argv)
    for flag in ("organ", "tumour"):
        try:
            setattr(args, flag, [int(t) for t in getattr(args, flag).split(",") if t.strip()])
        except ValueError:
            p.error(f"argument --{flag}: expected label ids like 4 or 4,5, got {getattr(args, flag)!r}")
    if not args.organ:
        p.error("argument --organ: at least one label id")
    if args.method == "universeg" and not args.weights:
        p.error("--method universeg needs --weights PATH or --weights auto")
    if args.tumour_support is not None:
        if args.method != "universeg":
            p.error("--tumour-support gives UniverSeg its tumour examples: it needs --method universeg")
        if not args.tumour:
            p.error("--tumour-support needs tumour label ids (--tumour)")
    return args


# --------------------------------------------------------------------------- UniverSeg
# Our own plain-PyTorch UniverSeg. Module and parameter names follow the official model, so
# its state_dict loads with strict=True (44 tensors, 1,182,785 parameters; docs/reference.md §5).
class ConvAct(nn.Module):
    """Conv2d ('same' zero padding) + optional LeakyReLU(0.01)."""
    def __init__(self, cin, cout, kernel=3, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        return F.leaky_relu(x, 0.01) if self.act else x


class PerItem(nn.Module):
    """Apply a 2-D module to each item of a (B, S, C, H, W) stack (the official `Vmap`)."""
    def __init__(self, module):
        super().__init__()
        self.vmapped = module

    def forward(self, x):
        return self.vmapped(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class CrossConv(nn.Module):
    """One 3×3 conv over concat(target, support_j) for every support j: (B,1,Ct,H,W), (B,S,Cs,H,W)
    -> (B,S,F,H,W). A conv is linear in its input channels, so conv([t, s_j]) = conv_t(t) +
    conv_s(s_j): the target half runs once instead of S times (the official maths, less work)."""
    def __init__(self, target_ch, support_ch, features):
        super().__init__()
        self.target_ch = target_ch
        self.cross_conv = nn.Conv2d(target_ch + support_ch, features, 3, padding=1)

    def forward(self, target, support):
        w, b = self.cross_conv.weight, self.cross_conv.bias
        t = F.conv2d(target.flatten(0, 1), w[:, : self.target_ch], b, padding=1)           # (B, F, H, W)
        s = F.conv2d(support.flatten(0, 1), w[:, self.target_ch:], None, padding=1)        # (B*S, F, H, W)
        return s.unflatten(0, support.shape[:2]) + t[:, None]


class CrossBlock(nn.Module):
    """Cross conv (no activation) -> target = mean over supports -> separate conv+LeakyReLU for each."""
    def __init__(self, target_ch, support_ch, features):
        super().__init__()
        self.cross = CrossConv(target_ch, support_ch, features)
        self.target = PerItem(ConvAct(features, features))
        self.support = PerItem(ConvAct(features, features))

    def forward(self, target, support):
        interaction = self.cross(target, support)                                          # (B, S, F, H, W)
        return self.target(interaction.mean(1, keepdim=True)), self.support(interaction)


class UniverSeg(nn.Module):
    """UniverSeg v1: target (B,1,H,W) in [0,1], supports (B,S,1,H,W) images and labels -> logits (B,1,H,W).

    U-Net of CrossBlocks; encoder: max-pool 2 between blocks; decoder: bilinear upsampling
    (align_corners=True), skip concatenation; 1×1 output conv. Invariant to support order (mean)."""
    def __init__(self, encoder=(64, 64, 64, 64), decoder=(64, 64, 64)):
        super().__init__()
        self.enc_blocks, self.dec_blocks = nn.ModuleList(), nn.ModuleList()
        ct, cs = 1, 2  # target: image; support: image + label
        for f in encoder:
            self.enc_blocks.append(CrossBlock(ct, cs, f))
            ct = cs = f
        for f, skip in zip(decoder, encoder[-2::-1]):  # skips: every encoder level but the last
            self.dec_blocks.append(CrossBlock(ct + skip, cs + skip, f))
            ct = cs = f
        self.out_conv = ConvAct(ct, 1, kernel=1, act=False)

    def forward(self, target_image, support_images, support_labels):
        target = target_image[:, None]                                   # (B, 1, 1, H, W)
        support = torch.cat([support_images, support_labels], dim=2)     # (B, S, 2, H, W)
        pool = lambda x: F.max_pool2d(x.flatten(0, 1), 2).unflatten(0, x.shape[:2])
        up = lambda x: F.interpolate(x.flatten(0, 1), scale_factor=2, mode="bilinear",
                                     align_corners=True).unflatten(0, x.shape[:2])
        skips = []
        for i, block in enumerate(self.enc_blocks):
            target, support = block(target, support)
            if i < len(self.enc_blocks) - 1:
                skips.append((target, support))
                target, support = pool(target), pool(support)
        for block in self.dec_blocks:
            t_skip, s_skip = skips.pop()
            target, support = block(torch.cat([up(target), t_skip], 2), torch.cat([up(support), s_skip], 2))
        return self.out_conv(target[:, 0])


def load_universeg(weights, device):
    """Build UniverSeg and load `weights` (a file, or 'auto' = the official URL) with strict=True."""
    model = UniverSeg()
    if weights == "auto":
        try:
            state = torch.hub.load_state_dict_from_url(UNIVERSEG_URL, map_location="cpu", weights_only=True)
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"error: could not download the UniverSeg weights from {UNIVERSEG_URL} ({e}). "
                             f"Without internet: fetch that file elsewhere and pass --weights PATH.")
    else:
        state = load_checkpoint(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"error: {weights} is not a UniverSeg v1 state_dict: {e}")
    return model.to(device).eval()


def support_pools(prep, names, split_name, tasks, size, load=None):
    """{task: SupportPool} from the labelled cases among `names` of a 01 output folder."""
    load = load or (lambda n: (xyz_to_dhw(read_nifti(prep / "images" / f"{n}.nii.gz")[0]), None,
                               label_or_none(prep / "labels" / f"{n}.nii.gz")))
    data = {n: load(n) for n in names}
    labelled = [n for n in names if data[n][2] is not None]
    if not labelled:
        raise SystemExit(f"error: {prep}: no labelled case in the '{split_name}' split for the support set; "
                         f"try --support-split all, or --method labels")
    pool = SupportPool(labelled, {n: data[n][0] for n in labelled},
                       {n: data[n][2] for n in labelled}, tasks, size)
    return {task: pool for task in tasks}


def label_or_none(path):
    return xyz_to_dhw(read_nifti(path, None)[0]) if path.exists() else None


# --------------------------------------------------------------------------- slices in, masks out
def to_model_slices(vol, size=128):
    """(D, H, W) volume -> (D, 1, size, size): each slice min-max scaled to [0, 1], then resized."""
    x = torch.as_tensor(vol, dtype=torch.float32)[:, None]
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_model_labels(binary, size=128):
    """(D, H, W) bool -> (D, 1, size, size) {0, 1}: area-resized, then thresholded at one half."""
    x = torch.as_tensor(binary, dtype=torch.float32)[:, None]
    return (F.interpolate(x, size=(size, size), mode="area") >= 0.5).float()


class SupportPool:
    """Labelled slices the support sets are drawn from, per task (organ, tumour), at the model's size."""
    def __init__(self, cases, images, labels, tasks, size=128):
        # (N, 1, size, size)
        self.images = torch.cat([to_model_slices(images[c], size) for c in cases])
        self.case_of = np.concatenate([[c] * len(images[c]) for c in cases])
        self.labels = {t: torch.cat([to_model_labels(np.isin(labels[c], ids), size) for c in cases])
                       for t, ids in tasks.items()}
        self.positive = {t: (lab.flatten(1).amax(1) > 0).numpy() for t, lab in self.labels.items()}

    def sample(self, task, size, rng, exclude=None):
        """`size` slices, POSITIVE_FRACTION of them containing the label, none from case `exclude`
        (a labelled case is never its own support). None when no slice has the label."""
        allowed = self.case_of != exclude
        pos = np.flatnonzero(self.positive[task] & allowed)
        neg = np.flatnonzero(~self.positive[task] & allowed)
        if len(pos) == 0:
            return None
        n_pos = min(len(pos), max(1, int(round(size * POSITIVE_FRACTION))))
        n_neg = min(len(neg), size - n_pos)
        n_pos = min(len(pos), size - n_neg)
        idx = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
        return self.images[idx], self.labels[task][idx]


@torch.inference_mode()
def predict_probability(model, vol, support, batch, device, precision):
    """P(label) per voxel of a (D, H, W) volume, slice by slice: logits at the support's size
    (128² for v1) upsampled to (H, W)."""
    s_img, s_lab = (t.to(device)[None] for t in support)                               # (1, S, 1, 128, 128)
    targets = to_model_slices(vol, s_img.shape[-1]).to(device)
    out = []
    for i in range(0, len(targets), batch):
        t = targets[i:i + batch]
        with precision.autocast():
            logits = model(t, s_img.expand(len(t), -1, -1, -1, -1), s_lab.expand(len(t), -1, -1, -1, -1))
        out.append(torch.sigmoid(F.interpolate(logits.float(), size=vol.shape[1:], mode="bilinear",
                                               align_corners=False)))
    return torch.cat(out)[:, 0].cpu().numpy()                                          # (D, H, W)


def mask_from_labels(label, organ, tumour):
    """Label map -> mask: 1 where the label is an organ id, 2 where it is a tumour id (tumour wins)."""
    mask = np.zeros(label.shape, np.uint8)
    mask[np.isin(label, organ)] = 1
    mask[np.isin(label, tumour)] = 2
    return mask


def largest_component(mask):
    """Keep the largest 3-D connected component (26-connectivity) of mask > 0."""
    comp, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    keep = np.argmax(np.bincount(comp.ravel())[1:]) + 1
    return np.where(comp == keep, mask, 0).astype(np.uint8)


def dice(pred, truth):
    """2|A∩B| / (|A| + |B|) of two boolean volumes; None when both are empty (nothing to score).
    The one Dice of the codebase: 06 and 07 import it."""
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total if total else None


# --------------------------------------------------------------------------- main
def main(args):
    t_start = time.perf_counter()
    prep, out = args.prep, args.prep / "masks"
    split = read_split(prep)
    names = split["train"] + split["test"]
    settings = {k: getattr(args, k) for k in ("method", "organ", "tumour", "weights", "support_split",
                                              "support_size", "ensemble", "resolution",
                                              "largest_component", "seed", "tumour_support")}
    prep_cfg = prep / "config.json"  # 01's settings: masks of another preprocessing are refused
    settings["prep"] = file_fingerprint(prep_cfg) if prep_cfg.is_file() else None
    prepare_out(out)
    seed_everything(args.seed)

    def load(name):
        img, aff = read_nifti(prep / "images" / f"{name}.nii.gz")
        return xyz_to_dhw(img), aff, label_or_none(prep / "labels" / f"{name}.nii.gz")

    tasks = {"organ": args.organ, **({"tumour": args.tumour} if args.tumour else {})}
    if args.method == "universeg":
        device = pick_device(args.device)
        precision = choose_precision(device)
        model = load_universeg(args.weights, device)
        support_names = {"test": split["test"], "train": split["train"], "all": names}[args.support_split]
        pools = support_pools(prep, support_names, args.support_split, tasks, args.resolution, load)
        if args.tumour_support is not None:  # tumour examples from another labelled set (§3.1 needs label 2)
            other = read_split(args.tumour_support)
            pools |= support_pools(args.tumour_support, other["train"] + other["test"], "all",
                                   {"tumour": args.tumour}, args.resolution)
        for task, pool in pools.items():
            source = args.tumour_support if task == "tumour" and args.tumour_support else prep
            print(f"UniverSeg {task} support: {len(pool.images)} slices "
                  f"({int(pool.positive[task].sum())} with the label) "
                  f"from {len(set(pool.case_of))} labelled cases of {source}")
            if not pool.positive[task].any():
                print(f"warning: no support slice contains the {task} label {tasks[task]}: "
                      f"no {task} will be predicted")
        print(f"UniverSeg on {device} ({precision.name}): "
              f"{args.support_size} slices × {args.ensemble} set(s) per task")
    guard_settings(out / "config.json", settings, args.overwrite)  # only once everything needed is at hand

    records, done, t_work = [], 0, 0.0
    rng = np.random.default_rng(args.seed)
    progress = bar(names, desc=f"masks ({args.method})", unit="case")
    for name in progress:
        path, old = out / f"{name}.nii.gz", out / "cases" / f"{name}.json"
        source = inputs_fingerprint([prep / "images" / f"{name}.nii.gz"], prep)
        if path.exists() and old.exists() and not args.overwrite:
            rec = json.loads(old.read_text())
            if rec.get("source") == source:  # else the image changed: redo its mask
                records.append(rec)
                continue
        t0 = time.perf_counter()
        rec = {"case": name, "split": "test" if name in split["test"] else "train", "warnings": [],
               "source": source}
        try:
            img, aff, lab = load(name)
        except ValueError as e:  # an unreadable volume costs its case
            rec.update(status="skipped", reason=str(e))
            progress.write(f"skipped {name}: {e}")
            records.append(rec)
            continue
        if args.method == "labels":
            if lab is None:
                rec.update(status="skipped", reason=f"{prep / 'labels' / (name + '.nii.gz')}: no label map "
                                                    f"(use --method universeg for unlabelled cases)")
                progress.write(f"skipped {name}: {rec['reason']}")
                records.append(rec)
                continue
            mask = mask_from_labels(lab, args.organ, args.tumour)
        else:
            mask = np.zeros(img.shape, np.uint8)
            for value, task in ((1, "organ"), (2, "tumour")):
                if task not in tasks or not pools[task].positive[task].any():
                    continue
                prob = np.zeros(img.shape, np.float32)
                for _ in range(args.ensemble):
                    support = pools[task].sample(task, args.support_size, rng, exclude=name)
                    prob += (predict_probability(model, img, support, args.batch, device, precision)
                             / args.ensemble)
                mask[prob > 0.5] = value  # tumour is written last: it overrides the organ
        if args.largest_component:
            mask = largest_component(mask)
        if not mask.any():
            rec["warnings"].append("empty mask: nothing found (later stages treat the case as "
                                   "having no organ)")
            progress.write(f"warning {name}: empty mask")
        rec.update(status="ok", organ_voxels=int((mask == 1).sum()), tumour_voxels=int((mask == 2).sum()))
        if lab is not None and args.method == "universeg":
            organ = dice(mask == 1, np.isin(lab, args.organ))
            tumour = dice(mask == 2, np.isin(lab, args.tumour)) if args.tumour else None
            rec.update(dice_organ=None if organ is None else round(organ, 4),
                       dice_tumour=None if tumour is None else round(tumour, 4))
        write_nifti(path, mask.transpose(2, 1, 0), aff, np.uint8)  # (D, H, W) -> (X, Y, Z), the image's grid
        if args.previews:
            rows = [(img, mask, f"{name} mask")]
            if lab is not None and args.method == "universeg":
                rows.append((img, mask_from_labels(lab, args.organ, args.tumour), "labels"))
            sp = np.sqrt((aff[:3, :3] ** 2).sum(0))
            save_preview(out / "previews" / f"{name}.png",
                         [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                         spacing=(sp[2], sp[1], sp[0]), vrange=soft_tissue(args.prep), names=MASK_NAMES)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        save_json(rec, out / "cases" / f"{name}.json")
        records.append(rec)
        done += 1
        t_work += rec["seconds"]

    ok = [r for r in records if r["status"] == "ok"]
    mean = lambda key: (lambda v: round(float(np.mean(v)), 4) if v else None)(
        [r[key] for r in ok if r.get(key) is not None])
    with_tumour = sum(r["tumour_voxels"] > 0 for r in ok)
    warnings = [NO_TUMOUR] if ok and not with_tumour else []
    summary = {"config": settings, "warnings": warnings,
               "counts": {"cases": len(records), "ok": len(ok), "skipped": len(records) - len(ok),
                          "empty": sum(r["organ_voxels"] + r["tumour_voxels"] == 0 for r in ok),
                          "with_tumour": with_tumour},
               "mean_dice_organ": mean("dice_organ"), "mean_dice_tumour": mean("dice_tumour"),
               "masks_per_second": round(done / t_work, 3) if t_work else None, "cases": records}
    save_json(summary, out / "summary.json")

    print(f"\nwrote {len(ok)} masks ({args.method}) to {out}/ in {time.perf_counter() - t_start:.1f} s "
          f"({summary['masks_per_second']} masks/s over {done} new); {summary['counts']['skipped']} skipped, "
          f"{summary['counts']['empty']} empty")
    if summary["mean_dice_organ"] is not None:
        print(f"Dice against the labels: organ {summary['mean_dice_organ']}, "
              f"tumour {summary['mean_dice_tumour']}")
    print(f"{with_tumour} of {len(ok)} masks hold a tumour (label 2)")
    for w in warnings:
        print(f"\nWARNING: {w}\n")
    print(f"details in {out}/summary.json" + (f"; previews in {out}/previews" if args.previews else ""))
    if not ok:
        raise SystemExit("error: no mask was written (reasons above and in summary.json)")


if __name__ == "__main__":
    run_stage(main, get_args)
