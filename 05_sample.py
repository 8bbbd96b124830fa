"""05 · Locality condition augmentation and guided sampling to NIfTI (paper §3.4, Fig. 2c).

Reads  --prep (default data/prep): masks/ (02, the original mask set), images/ (for the affines),
       split.json, config.json (01's HU window); --vqgan (03) and --diffusion (04) checkpoints.
Writes --out (default runs/samples):
    <id>.nii.gz          int16 HU volume, the affine of the preprocessed case its mask came from
    <id>_mask.nii.gz     the mask it was conditioned on, uint8 0/1/2
    <id>.json            its record: the source case of the mask, original or augmented (and how), seed
    samples.json         the set: its composition (originals, augmented), the settings, every record
    config.json          the settings and the checkpoints' fingerprints (a rerun with others is refused)
    previews.png         the first samples through their organ's centroid, masks outlined

A set's composition is explicit (§3.4.1, §4.4): --n-original samples on 02's masks as they are, then
--n-augmented on augmented copies. A set is as large as the training set (§4.2) unless both are
given; by default half and half: the "augmented mask set" (originals plus augmented) that Table 1
and the ✓ rows of Table 2 are sampled from. Table 2's × rows ("unseen" masks) are --n-original 0;
Table 3 samples 256 augmented masks for every w (--n-original 0 --n-augmented 256; the same masks
for every w, as each depends only on --seed and its index). The originals take the training cases in
order, the augmented ones continue from there, so each case serves once before any serves twice.

Augmentation (§3.4.1): a flip, a random in-plane affine (rotation, scaling, translation) and a
random elastic deformation (a smooth displacement field), all nearest-neighbour (scipy), so no new
label appears. Conditions come from 04's extractor; sampling uses the EMA weights and Eq. 4 exactly,
ε̃ = (1 + w)·ε(z, c) − w·ε(z), both passes in one doubled batch (two for large batches on a CPU; the
release skipped the formula at w = 1).

Each sample has its own seed, so it is reproducible on its own, whatever the batch. Reruns skip
finished samples; under torchrun, samples are shared out across GPUs.

    python 05_sample.py                   # training-set size, half augmented, DDPM-300, w = 1
    python 05_sample.py --sampler ddim --steps 50 --out runs/samples_ddim      # fast: DDIM-50
    python 05_sample.py --n-original 0    # "unseen" masks only, as many (Table 2, ×)
    python 05_sample.py --n-original 0 --n-augmented 256 --guidance 1.5 --out runs/samples_w1.5   # Table 3
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common import (MASK_NAMES, ArgumentParser, at_least, check_order, dhw_to_xyz, eta, file_fingerprint,
                    guard_settings, in_range, load_stage, positive, prepare_out, print0, read_nifti,
                    read_split, run_stage, save_json, save_preview, sizing_note, soft_tissue, start_run,
                    teardown_distributed, write_nifti, xyz_to_dhw)


def get_args(argv=None):
    p = ArgumentParser(__doc__.split("\n")[0])
    p.add_argument("--prep", type=Path, default=Path("data/prep"))
    p.add_argument("--vqgan", type=Path, default=Path("runs/vqgan/ckpt.pt"))
    p.add_argument("--diffusion", type=Path, default=Path("runs/diffusion/ckpt.pt"))
    p.add_argument("--out", type=Path, default=Path("runs/samples"))
    a = p.add_argument_group("the set's composition and condition augmentation (§3.4.1)")
    a.add_argument("--n-original", type=at_least(0), default=None,
                   help="samples conditioned on original masks (default: half the training set's size, "
                        "rounded up, or what --n-augmented leaves of it)")
    a.add_argument("--n-augmented", type=at_least(0), default=None,
                   help="samples conditioned on augmented masks (default: the other half, or what "
                        "--n-original leaves of the training set's size, §4.2)")
    a.add_argument("--flip-prob", type=in_range(0, 1), default=0.5,
                   help="probability of a left-right flip (note: it moves the pancreas to the other side)")
    a.add_argument("--rotate", type=at_least(0.0, float), default=10.0, help="max in-plane rotation, degrees")
    a.add_argument("--scale", type=positive, nargs=2, default=(0.9, 1.1), help="in-plane scaling range")
    a.add_argument("--translate", type=in_range(0, 1), default=0.05,
                   help="max in-plane shift, fraction of the size")
    a.add_argument("--elastic-alpha", type=at_least(0.0, float), default=4.0,
                   help="elastic displacement scale, voxels")
    a.add_argument("--elastic-sigma", type=positive, default=8.0,
                   help="elastic smoothness (Gaussian σ), voxels")
    s = p.add_argument_group("sampling (§3.4.2)")
    s.add_argument("--guidance", type=at_least(0.0, float), default=1.0,
                   help="w in Eq. 4 (paper: 1.0; Table 3 sweeps 0.5-2.0)")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: ancestral, all T steps (paper)")
    s.add_argument("--steps", type=at_least(1), default=50, help="DDIM steps")
    s.add_argument("--batch-size", type=at_least(1), default=4)
    s.add_argument("--seed", type=int, default=0, help="sample i uses seed (seed, i)")
    s.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    s.add_argument("--device", default="auto")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser's U-Net (GPU, many samples)")
    p.add_argument("--previews", action=argparse.BooleanOptionalAction, default=True,
                   help="write previews.png (the first samples through their organ)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo samples that already exist and accept changed settings (default: skip them)")
    args = p.parse_args(argv)
    check_order(p, args, "--scale", strict=False)
    if args.n_original == 0 and args.n_augmented == 0:
        p.error("argument --n-augmented: with --n-original 0 too, a set of no samples")
    return args


# --------------------------------------------------------------------------- augmentation
def augment_mask(mask, rng, flip_prob=0.5, rotate=10.0, scale=(0.9, 1.1), translate=0.05, alpha=4.0,
                 sigma=8.0):
    """(D, H, W) mask -> (augmented, parameters drawn); W-axis flip, affine about the centre."""
    d, h, w = mask.shape
    flip = bool(rng.random() < flip_prob)
    angle = float(rng.uniform(-rotate, rotate))
    s = float(rng.uniform(*scale))
    shift = rng.uniform(-translate, translate, 2) * (h, w)
    out = mask[:, :, ::-1] if flip else mask
    # output (y, x) samples input at centre + R⁻¹ (p - centre - shift) / s, + the elastic field
    th = np.deg2rad(angle)
    rot_inv = np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]]) / s
    c = np.array([(h - 1) / 2, (w - 1) / 2])
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    src = (np.einsum("ij,jhw->ihw", rot_inv, np.stack([yy - c[0] - shift[0], xx - c[1] - shift[1]]))
           + c[:, None, None] + elastic_field(rng, (h, w), alpha, sigma))
    coords = np.stack([np.broadcast_to(np.arange(d)[:, None, None], (d, h, w)),
                       np.broadcast_to(src[0], (d, h, w)), np.broadcast_to(src[1], (d, h, w))])
    out = ndimage.map_coordinates(np.ascontiguousarray(out), coords, order=0, mode="constant",
                                  cval=0).astype(mask.dtype)
    return out, {"flip": flip, "rotate_deg": round(angle, 3), "scale": round(s, 4),
                 "shift": [round(float(v), 3) for v in shift], "elastic_alpha": alpha, "elastic_sigma": sigma}


def elastic_field(rng, shape, alpha, sigma):
    """(2, H, W) smooth in-plane displacement: Gaussian-smoothed white noise, max `alpha` voxels."""
    f = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
                  for _ in range(2)])
    return f * (alpha / max(np.abs(f).max(), 1e-8))


def composition(n_original, n_augmented, n_train):
    """(originals, augmented): n_train in all (§4.2) unless both given; half each if neither is."""
    if n_original is None and n_augmented is None:
        return n_train - n_train // 2, n_train // 2
    if n_original is None:
        return max(n_train - n_augmented, 0), n_augmented
    if n_augmented is None:
        return n_original, max(n_train - n_original, 0)
    return n_original, n_augmented


def condition_plan(names, n_original, n_augmented):
    """[(sample id, source case, augmented?)]: the cases in order, cycling, originals first."""
    return [(f"sample_{i:05d}", names[i % len(names)], i >= n_original)
            for i in range(n_original + n_augmented)]


# --------------------------------------------------------------------------- main
def main(args):
    run, prec = start_run(args.device, args.precision, args.seed)
    device, rank, world = run.device, run.rank, run.world_size
    if rank == 0:
        prepare_out(args.out, [args.prep, args.vqgan, args.diffusion])
    diffusion = load_stage("04_diffusion")
    vqgan = load_stage("03_vqgan").load_vqgan(args.vqgan, device)
    denoiser, ddpm, ckpt = diffusion.load_denoiser(args.diffusion, device)
    vqgan_sha1 = file_fingerprint(args.vqgan)
    if ckpt.get("vqgan_sha1", vqgan_sha1) != vqgan_sha1:  # latents mean something only to their own VQ-GAN
        raise SystemExit(f"error: --diffusion {args.diffusion} was trained on the latents of another VQ-GAN "
                         f"than --vqgan {args.vqgan} (it names {ckpt['vqgan']}); pass that one")
    if args.compile:
        denoiser.unet = torch.compile(denoiser.unet)
    lo_z, hi_z = ckpt["latent_scale"]
    if not (args.prep / "config.json").is_file():
        raise SystemExit(f"error: {args.prep / 'config.json'} not found: --prep must be 01's output")
    hu_lo, hu_hi = json.loads((args.prep / "config.json").read_text())["hu"]
    names = read_split(args.prep, masks=True)["train"]
    if not names:
        raise SystemExit(f"error: {args.prep}: no training case with a 02 mask, so no mask to condition on")
    latent_shape = tuple(ckpt["model_kwargs"]["extractor_kwargs"]["latent_shape"])
    made = [n * f for n, f in zip(latent_shape[1:], vqgan.kwargs["downsample"])]  # (D, H, W) of a sample
    grid = list(xyz_to_dhw(read_nifti(args.prep / "masks" / f"{names[0]}.nii.gz", None)[0]).shape)
    if grid != made:  # the masks give each sample its place in the world (affine): they must fit
        raise SystemExit(f"error: --prep {args.prep} holds volumes of shape {grid} (D, H, W); the models "
                         f"make {made}: pass the --prep they were trained on")
    n_original, n_augmented = composition(args.n_original, args.n_augmented, len(names))
    plan = condition_plan(names, n_original, n_augmented)
    # what makes this folder: a rerun with other settings or checkpoints would mix two sets (refused)
    settings = {k: getattr(args, k) for k in ("flip_prob", "rotate", "scale", "translate", "elastic_alpha",
                                              "elastic_sigma", "guidance", "sampler", "seed")}
    settings.update(steps=args.steps if args.sampler == "ddim" else ddpm.T, n_original=n_original,
                    n_augmented=n_augmented, prep=str(args.prep.resolve()), vqgan=vqgan_sha1,
                    masks=file_fingerprint(args.prep / "masks" / "config.json")  # 02 redone: other conditions
                    if (args.prep / "masks" / "config.json").is_file() else None,
                    diffusion=file_fingerprint(args.diffusion))
    if rank == 0:
        guard_settings(args.out / "config.json", settings, args.overwrite)
        planned = {sid for sid, _, _ in plan}
        stale = [f for f in args.out.glob("sample_*")
                 if f.name.split(".")[0].removesuffix("_mask") not in planned]
        if stale and args.overwrite:  # an earlier, larger plan's samples would count in this set
            for f in stale:
                f.unlink()
            print0(f"removed {len(stale)} files of samples outside the new plan from {args.out}")
    mine = [p for i, p in enumerate(plan) if i % world == rank]  # torchrun: shard the samples
    done = lambda sid: all((args.out / f"{sid}{ext}").exists()
                           for ext in (".nii.gz", "_mask.nii.gz", ".json"))
    todo = [p for p in mine if args.overwrite or not done(p[0])]
    print0(f"{len(plan)} samples in the plan ({n_original} on original masks, {n_augmented} on "
           f"augmented masks), {len(mine) - len(todo)} of this process's {len(mine)} done already; "
           f"{args.sampler}{'' if args.sampler == 'ddpm' else f'-{args.steps}'}, w = {args.guidance}, "
           f"condition '{ckpt['model_kwargs']['extractor_kwargs']['mode']}'"
           f"{' + the mask as channels' if ckpt['model_kwargs'].get('spatial') else ''}, "
           f"on {device} ({prec.name})")
    if latent_shape[-1] * latent_shape[-2] >= 32 * 32:  # the paper's latents are 8×8×64×64
        sizing_note(device, "×".join(map(str, latent_shape)) + f" latents, {args.sampler}",
                    "the checkpoints of `make demo` (8×4×16×16 latents), --sampler ddim --steps 50")
    n_new, t0 = 0, time.perf_counter()
    for b in range(0, len(todo), args.batch_size):
        batch = todo[b:b + args.batch_size]
        masks, affines, records, gens = [], [], [], []
        for sid, case, augmented in batch:
            i = int(sid.split("_")[1])
            mask, affine = read_nifti(args.prep / "masks" / f"{case}.nii.gz", None)
            mask = xyz_to_dhw(mask)                                                   # (D, H, W) labels
            how = None
            if augmented:
                mask, how = augment_mask(mask, np.random.default_rng([args.seed, i, 1]),
                                         args.flip_prob, args.rotate, tuple(args.scale),
                                         args.translate, args.elastic_alpha, args.elastic_sigma)
            masks.append(mask)
            affines.append(affine)
            records.append({"id": sid, "case": case, "mask": "augmented" if augmented else "original",
                            "augmentation": how, "seed": [args.seed, i]})
            gens.append(torch.Generator().manual_seed(
                int(np.random.default_rng([args.seed, i, 2]).integers(2**62))))
        cond = tuple(c.to(device) for c in diffusion.locality_condition(vqgan, masks, device))  # Eq. 3's c
        z = diffusion.sample_latents(ddpm, denoiser, cond, (len(batch), *latent_shape),
                              args.guidance, args.sampler, args.steps, gens, device, prec,
                              desc=f"batch {b // args.batch_size + 1}")
        with torch.no_grad(), prec.autocast():
            vols = vqgan.decode(diffusion.latents_from_unit(z, lo_z, hi_z), quantize=True).float()
        if not torch.isfinite(vols).all():  # never write (and so never score) a volume of NaN
            raise SystemExit(f"error: sampling {batch[0][0]}... gave NaN or inf: the checkpoints or "
                             f"--precision {prec.name} are not usable; nothing of this batch was written")
        hu = (((vols.clamp(-1, 1) + 1) / 2 * (hu_hi - hu_lo) + hu_lo)[:, 0]
              .round().cpu().numpy().astype(np.int16))
        for rec, vol, mask, affine in zip(records, hu, masks, affines):
            sid = rec["id"]
            write_nifti(args.out / f"{sid}.nii.gz", dhw_to_xyz(vol), affine, np.int16)
            write_nifti(args.out / f"{sid}_mask.nii.gz", dhw_to_xyz(mask), affine, np.uint8)
            save_json(rec, args.out / f"{sid}.json")  # last: a sample is done when its record exists
        n_new += len(batch)
        per_volume = (time.perf_counter() - t0) / n_new
        print0(f"{n_new}/{len(todo)} new samples, {per_volume:.2f} s/volume, "
               f"{eta(1000 * per_volume, len(todo) - n_new)}")
    if world > 1:
        torch.distributed.barrier()  # every rank's samples are written before rank 0 indexes them
    if rank == 0:
        records = {sid: json.loads((args.out / f"{sid}.json").read_text()) for sid, _, _ in plan if done(sid)}
        counts = {kind: sum(r["mask"] == kind for r in records.values())
                  for kind in ("original", "augmented")}
        save_json({"composition": {"original": n_original, "augmented": n_augmented}, "written": counts,
                   "n_train": len(names), "settings": settings, "samples": records},
                  args.out / "samples.json")
        shown = [p[0] for p in plan[:4] if done(p[0])] if args.previews else []
        if shown:
            vols = [(xyz_to_dhw(read_nifti(args.out / f"{s}.nii.gz")[0]) - hu_lo) / (hu_hi - hu_lo)
                    for s in shown]
            ms = [xyz_to_dhw(read_nifti(args.out / f"{s}_mask.nii.gz", None)[0]) for s in shown]
            centres = [np.argwhere(m > 0).mean(0) if (m > 0).any() else None for m in ms]  # through the organ
            save_preview(args.out / "previews.png", vols, ms, shown, vrange=soft_tissue(args.prep),
                         centres=centres, names=MASK_NAMES)
        dt = time.perf_counter() - t0
        print0(f"wrote {n_new} new volumes (+ masks) to {args.out}/ ({dt / max(n_new, 1):.2f} s/volume); "
               f"the set holds {counts['original']} on original and {counts['augmented']} on augmented masks "
               f"({len(plan)} planned); index {args.out / 'samples.json'}"
               + (f"; preview {args.out / 'previews.png'}" if shown else ""))
    teardown_distributed()


if __name__ == "__main__":
    run_stage(main, get_args)
