"""01 · Preprocess abdominal CT into the paper's training volumes (paper §4.1.2, docs/reference.md §1).

Reads a folder of NIfTI CT with optional label maps, writes to --out (default data/prep):
    images/<case>.nii.gz    float32 in [0, 1], (256, 256, 32) on disk = (1, 32, 256, 256) as a tensor
    labels/<case>.nii.gz    uint8 label map on the same grid (target ids: 1 liver, 2 kidney,
                            3 spleen, 4 pancreas, 5 tumour)
    previews/<case>.png     middle slices with the labels outlined
    split.json              deterministic train/test split by source case
    summary.json            per case: ok (with figures) or skipped (with the reason); counts
    cases/<case>.json       the same per-case record, written as each case finishes (resume)
    config.json             the settings; a rerun with other settings needs --overwrite or a new --out

Per case: reorient to RAS; map labels to the target ids; resample to the target spacing (image
linear or cubic, labels nearest); pick the 32-slice window with the most organ voxels (the release's
rule) or, with --windows all, every window containing the organ; crop/pad height and width to 256
around the body (air padding); clip HU to [-1000, 400] and map to [0, 1]. Every output carries an
affine that puts each voxel where it was in the source scan, so outputs overlay the original CT in a
viewer. A bad case (unreadable, 4-D, NaN, shape or affine mismatch, empty labels, ...) is reported
in summary.json and skipped; the input folder is only read.

    python 01_preprocess.py                                                  # data/raw -> data/prep
    python 01_preprocess.py --images AbdomenCT-1K/Image --labels AbdomenCT-1K/Mask --out data/prep
    python 01_preprocess.py --totalseg Totalsegmentator_dataset_v201 \\
        --require-organs liver,kidney,spleen,pancreas
    python 01_preprocess.py --images data/demo/raw/images --labels data/demo/raw/labels --out data/demo/prep
"""
import argparse
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import (DISK_ERRNOS, LABEL_NAMES, ORGANS, ArgumentParser, at_least, bar, case_id, check_order,
                    guard_settings, in_range, inputs_fingerprint, prepare_out, read_nifti, run_stage,
                    save_json, save_preview, soft_tissue, spacing_of, write_nifti, xyz_to_dhw)

PRESETS = {  # paper §4.1.2; the TotalSegmentator v2 "total" ids -> AbdomenCT-1K ids (docs/reference.md §1)
    "abdomenct1k": {"spacing": (1.6, 1.6, 2.3), "label_map": None},
    "totalseg": {"spacing": (1.1, 1.1, 1.5), "label_map": "5:1,2:2,3:2,1:3,7:4"},
}
# TotalSegmentator v2 ids of the abdominal organs, to combine its per-organ files
# (subject/segmentations/<name>.nii.gz) into one label map in the v2 id space.
TOTALSEG_V2 = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
               "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "duodenum": 19, "colon": 20,
               "aorta": 52, "inferior_vena_cava": 63, "portal_vein_and_splenic_vein": 64}


