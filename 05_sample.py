"""05 · Locality condition augmentation and guided sampling to NIfTI (paper §3.4, Fig. 2c).

Reads  --prep (default data/prep): masks/ (02, the original mask set), images/ (for the affines),
       split.json, config.json (01's HU window); --vqgan (03) and --diffusion (04) checkpoints.
Writes --out (default runs/samples):
    <id>.nii.gz          int16 HU volume, the affine of the preprocessed case its mask came from
    <id>_mask.nii.gz     the (augmented) mask it was conditioned on, uint8 0/1/2
    previews.png         the first samples through their organ's centroid, masks outlined
    samples.json         per sample: source case, augmentation, seed

Condition augmentation (§3.4.1): the original masks (unless --no-original, Table 2's "×" rows)
and --aug-per-mask augmented copies of each: a flip, a random in-plane affine (rotation,
scaling, translation) and a random elastic deformation (a smooth displacement field), all with
nearest-neighbour label interpolation (scipy), so no new label appears. Conditions come from
04's extractor; sampling uses the EMA weights and Eq. 4 exactly, ε̃ = (1 + w)·ε(z, c) − w·ε(z),
with both passes in one batch (the release skipped the formula at w = 1).

Each sample has its own seed, so it is reproducible on its own, whatever the batch. Reruns skip
finished samples; under torchrun, samples are shared out across GPUs.

    python 05_sample.py                                        # as many as the training set, DDPM-300, w = 1
    python 05_sample.py --sampler ddim --steps 50 --guidance 1.5 --out runs/samples_w1.5
    python 05_sample.py --no-original --aug-per-mask 2         # "unseen" masks only (Table 2, ×)
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common import (dhw_to_xyz, load_stage, print0, read_nifti, save_json, save_preview, soft_tissue, start_run,
                    teardown_distributed, write_nifti, xyz_to_dhw)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prep", type=Path, default=Path("data/prep"))
    p.add_argument("--vqgan", type=Path, default=Path("runs/vqgan/ckpt.pt"))
    p.add_argument("--diffusion", type=Path, default=Path("runs/diffusion/ckpt.pt"))
    p.add_argument("--out", type=Path, default=Path("runs/samples"))
    p.add_argument("--n", type=int, default=None, help="volumes in total (default: the training set's size, as in §4.2)")
    a = p.add_argument_group("condition augmentation (§3.4.1)")
    a.add_argument("--aug-per-mask", type=int, default=1, help="augmented copies of each original mask")
    a.add_argument("--no-original", action="store_true", help="condition on augmented masks only (Table 2, × rows)")
    a.add_argument("--flip-prob", type=float, default=0.5,
                   help="probability of a left-right flip (note: it moves the pancreas to the other side)")
    a.add_argument("--rotate", type=float, default=10.0, help="max in-plane rotation, degrees")
    a.add_argument("--scale", type=float, nargs=2, default=(0.9, 1.1), help="in-plane scaling range")
    a.add_argument("--translate", type=float, default=0.05, help="max in-plane shift, fraction of the size")
    a.add_argument("--elastic-alpha", type=float, default=4.0, help="elastic displacement scale, voxels")
    a.add_argument("--elastic-sigma", type=float, default=8.0, help="elastic smoothness (Gaussian σ), voxels")
    s = p.add_argument_group("sampling (§3.4.2)")
    s.add_argument("--guidance", type=float, default=1.0, help="w in Eq. 4 (paper: 1.0; Table 3 sweeps 0.5-2.0)")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ddpm: ancestral, all T steps (paper)")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seed", type=int, default=0, help="sample i uses seed (seed, i)")
    s.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    s.add_argument("--device", default="auto")
    s.add_argument("--compile", action="store_true", help="torch.compile the denoiser's U-Net (GPU, many samples)")
    p.add_argument("--overwrite", action="store_true", help="redo samples that already exist (default: skip them)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- augmentation
def augment_mask(mask, rng, flip_prob=0.5, rotate=10.0, scale=(0.9, 1.1), translate=0.05, alpha=4.0, sigma=8.0):
    """(D, H, W) label mask -> augmented mask and the parameters drawn. Flip (W axis), in-plane
    affine about the centre, smooth elastic field; nearest-neighbour throughout (labels stay labels)."""
    d, h, w = mask.shape
    flip = bool(rng.random() < flip_prob)
    angle = float(rng.uniform(-rotate, rotate))
    s = float(rng.uniform(*scale))
    shift = rng.uniform(-translate, translate, 2) * (h, w)
    out = mask[:, :, ::-1] if flip else mask
    # output (y, x) samples input at centre + R⁻¹ (p - centre - shift) / s  (rotation + scaling + translation)
    th = np.deg2rad(angle)
    rot_inv = np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]]) / s
    c = np.array([(h - 1) / 2, (w - 1) / 2])
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    src = np.einsum("ij,jhw->ihw", rot_inv, np.stack([yy - c[0] - shift[0], xx - c[1] - shift[1]])) + c[:, None, None]
    field = elastic_field(rng, (h, w), alpha, sigma)
    src = src + field
    coords = np.stack([np.broadcast_to(np.arange(d)[:, None, None], (d, h, w)),
                       np.broadcast_to(src[0], (d, h, w)), np.broadcast_to(src[1], (d, h, w))])
    out = ndimage.map_coordinates(np.ascontiguousarray(out), coords, order=0, mode="constant", cval=0).astype(mask.dtype)
    return out, {"flip": flip, "rotate_deg": round(angle, 3), "scale": round(s, 4),
                 "shift": [round(float(v), 3) for v in shift], "elastic_alpha": alpha, "elastic_sigma": sigma}


def elastic_field(rng, shape, alpha, sigma):
    """A smooth random in-plane displacement field (2, H, W): white noise, Gaussian-smoothed,
    scaled so its largest displacement is `alpha` voxels."""
    f = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in range(2)])
    return f * (alpha / max(np.abs(f).max(), 1e-8))


def condition_plan(names, n, aug_per_mask, original):
    """The list of (sample id, source case, augmentation index or None) for n samples:
    cycle over [original?, aug 1..K] × cases."""
    variants = ([None] if original else []) + list(range(1, aug_per_mask + 1))
    if not variants:
        raise SystemExit("error: --no-original needs --aug-per-mask >= 1")
    pool = [(c, v) for v in variants for c in names]
    return [(f"sample_{i:05d}", *pool[i % len(pool)]) for i in range(n)]


# --------------------------------------------------------------------------- sampling
def per_sample_noise(generators, shape, device):
    """Noise for a batch drawn sample by sample, each from its own generator: a sample's
    trajectory does not depend on its batch-mates."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample_latents(dm, diffusion, denoiser, cond, shape, w, sampler, steps, generators, device, precision):
    """DDPM (ancestral, all T steps) or DDIM (deterministic, `steps` steps, η = 0), guided by Eq. 4."""
    z = per_sample_noise(generators, shape, device)
    ts = list(reversed(range(diffusion.T))) if sampler == "ddpm" else \
        sorted(set(np.linspace(0, diffusion.T - 1, steps).round().astype(int).tolist()), reverse=True)
    for k, i in enumerate(ts):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        with precision.autocast():
            eps = dm.guided_eps(denoiser, z, t, cond, w).float()
        if sampler == "ddpm":
            z = diffusion.p_step(z, t, eps, per_sample_noise(generators, shape, device))
        else:
            z = ddim_step(diffusion, z, t, eps, ts[k + 1] if k + 1 < len(ts) else -1)
    return z


