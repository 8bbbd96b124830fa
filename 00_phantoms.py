"""00 · Synthetic abdominal CT phantoms with organ labels, so the pipeline runs without downloads.

Reads nothing. Writes, per case (AbdomenCT-1K naming and label convention):
    DIR/images/Case_NNNNN_0000.nii.gz   int16 Hounsfield units
    DIR/labels/Case_NNNNN.nii.gz        uint8: 0 background, 1 liver, 2 kidney, 3 spleen,
                                        4 pancreas, 5 pancreatic tumour (some cases)
    DIR/previews/Case_NNNNN.png         the first --previews cases, middle slices
    DIR/phantoms.json                   what was written, with the seed
With --layout totalseg, TotalSegmentator's layout instead (for 01_preprocess.py --totalseg):
    DIR/sNNNN/ct.nii.gz, DIR/sNNNN/segmentations/{liver,spleen,kidney_right,kidney_left,pancreas}.nii.gz

Each case is an upper-abdomen slab built in world millimetres (RAS+): body outline with subcutaneous
fat, abdominal wall muscle and visceral fat; spine (vertebral body, canal, posterior elements),
paraspinal and psoas muscles, ribs; liver on the patient's right, spleen and stomach on the left,
both kidneys with renal sinus fat, aorta and IVC, a pancreas whose head, body and tail cross the
midline in front of the aorta with the splenic vein behind it, bowel loops with gas, and the
scanner table. Shapes, sizes and positions vary per case (random offsets plus a smooth random
deformation field), as do the anisotropic voxel spacing and the z extent. Intensities get
partial-volume blur and correlated noise. Files are stored as DICOM converters usually write them
(x and y flipped, an LPS-like affine), so the next stage's reorientation to RAS is exercised.

Deterministic: case k of seed s is the same whatever --n is.

    python 00_phantoms.py                       # 20 cases into data/raw
    python 00_phantoms.py --out data/demo/raw --n 8
"""
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import (ArgumentParser, at_least, check_order, file_fingerprint, in_range, prepare_out,
                    run_stage, save_json, save_preview, write_nifti, xyz_to_dhw)

LIVER, KIDNEY, SPLEEN, PANCREAS, TUMOUR = 1, 2, 3, 4, 5
MANIFEST = "phantoms.json"


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="root of images/, labels/")
    p.add_argument("--n", type=at_least(1), default=20, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="random seed (case k depends only on seed and k)")
    mm = at_least(0.1, float)
    p.add_argument("--spacing-xy", type=mm, nargs=2, default=(1.6, 2.2), metavar=("MIN", "MAX"),
                   help="in-plane voxel size range, mm (real CT: 0.6-0.9; coarser here for speed)")
    p.add_argument("--spacing-z", type=mm, nargs=2, default=(2.5, 5.0), metavar=("MIN", "MAX"),
                   help="slice spacing range, mm")
    p.add_argument("--z-extent", type=mm, nargs=2, default=(70.0, 200.0), metavar=("MIN", "MAX"),
                   help="scanned length range, mm (short ones exercise padding to 32 slices)")
    p.add_argument("--tumour-fraction", type=in_range(0, 1), default=0.35,
                   help="fraction of cases with a pancreatic tumour (label 5)")
    p.add_argument("--previews", type=at_least(0), default=2, help="PNG previews of first N cases")
    p.add_argument("--layout", choices=["abdomenct1k", "totalseg"], default="abdomenct1k",
                   help="abdomenct1k: images/ + labels/ as above; totalseg: TotalSegmentator's "
                        "folders, sNNNN/ct.nii.gz + sNNNN/segmentations/<organ>.nii.gz (no tumour "
                        "file: TotalSegmentator labels none, so a tumour is part of the pancreas)")
    p.add_argument("--overwrite", action="store_true", help="may replace files 00 did not write")
    args = p.parse_args(argv)
    for flag in ("--spacing-xy", "--spacing-z", "--z-extent"):
        check_order(p, args, flag, strict=False)
    return args