class CaseError(Exception):
    """A problem with one input case: it is reported and skipped, the run goes on."""


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    src = p.add_argument_group("input")
    src.add_argument("--images", type=Path, default=Path("data/raw/images"),
                     help="folder of CT NIfTI files (Case_00001_0000.nii.gz, pancreas_001.nii.gz, ...)")
    src.add_argument("--labels", type=Path, default=Path("data/raw/labels"),
                     help="label maps paired by case id; an image without one is skipped (the paper "
                          "uses annotated cases). No such folder: each case gets the central window")
    src.add_argument("--totalseg", type=Path, default=None,
                     help="TotalSegmentator folder of subjects (ct.nii.gz + segmentations/<organ>.nii.gz "
                          "or a multi-label seg.nii.gz), or one subject's folder; replaces --images/--labels")
    src.add_argument("--dataset", choices=sorted(PRESETS), default=None,
                     help="spacing and label map (default: totalseg with --totalseg, else abdomenct1k)")
    src.add_argument("--label-map", default=None,
                     help="source:target label ids, e.g. '5:1,2:2,3:2,1:3,7:4' (TotalSegmentator v2 -> "
                          "AbdomenCT-1K); unlisted labels become 0. Default: the preset's (none = keep ids)")
    geo = p.add_argument_group("geometry (paper §4.1.2)")
    geo.add_argument("--spacing", type=at_least(0.01, float), nargs=3, default=None,
                     metavar=("X", "Y", "Z"),
                     help="target voxel size, mm (default: preset; 1.6 1.6 2.3 AbdomenCT-1K, "
                          "1.1 1.1 1.5 TotalSegmentator)")
    geo.add_argument("--size", type=at_least(8), default=256,
                     help="output height and width, voxels (paper: 256)")
    geo.add_argument("--depth", type=at_least(1), default=32, help="output slices per volume (paper: 32)")
    geo.add_argument("--interp", choices=["linear", "cubic"], default="linear",
                     help="image interpolation (labels: nearest)")
    win = p.add_argument_group("slice window")
    win.add_argument("--organ", type=at_least(1), default=4,
                     help="target label whose voxels choose the window (4 = pancreas)")
    win.add_argument("--windows", choices=["best", "all"], default="best",
                     help="best: the window with the most organ voxels (release); all: every one with organ")
    win.add_argument("--window-stride", type=at_least(1), default=1,
                     help="with --windows all: step between window starts, slices")
    win.add_argument("--require-organs", default="",
                     help="comma list (liver,kidney,spleen,pancreas or ids): drop cases missing one, "
                          "or with one cut by the first/last slice (the paper's TotalSegmentator "
                          "filter). Off by default")
    inten = p.add_argument_group("intensity")
    inten.add_argument("--hu", type=float, nargs=2, default=(-1000.0, 400.0), metavar=("MIN", "MAX"),
                       help="HU clip range mapped to [0, 1] (paper §4.1.2)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("data/prep"), help="output folder")
    split = out.add_mutually_exclusive_group()
    split.add_argument("--test-fraction", type=in_range(0, 0.99), default=0.2,
                       help="fraction of cases held out for testing (paper: 80/20)")
    split.add_argument("--n-test", type=at_least(0), default=None,
                       help="number of test cases (AbdomenCT-1K in the paper: 200)")
    out.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    out.add_argument("--previews", action=argparse.BooleanOptionalAction, default=True,
                     help="write a preview PNG per output")
    out.add_argument("--workers", type=at_least(1), default=min(8, os.cpu_count() or 1),
                     help="parallel processes over cases")
    out.add_argument("--overwrite", action="store_true", help="redo done cases; allow new settings")
    out.add_argument("--max-gb", type=at_least(0.001, float), default=2.0,
                     help="largest input, GiB of voxels as its header states (checked before reading)")
    args = p.parse_args(argv)
    check_order(p, args, "--hu")
    wanted = [t.strip() for t in args.require_organs.split(",") if t.strip()]
    unknown = [t for t in wanted if not t.isdigit() and t not in ORGANS]
    if unknown:
        p.error(f"argument --require-organs: unknown organ {unknown[0]!r} (use {', '.join(ORGANS)} or ids)")
    preset = PRESETS[args.dataset or ("totalseg" if args.totalseg else "abdomenct1k")]
    args.spacing = tuple(args.spacing or preset["spacing"])
    args.label_map = parse_label_map(args.label_map if args.label_map is not None else preset["label_map"])
    args.require_organs = [int(t) if t.isdigit() else ORGANS[t] for t in wanted]
    return args


def parse_label_map(text):
    """'5:1,2:2' -> {5: 1, 2: 2}; None/'' -> None (keep the ids)."""
    if not text:
        return None
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
        assert all(len(pr) == 2 and 0 <= pr[1] <= 255 for pr in pairs)
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --label-map {text!r}: expected 'src:dst,src:dst' with integer ids "
                         f"(dst 0-255)")
    return dict(pairs)


# --------------------------------------------------------------------------- finding cases
def nifti_files(folder):
    return sorted(f for f in Path(folder).iterdir()
                  if not f.name.startswith(".") and f.name.endswith((".nii.gz", ".nii")))