def ddim_step(diffusion, z, t, eps, t_prev):
    """DDIM (Song et al. 2021), η = 0: x̂0 (clipped), ε recomputed from it, then z at t_prev."""
    ab = diffusion._at(diffusion.alphas_cumprod, t, z)
    x0 = diffusion.predict_x0(z, t, eps).clamp(-1, 1)
    if t_prev < 0:
        return x0
    eps = (z - ab.sqrt() * x0) / (1 - ab).sqrt()
    ab_prev = diffusion.alphas_cumprod[t_prev]
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


# --------------------------------------------------------------------------- main
def main(args):
    dist_, prec = start_run(args.device, args.precision, args.seed)
    device, rank, world = dist_.device, dist_.rank, dist_.world_size
    dm, vq = load_stage("04_diffusion"), load_stage("03_vqgan")
    vqgan = vq.load_vqgan(args.vqgan, device)
    denoiser, diffusion, ck = dm.load_denoiser(args.diffusion, device)
    if args.compile:
        denoiser.unet = torch.compile(denoiser.unet)
    lo_z, hi_z = ck["latent_scale"]
    prep_cfg = json.loads((args.prep / "config.json").read_text())
    hu_lo, hu_hi = prep_cfg["hu"]
    names = json.loads((args.prep / "split.json").read_text())["train"]
    plan = condition_plan(names, args.n or len(names), args.aug_per_mask, not args.no_original)
    mine = [p for i, p in enumerate(plan) if i % world == rank]  # torchrun: shard the samples
    done = lambda sid: (args.out / f"{sid}.nii.gz").exists() and (args.out / f"{sid}_mask.nii.gz").exists()
    todo = [p for p in mine if args.overwrite or not done(p[0])]
    latent_shape = tuple(ck["model_kwargs"]["extractor_kwargs"]["latent_shape"])
    print0(f"{len(plan)} samples in the plan, {len(mine) - len(todo)} of this process's {len(mine)} done already; "
           f"{args.sampler}{'' if args.sampler == 'ddpm' else f'-{args.steps}'}, w = {args.guidance}, "
           f"condition '{ck['model_kwargs']['extractor_kwargs']['mode']}', on {device} ({prec.name})")
    records, t0 = [], time.perf_counter()
    for b in range(0, len(todo), args.batch_size):
        batch = todo[b:b + args.batch_size]
        masks, affines, augs, gens = [], [], [], []
        for sid, case, variant in batch:
            i = int(sid.split("_")[1])
            mask, aff = read_nifti(args.prep / "masks" / f"{case}.nii.gz", None)
            mask = xyz_to_dhw(mask)
            aug = None
            if variant is not None:
                mask, aug = augment_mask(mask, np.random.default_rng([args.seed, i, 1]), args.flip_prob, args.rotate,
                                         tuple(args.scale), args.translate, args.elastic_alpha, args.elastic_sigma)
            masks.append(mask), affines.append(aff), augs.append(aug)
            gens.append(torch.Generator().manual_seed(int(np.random.default_rng([args.seed, i, 2]).integers(2**62))))
        cond = (dm.encode_all(vqgan, [m.astype(np.float32) for m in masks], device).to(device),
                torch.from_numpy(np.stack([dm.betti_vector(m) for m in masks])).to(device))
        z = sample_latents(dm, diffusion, denoiser, cond, (len(batch), *latent_shape), args.guidance, args.sampler,
                           args.steps, gens, device, prec)
        with torch.no_grad(), prec.autocast():
            vols = vqgan.decode(dm.from_unit(z, lo_z, hi_z), quantize=True).float()
        hu = ((vols.clamp(-1, 1) + 1) / 2 * (hu_hi - hu_lo) + hu_lo)[:, 0].round().cpu().numpy().astype(np.int16)
        for (sid, case, variant), v, m, aff, aug in zip(batch, hu, masks, affines, augs):
            write_nifti(args.out / f"{sid}.nii.gz", dhw_to_xyz(v), aff, np.int16)
            write_nifti(args.out / f"{sid}_mask.nii.gz", dhw_to_xyz(m), aff, np.uint8)
            records.append({"id": sid, "case": case, "augmentation": aug, "seed": [args.seed, int(sid.split("_")[1])]})
        dt = time.perf_counter() - t0
        print0(f"{b + len(batch)}/{len(todo)} new samples, {dt / (b + len(batch)):.2f} s/volume")
    if rank == 0:
        old = json.loads((args.out / "samples.json").read_text()) if (args.out / "samples.json").exists() else {}
        old.update({r["id"]: r for r in records})
        save_json(old, args.out / "samples.json")
        shown = [p[0] for p in plan[:4] if (args.out / f"{p[0]}.nii.gz").exists()]
        if shown:
            vols = [(xyz_to_dhw(read_nifti(args.out / f"{s}.nii.gz")[0]) - hu_lo) / (hu_hi - hu_lo) for s in shown]
            ms = [xyz_to_dhw(read_nifti(args.out / f"{s}_mask.nii.gz", None)[0]) for s in shown]
            centres = [np.argwhere(m > 0).mean(0) if (m > 0).any() else None for m in ms]  # through the organ
            save_preview(args.out / "previews.png", vols, ms, shown, vrange=soft_tissue(args.prep), centres=centres)
        dt = time.perf_counter() - t0
        print0(f"wrote {len(records)} new volumes (+ masks) to {args.out}/ "
               f"({dt / max(len(records), 1):.2f} s/volume); {len(plan)} in the plan; preview {args.out / 'previews.png'}")
    teardown_distributed()


if __name__ == "__main__":
    main(get_args())