# --------------------------------------------------------------------------- helpers
def smooth_field(rng, shape, n_ctrl, amplitude):
    """Smooth random field on `shape`: Gaussian bumps on an n_ctrl grid, separable, so cheap."""
    g = rng.normal(0.0, amplitude, n_ctrl)
    for axis, (n, k) in enumerate(zip(shape, n_ctrl)):
        t = np.linspace(0, 1, n)[:, None]
        c = np.linspace(0, 1, k)[None, :]
        w = np.exp(-0.5 * ((t - c) * (k - 1 + 1e-9)) ** 2)
        w /= w.sum(1, keepdims=True)
        g = np.moveaxis(np.tensordot(w, np.moveaxis(g, axis, 0), axes=(1, 0)), 0, axis)
    return g.astype(np.float32)


class Canvas:
    """HU and label volumes on a world grid, with deformed coordinates for shape tests. paint()
    fills a region (index slices, bool mask); later paints cover earlier ones (tissues overlap)."""
    def __init__(self, origin, spacing, shape, deform):
        self.origin = np.asarray(origin)
        self.spacing = np.asarray(spacing)
        self.shape = shape
        self.axes = [origin[i] + spacing[i] * np.arange(shape[i], dtype=np.float32) for i in range(3)]
        self.deform = deform  # three (X, Y, Z) displacement fields, mm
        self.hu = np.full(shape, -1000.0, np.float32)
        self.lab = np.zeros(shape, np.uint8)

    def box(self, lo, hi):
        """Index slices covering world box [lo, hi] (mm), with a margin for the deformation."""
        sl = []
        for i in range(3):
            a = int(np.floor((lo[i] - 15 - self.origin[i]) / self.spacing[i]))
            b = int(np.ceil((hi[i] + 15 - self.origin[i]) / self.spacing[i])) + 1
            a = min(max(a, 0), self.shape[i])
            sl.append(slice(a, min(max(b, a), self.shape[i])))
        return tuple(sl)

    def coords(self, sl):
        """Deformed world coordinates (mm) of the voxels in `sl`, each (x, y, z)-shaped."""
        return (self.axes[0][sl[0], None, None] + self.deform[0][sl],
                self.axes[1][None, sl[1], None] + self.deform[1][sl],
                self.axes[2][None, None, sl[2]] + self.deform[2][sl])

    def ellipsoid(self, c, r, z=True):
        """Region inside the ellipsoid centre c, semi-axes r (mm); z=False: an infinite cylinder."""
        hi = [c[0] + r[0], c[1] + r[1], c[2] + r[2] if z else 1e9]
        lo = [c[0] - r[0], c[1] - r[1], c[2] - r[2] if z else -1e9]
        sl = self.box(lo, hi)
        x, y, zz = self.coords(sl)
        q = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2
        if z:
            q = q + ((zz - c[2]) / r[2]) ** 2
        return sl, q <= 1.0

    def tube(self, points, radii, flatten=1.0):
        """Region within radius(t) of a polyline (pancreas, splenic vein); y squashed by `flatten`."""
        pts = _densify(np.asarray(points, np.float32), 48)
        rad = np.interp(np.linspace(0, 1, len(pts)), np.linspace(0, 1, len(radii)), radii).astype(np.float32)
        sl = self.box(pts.min(0) - rad.max(), pts.max(0) + rad.max())
        x, y, z = self.coords(sl)
        best = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), np.inf, np.float32)
        for (px, py, pz), r in zip(pts, rad):
            best = np.minimum(best, ((x - px) ** 2 + ((y - py) / flatten) ** 2 + (z - pz) ** 2) / r**2)
        return sl, best <= 1.0

    def paint(self, region, hu, label=0, within=None):
        sl, m = region
        m = np.broadcast_to(m, tuple(s.stop - s.start for s in sl))
        if within is not None:
            m = m & within[sl]
        self.hu[sl][m] = hu
        self.lab[sl][m] = label