def find_cases(args):
    """List of {case, image, label, label_kind}; label_kind None (no label folder at all) | 'file' |
    'totalseg_dir' | 'missing' (labels given, none for this case: reported and skipped)."""
    if args.totalseg:
        if not args.totalseg.is_dir():
            raise SystemExit(f"error: --totalseg {args.totalseg}: no such folder")
        cases = []
        one_subject = (args.totalseg / "ct.nii.gz").is_file()  # a subject's folder, or a dataset of them
        subjects = [args.totalseg] if one_subject else sorted(args.totalseg.iterdir())
        for d in [p for p in subjects if p.is_dir() and (p / "ct.nii.gz").exists()]:
            ml = [d / n for n in ("seg.nii.gz", "segmentations.nii.gz") if (d / n).is_file()]
            if ml:
                label, kind = ml[0], "file"
            elif (d / "segmentations").is_dir():
                label, kind = d / "segmentations", "totalseg_dir"
            else:
                label, kind = d, "missing"
            cases.append({"case": d.name, "image": d / "ct.nii.gz", "label": label, "label_kind": kind})
        return cases
    if not args.images.is_dir():
        raise SystemExit(f"error: --images {args.images}: no such folder (run 00_phantoms.py for demo "
                         f"data, or pass --images)")
    labels = {}
    if args.labels and args.labels.is_dir():
        labels = {case_id(f): f for f in nifti_files(args.labels)}
    elif args.labels:
        print(f"warning: no label folder {args.labels}: every case gets the central "
              f"{args.depth}-slice window")
    cases = []
    seen = set()
    for f in nifti_files(args.images):
        cid = case_id(f)
        if f.name.rsplit(".nii", 1)[0].endswith(tuple(f"_{k:04d}" for k in range(1, 10))):
            continue  # nnU-Net extra channels (_0001, ...): CT has one channel, _0000
        if cid in seen:
            raise SystemExit(f"error: two images in {args.images} give case id {cid!r}; rename one")
        seen.add(cid)
        lab = labels.get(cid)
        kind = "file" if lab else ("missing" if args.labels and args.labels.is_dir() else None)
        cases.append({"case": cid, "image": f, "label": args.labels if kind == "missing" else lab,
                      "label_kind": kind})
    return cases


# --------------------------------------------------------------------------- reading and checking
def squeeze_to_3d(a):
    """Drop trailing singleton axes ((X, Y, Z, 1) exports are common); leave real 4-D alone."""
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def load_image(path, max_gb=2.0):
    img, aff = read_nifti(path, np.float32, max_gb)
    img = squeeze_to_3d(img)
    if img.ndim != 3:
        raise CaseError(f"{path}: image is {img.ndim}-D with shape {tuple(img.shape)}; "
                        f"expected one 3-D CT volume")
    bad = int(np.count_nonzero(~np.isfinite(img)))
    if bad:
        raise CaseError(f"{path}: {bad} NaN/inf voxels")
    if np.any(spacing_of(aff) < 1e-3):
        raise CaseError(f"{path}: degenerate affine (voxel size {spacing_of(aff).round(4).tolist()} mm)")
    return img, aff


def load_label_file(path, shape, affine, max_gb=2.0):
    lab, aff = read_nifti(path, None, max_gb)
    lab = squeeze_to_3d(lab)
    if lab.shape != shape:
        raise CaseError(f"{path}: label shape {tuple(lab.shape)} does not match the image's {tuple(shape)}")
    diff = float(np.abs(aff - affine).max())
    if diff > 1e-2:
        raise CaseError(f"{path}: label affine differs from the image's (max difference {diff:.3g}); "
                        f"they are not on the same grid")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or np.any(np.abs(lab - np.rint(lab)) > 1e-3):
            raise CaseError(f"{path}: label map has non-integer values")
        lab = np.rint(lab)
    if lab.min() < 0:
        raise CaseError(f"{path}: label map has negative values")
    return lab if np.issubdtype(lab.dtype, np.integer) else lab.astype(np.int32)  # keep uint8 small


def load_totalseg_dir(folder, shape, affine, label_map):
    """Combine TotalSegmentator per-organ masks into one map in v2 ids (only the organs we map)."""
    wanted = sorted(label_map) if label_map else sorted(TOTALSEG_V2.values())
    names = {v: k for k, v in TOTALSEG_V2.items()}
    unknown = [i for i in wanted if i not in names]
    if unknown:
        raise CaseError(f"{folder}: label ids {unknown} have no known TotalSegmentator file name; "
                        f"use a multi-label seg.nii.gz instead")
    lab = np.zeros(shape, np.uint8)  # v2 ids are < 256
    for i in wanted:
        f = folder / f"{names[i]}.nii.gz"
        if f.exists():
            lab[load_label_file(f, shape, affine) > 0] = i
    return lab