def _densify(points, n):
    """n points evenly spaced (by index) along a polyline through `points`."""
    t = np.linspace(0, len(points) - 1, n)
    return np.stack([np.interp(t, np.arange(len(points)), points[:, i]) for i in range(3)], 1)


# --------------------------------------------------------------------------- one case
def make_case(seed, index, args):
    """Return (hu int16 (X, Y, Z), label uint8 (X, Y, Z), affine RAS) for case `index`."""
    rng = np.random.default_rng([seed, index])
    u = lambda lo, hi: float(rng.uniform(lo, hi))

    # Grid: field of view, per-case anisotropic spacing, z extent around the pancreas level (z = 0).
    fov = u(380, 440)
    sxy, sz = u(*args.spacing_xy), u(*args.spacing_z)
    nxy = int(round(fov / sxy))
    nz = max(8, int(round(u(*args.z_extent) / sz)))
    z_centre = u(-15, 30)
    origin = np.array([-(nxy - 1) * sxy / 2, -(nxy - 1) * sxy / 2, z_centre - (nz - 1) * sz / 2],
                      np.float32)
    shape = (nxy, nxy, nz)
    amp = u(3, 7)
    deform = [smooth_field(rng, shape, (4, 4, 3), amp) for _ in range(3)]
    cv = Canvas(origin, (sxy, sxy, sz), shape, deform)

    # Body: centre offset on the table, lateral/AP semi-axes, fat and muscle thickness.
    bx, by = u(-25, 25), u(-15, 20)
    a, b = u(135, 175), u(100, 130)
    fat, wall = u(8, 30), u(8, 14)
    jit = lambda s=8.0: rng.uniform(-s, s, 3).astype(np.float32)
    scale = lambda lo=0.85, hi=1.15: u(lo, hi)

    gap = u(8, 25)  # table below the back
    sl = cv.box([bx - 220, by - b - gap - 40, -1e9], [bx + 220, by - b - gap + 5, 1e9])
    x, y, _ = cv.coords(sl)
    table_y = by - b - gap - 0.0005 * (x - bx) ** 2
    cv.paint((sl, (y <= table_y) & (y >= table_y - 10) & (np.abs(x - bx) < 210)), 80.0)

    cv.paint(cv.ellipsoid([bx, by, 0], [a, b, 0], z=False), u(-110, -90))                  # subcutaneous fat
    cv.paint(cv.ellipsoid([bx, by, 0], [a - fat, b - fat, 0], z=False), u(35, 55))          # abdominal wall
    cav_r = [a - fat - wall, b - fat - wall, 0]
    cv.paint(cv.ellipsoid([bx, by, 0], cav_r, z=False), u(-95, -80))                        # visceral fat
    cav_sl, cav = cv.ellipsoid([bx, by, 0], [cav_r[0] - 2, cav_r[1] - 2, 0], z=False)
    cavity = np.zeros(shape, bool)
    cavity[cav_sl] = np.broadcast_to(cav, tuple(s.stop - s.start for s in cav_sl))

    vy = by - b + u(62, 75)  # vertebral body centre (y); everything is placed relative to the spine
    vx = bx + u(-4, 4)
    for s in (-1, 1):  # paraspinal muscles, then psoas growing towards the pelvis
        cv.paint(cv.ellipsoid([vx + s * 32, vy - 42, 0], [24, 20, 0], z=False), u(40, 55))
        cv.paint(cv.ellipsoid([vx + s * 38, vy + 6, -80], [18, 16, 75]), u(40, 55), within=cavity)

    # Bowel loops: soft-tissue loops, some with gas, mostly anterior and inferior.
    for _ in range(int(rng.integers(8, 15))):
        c = [bx + u(-0.7, 0.7) * cav_r[0], by + u(-0.1, 0.8) * cav_r[1], u(-90, 25)]
        r = [u(12, 26), u(10, 22), u(15, 35)]
        cv.paint(cv.ellipsoid(c, r), u(15, 40), within=cavity)
        if rng.random() < 0.5:
            gas = cv.ellipsoid([c[0], c[1] + 0.4 * r[1], c[2]], [0.6 * r[0], 0.35 * r[1], 0.6 * r[2]])
            cv.paint(gas, u(-1000, -900), within=cavity)

    # Stomach (left upper quadrant) with a gas cap anteriorly.
    st = np.array([vx - 55, vy + 105, 55]) + jit()
    cv.paint(cv.ellipsoid(st, [45 * scale(), 32 * scale(), 45 * scale()]), u(10, 30), within=cavity)
    cv.paint(cv.ellipsoid(st + [0, 22, 8], [30, 12, 25]), -1000.0, within=cavity)

    # Solid organs (labelled). Liver: right lobe + left lobe reaching across the midline.
    liver_hu = u(55, 70)
    c = np.array([vx + 70, vy + 62, 60]) + jit()
    s = scale()
    cv.paint(cv.ellipsoid(c, [70 * s, 72 * s, 85 * s]), liver_hu, LIVER, within=cavity)
    cv.paint(cv.ellipsoid(c + [-75, 45, 10] + jit(5), [55 * s, 38 * s, 45 * s]), liver_hu, LIVER,
             within=cavity)
    for _ in range(3):  # hepatic/portal veins: darker tubes inside the liver
        p = c + rng.uniform(-30, 30, 3)
        cv.paint(cv.ellipsoid(p, [5, 5, 25]), liver_hu - u(15, 30), LIVER, within=cv.lab == LIVER)

    sp = np.array([vx - 95, vy + 25, 40]) + jit()
    s = scale()
    cv.paint(cv.ellipsoid(sp, [30 * s, 45 * s, 55 * s]), u(45, 60), SPLEEN, within=cavity)
    cv.paint(cv.ellipsoid(sp + [28, 10, 0], [18, 30, 45]), u(-95, -80), 0,
             within=cv.lab == SPLEEN)  # hilum notch

    for side in (-1, 1):  # kidneys (the right one lower), renal sinus fat on the medial side
        k = np.array([vx + side * 70, vy + 12, -30 - (12 if side > 0 else 0)]) + jit(6)
        s = scale()
        cv.paint(cv.ellipsoid(k, [26 * s, 22 * s, 52 * s]), u(150, 190), KIDNEY, within=cavity)
        cv.paint(cv.ellipsoid(k + [-side * 10, 3, 0], [10 * s, 9 * s, 28 * s]), u(-60, -20), 0,
                 within=cv.lab == KIDNEY)

    # Vessels: aorta left-anterior of the spine, IVC on the right.
    ao = [vx - 14, vy + 36 + u(-4, 4), 0]
    cv.paint(cv.ellipsoid(ao, [11, 11, 0], z=False), u(160, 220), 0, within=cavity)
    cv.paint(cv.ellipsoid([vx + 24, vy + 36, 0], [12, 9, 0], z=False), u(100, 140), 0, within=cavity)

    # Pancreas: head (right, lower) -> neck -> body in front of the aorta -> tail to the splenic hilum.
    pj = lambda p: np.asarray(p, np.float32) + jit(6)
    path = [pj([vx + 28, vy + 62, -12]), pj([vx + 2, vy + 80, -2]), pj([vx - 35, vy + 72, 8]),
            pj([sp[0] + 22, sp[1] + 10, sp[2] - 20])]
    s = scale(0.8, 1.2)
    radii = [15 * s, 10 * s, 10 * s, 8.5 * s]
    vein = [p + np.array([0, -10, 0], np.float32) for p in path[1:]]  # splenic vein along its back
    cv.paint(cv.tube(vein, [4.5, 4.5, 4.0]), u(130, 170), 0, within=cavity)
    pan_hu = u(80, 110)
    cv.paint(cv.tube(path, radii, flatten=0.7), pan_hu, PANCREAS, within=cavity)
    if rng.random() < args.tumour_fraction:  # a hypodense tumour, mostly in the head
        t = min(rng.beta(1.2, 3.0), 0.95) * (len(path) - 1)
        centre = _densify(np.asarray(path), 200)[int(t / (len(path) - 1) * 199)]
        grown = cv.tube(path, [r + 4 for r in radii], flatten=0.8)
        inside = np.zeros(shape, bool)
        inside[grown[0]] = np.broadcast_to(grown[1], tuple(q.stop - q.start for q in grown[0]))
        cv.paint(cv.ellipsoid(centre, [u(7, 14)] * 3), pan_hu - u(40, 60), TUMOUR, within=inside)

    # Spine: vertebral body (cortical rim, trabecular core), canal, posterior elements; ribs.
    cv.paint(cv.ellipsoid([vx, vy, 0], [23, 19, 0], z=False), u(500, 800))
    cv.paint(cv.ellipsoid([vx, vy, 0], [20, 16, 0], z=False), u(180, 280))
    cv.paint(cv.ellipsoid([vx, vy - 27, 0], [13, 9, 0], z=False), u(450, 700))
    cv.paint(cv.ellipsoid([vx, vy - 27, 0], [9, 7, 0], z=False), u(10, 30))
    cv.paint(cv.ellipsoid([vx, vy - 48, 0], [5, 14, 0], z=False), u(400, 650))
    for k in range(6):  # rib cross-sections along the lateral wall above the kidneys
        ang = np.deg2rad(-60 + 26 * k + u(-4, 4))
        for side in (-1, 1):
            rx, ry = bx + side * (a - fat - wall / 2) * np.cos(ang), by + (b - fat - wall / 2) * np.sin(ang)
            cv.paint(cv.ellipsoid([rx, ry, 30 + 18 * k], [6, 6, 9]), u(400, 700))

    # Image formation: low-frequency inhomogeneity, partial-volume blur, correlated noise.
    hu = cv.hu + smooth_field(rng, shape, (6, 6, 4), 4.0)
    hu = ndimage.gaussian_filter(hu, (0.7, 0.7, 0.4))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), (0.6, 0.6, 0.3))
    hu += noise * (u(8, 16) / (noise.std() + 1e-6))
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    affine = np.diag([sxy, sxy, sz, 1.0])
    affine[:3, 3] = origin
    return hu, cv.lab, affine


def to_lps_storage(data, affine):
    """Flip x and y and adjust the affine (same world positions) as DICOM converters store CT."""
    nx, ny = data.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.ascontiguousarray(data[::-1, ::-1]), affine @ flip


TOTALSEG_FILES = {"liver": (LIVER,), "spleen": (SPLEEN,), "pancreas": (PANCREAS, TUMOUR)}  # + the two kidneys


def case_files(out, name, layout):
    """The files case `name` is written to: [image, label file(s)]."""
    if layout == "abdomenct1k":
        return [out / "images" / f"{name}_0000.nii.gz", out / "labels" / f"{name}.nii.gz"]
    seg = out / name / "segmentations"
    organs = (*TOTALSEG_FILES, "kidney_right", "kidney_left")
    return [out / name / "ct.nii.gz"] + [seg / f"{o}.nii.gz" for o in organs]


def totalseg_masks(lab):
    """(X, Y, Z) label map in RAS -> {file name: binary mask} as TotalSegmentator stores them: one
    file per organ, the kidneys split at the midpoint between them (RAS: larger x = patient's right)."""
    out = {name: np.isin(lab, ids) for name, ids in TOTALSEG_FILES.items()}
    kidney = lab == KIDNEY
    xs = np.flatnonzero(kidney.any(axis=(1, 2)))
    mid = (xs.min() + xs.max()) / 2 if len(xs) else 0
    right = (np.arange(lab.shape[0]) > mid)[:, None, None]
    out["kidney_right"], out["kidney_left"] = kidney & right, kidney & ~right
    return out