def map_labels(lab, label_map):
    if not label_map:
        if lab.max() > 255:
            raise CaseError(f"label ids up to {lab.max()} do not fit uint8; give --label-map")
        return lab.astype(np.uint8)
    lut = np.zeros(max(int(lab.max()), max(label_map)) + 1, np.uint8)
    for s, d in label_map.items():
        lut[s] = d
    return lut[lab]


# --------------------------------------------------------------------------- geometry
def resample_grid(shape, affine, spacing):
    """Output shape, ratio and affine for resampling to `spacing`, first voxel centre fixed: output
    voxel i sits at input index i * ratio (ratio = out/in spacing per axis), so affine_out =
    affine_in @ diag(ratio, 1): same origin, same orientation, new voxel size."""
    ratio = np.asarray(spacing, float) / spacing_of(affine)
    n_out = tuple(int(np.floor((n - 1) / r + 1e-6)) + 1 for n, r in zip(shape, ratio))
    return n_out, ratio, affine @ np.diag([*ratio, 1.0])


def resample_labels(lab, ratio, n_out):
    """Nearest-neighbour resampling as plain indexing: exact, and no label is ever invented."""
    idx = [np.clip(np.rint(np.arange(n) * r).astype(int), 0, s - 1)
           for n, r, s in zip(n_out, ratio, lab.shape)]
    return lab[np.ix_(*idx)]


def resample_image(img, ratio, n_out, z_range, order):
    """Resample output slices z_range = (z0, z1) of the target grid (image: linear or cubic)."""
    z0, z1 = z_range
    lo = max(int(np.floor(z0 * ratio[2])) - 3, 0)  # crop the input to what these slices touch
    hi = min(int(np.ceil((z1 - 1) * ratio[2])) + 4, img.shape[2])
    return ndimage.affine_transform(img[:, :, lo:hi], ratio, offset=(0.0, 0.0, z0 * ratio[2] - lo),
                                    output_shape=(n_out[0], n_out[1], z1 - z0), order=order,
                                    mode="nearest", prefilter=order > 1).astype(np.float32)


def choose_windows(counts, depth, mode="best", stride=1):
    """Window starts along z; counts[z] = organ voxels in slice z (resampled grid).

    best: the start with the most organ voxels in [start, start + depth); ties (an organ shorter
    than the window) go to the window centred closest to the organ's centre. all: every start
    (step `stride`) whose window holds any organ voxel. No organ voxels: the central window. A
    volume shorter than `depth` gives one window starting below 0 (padded on both sides)."""
    n = len(counts)
    if n <= depth:
        return [-((depth - n) // 2)]
    sums = np.convolve(counts, np.ones(depth, int), "valid")  # sums[s] = counts[s:s+depth].sum()
    if mode == "all":
        return [s for s in range(0, n - depth + 1, stride) if sums[s] > 0]
    centre = (np.arange(n) * counts).sum() / counts.sum() if counts.sum() else (n - 1) / 2
    best = np.flatnonzero(sums == sums.max())
    return [int(best[np.argmin(np.abs(best + (depth - 1) / 2 - centre))])]


def body_centre(slab, threshold=-500.0):
    """(x, y) centre of the body's bounding box: the largest 3-D component above -500 HU
    (this leaves out the scanner table, which is thin and separate)."""
    comp, n = ndimage.label(slab > threshold)
    if n == 0:
        raise CaseError("no body found: no voxel above -500 HU in the window")
    big = np.argmax(np.bincount(comp.ravel())[1:]) + 1
    xs, ys = (np.flatnonzero(np.any(comp == big, axis=a)) for a in ((1, 2), (0, 2)))
    return (xs[0] + xs[-1]) / 2, (ys[0] + ys[-1]) / 2


def crop_pad(a, start, size, fill):
    """a[start : start + size] per axis, padding with `fill` where that runs outside `a`."""
    out = np.full(size, fill, a.dtype)
    src, dst = [], []
    for s, n, m in zip(start, size, a.shape):
        lo, hi = max(s, 0), min(s + n, m)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def window_hu(img, lo, hi):
    """Clip HU to [lo, hi] and map linearly to [0, 1] (paper §4.1.2)."""
    return ((np.clip(img, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def translate(affine, shift):
    """Affine of a sub-grid that starts at index `shift` of the grid `affine` describes."""
    t = np.eye(4)
    t[:3, 3] = shift
    return affine @ t


# --------------------------------------------------------------------------- one case
def process_case(spec, cfg):
    """Preprocess one case and write its outputs. Returns the case's record (never raises
    for bad input: the record then says 'skipped' and why)."""
    t0 = time.perf_counter()
    rec = {"case": spec["case"], "image": str(spec["image"]),
           "label": str(spec["label"]) if spec["label"] else None, "status": "ok", "warnings": [],
           "settings": cfg["settings"], "inputs": case_inputs(spec)}
    try:
        rec.update(_process(spec, cfg, rec["warnings"]))
    except CaseError as e:
        rec.update(status="skipped", reason=str(e))
    except OSError as e:
        if e.errno in DISK_ERRNOS:  # a full disk or a read-only --out stops the run (reads raise ValueError)
            raise
        rec.update(status="skipped", reason=f"unexpected {type(e).__name__}: {e}")
    except Exception as e:  # anything unexpected still only costs this case; the trace goes in the record
        rec.update(status="skipped", reason=f"unexpected {type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=4))
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    save_json(rec, Path(cfg["out"]) / "cases" / f"{spec['case']}.json")
    return rec


def _process(spec, cfg, warnings):
    if spec["label_kind"] == "missing":  # the paper uses the annotated cases only (§4.1.1)
        raise CaseError(f"{spec['image']}: no label map for case {spec['case']!r} in {spec['label']} "
                        f"(with labels given, only annotated cases are used, as in the paper)")
    img, aff = load_image(spec["image"], cfg["max_gb"])
    info = {"source_shape": list(img.shape), "source_spacing": spacing_of(aff).round(4).tolist()}
    lo_hu, hi_hu = float(img.min()), float(img.max())
    if hi_hu <= 2.0 and lo_hu >= -1.0:
        warnings.append("intensities lie in [-1, 2]: this does not look like CT in Hounsfield units")
    elif lo_hu >= -200:  # an abdominal CT always holds air (-1000 HU), in the bowel or around the body
        warnings.append(f"intensities span [{lo_hu:g}, {hi_hu:g}], no air at all: impossible for CT in HU. "
                        f"Stored as HU + 1024 without a scaling slope? Fix the header (scl_slope 1, "
                        f"scl_inter -1024)")
    label_map = cfg["label_map"] and {int(k): v for k, v in cfg["label_map"].items()}
    lab = None
    if spec["label_kind"] == "file":
        raw = load_label_file(spec["label"], img.shape, aff, cfg["max_gb"])
        if not raw.any():
            raise CaseError(f"{spec['label']}: label map is empty (all zeros)")
        lab = map_labels(raw, label_map)
    elif spec["label_kind"] == "totalseg_dir":
        lab = map_labels(load_totalseg_dir(Path(spec["label"]), img.shape, aff, label_map), label_map)
    else:
        warnings.append(f"no label map: took the central {cfg['depth']}-slice window")

    if lab is not None:  # the paper's TotalSegmentator filter (off unless --require-organs)
        for organ in cfg["require_organs"]:
            name = f"{LABEL_NAMES.get(organ, 'label')} (label {organ})"
            zs = np.flatnonzero(np.any(lab == organ, axis=(0, 1)))
            if len(zs) == 0:
                raise CaseError(f"dropped: missing required organ {name}")
            if zs[0] == 0 or zs[-1] == lab.shape[2] - 1:
                raise CaseError(f"dropped as incomplete: {name} is cut by the "
                                f"{'first' if zs[0] == 0 else 'last'} slice")

    n_out, ratio, aff_res = resample_grid(img.shape, aff, cfg["spacing"])
    depth, size = cfg["depth"], cfg["size"]
    if lab is not None:
        before = set(np.unique(lab).tolist())
        lab = resample_labels(lab, ratio, n_out)
        lost = before - set(np.unique(lab).tolist())
        if lost:
            warnings.append(f"labels {sorted(lost)} vanished in resampling (structures smaller than a voxel)")
        counts = np.count_nonzero(lab == cfg["organ"], axis=(0, 1))
        if counts.sum() == 0:
            name = LABEL_NAMES.get(cfg["organ"], "?")
            raise CaseError(f"organ label {cfg['organ']} ({name}) is not in the label map")
        starts = choose_windows(counts, depth, cfg["windows"], cfg["window_stride"])
    else:
        starts = choose_windows(np.zeros(n_out[2], int), depth)

    z0, z1 = max(min(starts), 0), min(max(starts) + depth, n_out[2])
    slab = resample_image(img, ratio, n_out, (z0, z1), order=3 if cfg["interp"] == "cubic" else 1)
    del img
    lo, hi = cfg["hu"]
    outputs, windows = [], []
    for s in starts:
        cx, cy = body_centre(crop_pad(slab, (0, 0, s - z0), (n_out[0], n_out[1], depth), -1000.0))
        start = (int(round(cx - (size - 1) / 2)), int(round(cy - (size - 1) / 2)), s)
        image = window_hu(crop_pad(slab, (start[0], start[1], s - z0), (size, size, depth), -1000.0), lo, hi)
        affine = translate(aff_res, start)
        name = spec["case"] if len(starts) == 1 else f"{spec['case']}_z{s:03d}"
        write_nifti(Path(cfg["out"]) / "images" / f"{name}.nii.gz", image, affine, np.float32)
        w = {"name": name, "z_start": s, "crop_start_xy": start[:2]}
        label = None
        if lab is not None:
            label = crop_pad(lab, start, (size, size, depth), 0)
            write_nifti(Path(cfg["out"]) / "labels" / f"{name}.nii.gz", label, affine, np.uint8)
            inside = int(np.count_nonzero(label == cfg["organ"]))
            w.update(organ_voxels=inside, organ_fraction_in_window=round(inside / counts.sum(), 4),
                     labels=[int(v) for v in np.unique(label) if v])
        if cfg["previews"]:
            sp = cfg["spacing"]  # shown in a soft-tissue window (-200..300 HU) so organs are visible
            save_preview(Path(cfg["out"]) / "previews" / f"{name}.png", xyz_to_dhw(image),
                         None if label is None else xyz_to_dhw(label), name, spacing=(sp[2], sp[1], sp[0]),
                         vrange=soft_tissue(hu=(lo, hi)))
        outputs.append(name)
        windows.append(w)
    return {**info, "resampled_shape": list(n_out), "outputs": outputs, "windows": windows}


# --------------------------------------------------------------------------- split and summary
def make_split(cases_ok, seed, test_fraction, n_test):
    """Deterministic train/test split over source cases (windows of one case stay together)."""
    ids = sorted(cases_ok)
    order = np.random.default_rng(seed).permutation(len(ids))
    k = n_test if n_test is not None else int(round(test_fraction * len(ids)))
    k = min(max(k, 0), max(len(ids) - 1, 0))
    test = sorted(ids[i] for i in order[:k])
    train = sorted(ids[i] for i in order[k:])
    return {"seed": seed, "train_cases": train, "test_cases": test,
            "train": [o for c in train for o in cases_ok[c]], "test": [o for c in test for o in cases_ok[c]]}


CONFIG_KEYS = ("spacing", "size", "depth", "interp", "organ", "windows", "window_stride", "require_organs",
               "hu", "label_map")


def case_inputs(spec):
    """The files a case reads: the image, and its label file (or TotalSegmentator's mask files)."""
    files = [spec["image"]]
    if spec["label_kind"] == "file":
        files.append(spec["label"])
    elif spec["label_kind"] == "totalseg_dir":
        files += sorted(Path(spec["label"]).glob("*.nii.gz"))
    return inputs_fingerprint(files)


def is_done(rec, spec, cfg, out):
    """A case is finished when its record is ok, was made with these settings from these very
    input files (same size and mtime), and all its outputs are there."""
    return (rec is not None and rec["status"] == "ok" and rec.get("settings") == cfg
            and rec.get("inputs") == case_inputs(spec)
            and all((out / "images" / f"{o}.nii.gz").exists() for o in rec["outputs"]))


def run_cases(todo, job, workers, done):
    """process_case for each spec, in `workers` processes; done(record) as each finishes. A worker
    that dies (killed for lack of memory, say) breaks the whole pool; the cases not finished then
    run again one per fresh process, so a death costs only the case that caused it."""
    if workers == 1 or len(todo) == 1:
        for spec in todo:
            done(process_case(spec, job))
        return
    pending = list(todo)
    with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
        futures = {pool.submit(process_case, spec, job): spec for spec in todo}
        for fut in as_completed(futures):
            try:
                done(fut.result())
                pending.remove(futures[fut])
            except BrokenProcessPool:
                pass
    for spec in pending:
        try:
            with ProcessPoolExecutor(max_workers=1) as pool:  # alone, so a death is this case's
                rec = pool.submit(process_case, spec, job).result()
        except BrokenProcessPool:
            rec = {"case": spec["case"], "image": str(spec["image"]), "status": "skipped", "warnings": [],
                   "reason": f"{spec['image']}: the worker process died while preprocessing it "
                             f"(out of memory?)"}
            save_json(rec, Path(job["out"]) / "cases" / f"{spec['case']}.json")
        done(rec)


def main(args):
    t0 = time.perf_counter()
    out = args.out
    inputs = [args.totalseg] if args.totalseg else [args.images, args.labels]
    prepare_out(out, inputs)
    cases = find_cases(args)
    if not cases:
        raise SystemExit(f"error: no NIfTI cases found in {args.totalseg or args.images}")
    settings = {k: getattr(args, k) for k in CONFIG_KEYS}
    # another dataset, another --out
    settings["inputs"] = [str(Path(p).resolve()) for p in inputs if p is not None]
    # tuples -> lists, int keys -> str in cfg: the form it has on disk
    cfg = guard_settings(out / "config.json", settings, args.overwrite)

    records = {}
    todo = []
    for spec in cases:  # resume: keep finished cases made with these settings from these inputs
        rec_path = out / "cases" / f"{spec['case']}.json"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() and not args.overwrite else None
        if is_done(rec, spec, cfg, out):
            records[spec["case"]] = rec
        else:
            todo.append(spec)
    if records:
        print(f"resuming: {len(records)} cases already done in {out} (--overwrite redoes them)")

    job = {**cfg, "out": str(out), "previews": args.previews, "max_gb": args.max_gb, "settings": cfg}
    job["spacing"], job["hu"] = tuple(args.spacing), tuple(args.hu)
    progress = bar(total=len(todo), desc="preprocess", unit="case")

    def done(rec):
        records[rec["case"]] = rec
        if rec["status"] != "ok":
            progress.write(f"skipped {rec['case']}: {rec['reason']}")
        elif any(w.startswith("intensities") for w in rec["warnings"]):
            progress.write(f"warning {rec['case']}: {rec['warnings'][0]}")
        progress.update()
    run_cases(todo, job, args.workers, done)
    progress.close()

    ok = {c: r["outputs"] for c, r in records.items() if r["status"] == "ok"}
    split = make_split(ok, args.seed, args.test_fraction, args.n_test)
    save_json(split, out / "split.json")
    skipped = {c: r["reason"] for c, r in records.items() if r["status"] != "ok"}
    summary = {"config": cfg, "counts": {"cases": len(records), "ok": len(ok), "skipped": len(skipped),
                                         "outputs": sum(map(len, ok.values())), "train": len(split["train"]),
                                         "test": len(split["test"])},
               "skipped": skipped, "cases": [records[c] for c in sorted(records)]}
    save_json(summary, out / "summary.json")

    dt = time.perf_counter() - t0
    n_warn = sum(bool(r.get("warnings")) for r in records.values())
    print(f"\n{len(ok)}/{len(records)} cases ok, {len(skipped)} skipped, {n_warn} with warnings "
          f"({dt:.1f} s, {dt / max(len(todo), 1):.2f} s/case over {args.workers} workers)")
    print(f"wrote {summary['counts']['outputs']} volumes ({args.size}x{args.size}x{args.depth} at "
          f"{'x'.join(f'{s:g}' for s in args.spacing)} mm, [0, 1]) to {out}/images, labels to {out}/labels")
    print(f"split: {len(split['train'])} train / {len(split['test'])} test in {out}/split.json; "
          f"details in {out}/summary.json" + (f"; previews in {out}/previews" if args.previews else ""))
    if not ok:
        raise SystemExit("error: no case could be preprocessed (reasons above and in summary.json)")


if __name__ == "__main__":
    run_stage(main, get_args)