# --------------------------------------------------------------------------- main
def foreign_file(out, manifest):
    """The first file under `out` that 00 did not write, or that changed since it wrote it (its sha1
    is not the one phantoms.json records): a user's data, never to be replaced or mixed with phantoms."""
    ours = manifest.get("files", {})
    for f in sorted(out.rglob("*")):
        if f.is_file() and not f.name.startswith(".") and f.name != MANIFEST:
            if ours.get(f.relative_to(out).as_posix()) != file_fingerprint(f):
                return f
    return None


def main(args):
    out = args.out
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    foreign = foreign_file(out, manifest) if out.is_dir() else None
    if foreign and not args.overwrite:  # our own phantoms, unchanged, may be rewritten; nothing else
        raise SystemExit(f"error: --out {out} holds files that 00_phantoms.py did not write or that changed "
                         f"since (e.g. {foreign}); phantoms go into an empty or new folder (--overwrite "
                         f"replaces and mixes)")
    prepare_out(out)
    if manifest.get("layout", args.layout) != args.layout:
        manifest = {}  # --overwrite to another layout: start the record again
    files = manifest.get("files", {})
    pattern = "Case_{:05d}" if args.layout == "abdomenct1k" else "s{:04d}"
    names = [pattern.format(k) for k in range(1, args.n + 1)]
    ours = set(manifest.get("cases", []))

    t0 = time.perf_counter()
    n_tumour = 0
    for k, name in enumerate(names, start=1):
        tc = time.perf_counter()
        hu, lab, affine = make_case(args.seed, k, args)
        img_disk, aff_disk = to_lps_storage(hu, affine)
        written = case_files(out, name, args.layout)
        write_nifti(written[0], img_disk, aff_disk, np.int16)
        if args.layout == "abdomenct1k":
            write_nifti(written[1], to_lps_storage(lab, affine)[0], aff_disk, np.uint8)
        else:
            for organ, binary in totalseg_masks(lab).items():
                write_nifti(out / name / "segmentations" / f"{organ}.nii.gz",
                            to_lps_storage(binary, affine)[0], aff_disk, np.uint8)
        sp = np.abs(np.diag(affine)[:3])
        if k <= args.previews:
            written.append(out / "previews" / f"{name}.png")
            save_preview(written[-1], xyz_to_dhw(hu), xyz_to_dhw(lab), name,
                         spacing=(sp[2], sp[1], sp[0]), vrange=(-250, 350))
        ours.add(name)
        for f in written:  # what we wrote, so that a later run knows it is ours
            files[f.relative_to(out).as_posix()] = file_fingerprint(f)
        save_json({"seed": args.seed, "layout": args.layout, "cases": sorted(ours), "files": files,
                   "written_by": "00_phantoms.py"}, manifest_path)
        present = [int(v) for v in np.unique(lab) if v]
        n_tumour += TUMOUR in present
        print(f"{name}: shape {hu.shape}, spacing {np.round(sp, 2).tolist()} mm, "
              f"labels {present}, {time.perf_counter() - tc:.2f} s", flush=True)

    dt = time.perf_counter() - t0
    where = (f"{out}/images and {out}/labels" if args.layout == "abdomenct1k"
             else f"{out}/<subject>/ (TotalSegmentator)")
    print(f"\nwrote {len(names)} phantom cases ({n_tumour} with a tumour) to {where} "
          f"in {dt:.1f} s ({dt / max(len(names), 1):.2f} s/case)"
          + (f"; previews in {out}/previews" if args.previews else ""))


if __name__ == "__main__":
    run_stage(main, get_args)
