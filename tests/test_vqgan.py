"""03_vqgan.py: parameter parity, codebook EMA/restart by hand, locality loss against explicit
crops, metrics in closed form, LPIPS loading, overfitting, resume, DDP."""
import copy
import csv
import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import choose_precision, load_stage, read_nifti, xyz_to_dhw
from conftest import REPO, torchrun

vq = load_stage("03_vqgan")
count = lambda m: sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_reference():
    m = vq.VQGAN()  # Lad config: n_hiddens 16, downsample 4,4,4, embedding_dim 8, n_codes 16384
    got = {"encoder": count(m.encoder), "decoder": count(m.decoder),
           "disc2d": count(vq.PatchGAN(2)), "disc3d": count(vq.PatchGAN(3))}
    print("parameter counts:", got)
    for k, ref in {"encoder": 0.44e6, "decoder": 0.95e6, "disc2d": 2.76e6, "disc3d": 11.05e6}.items():
        assert abs(got[k] / ref - 1) < 0.02, (k, got[k], ref)


def test_shapes_through_encode_quantise_decode():
    torch.manual_seed(0)
    m = vq.VQGAN(n_codes=64).eval()
    x = torch.randn(2, 1, 32, 64, 48)
    z = m.encode(x, quantize=False)
    assert z.shape == (2, 8, 8, 16, 12)
    e, idx, commit, perp = m.codebook(z)
    assert e.shape == z.shape and idx.shape == (2, 8, 16, 12) and idx.max() < 64 and commit.ndim == 0
    assert m.decode(z, quantize=True).shape == x.shape and m(x)[0].shape == x.shape
    # quantised latents are exactly codebook rows
    torch.testing.assert_close(e.movedim(1, -1).reshape(-1, 8), m.codebook.embeddings[idx.reshape(-1)])
    # anisotropic compression
    assert vq.VQGAN(downsample=(2, 4, 4), n_codes=8).encode(x, False).shape == (2, 8, 16, 16, 12)


def test_codebook_ema_update_and_restart_by_hand():
    torch.manual_seed(0)
    cb = vq.Codebook(n_codes=4, dim=2, decay=0.99, restart_threshold=1.0)
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    cb.embeddings.copy_(emb)
    cb.z_avg.copy_(emb)
    cb.N.fill_(1.0)
    cb.initialized.fill_(True)
    cb._need_init = False
    flat = torch.tensor([[0.1, 0.0], [0.9, 0.1], [1.1, -0.1], [0.0, 0.8], [0.2, 1.1], [-0.1, 0.1]])
    z = flat.T.reshape(1, 2, 1, 1, 6)  # (B, C, D, H, W): the six vectors along W
    e, idx, commit, perp = cb(z)
    # nearest codes by hand: 0, 1, 1, 2, 2, 0; code 3 unused
    assert idx.flatten().tolist() == [0, 1, 1, 2, 2, 0]
    counts = np.array([2, 2, 2, 0], float)
    sums = np.array([[0.0, 0.1], [2.0, 0.0], [0.2, 1.9], [0.0, 0.0]])
    N = 0.99 * 1 + 0.01 * counts
    z_avg = 0.99 * emb.numpy() + 0.01 * sums
    n = N.sum()
    expect = z_avg / ((N + 1e-7) / (n + 4e-7) * n)[:, None]
    np.testing.assert_allclose(cb.N.numpy(), N, rtol=1e-6)
    np.testing.assert_allclose(cb.z_avg.numpy(), z_avg, rtol=1e-6)
    np.testing.assert_allclose(cb.embeddings[:3].numpy(), expect[:3], rtol=1e-5)
    # code 3's usage fell to 0.99 < 1: restarted at one of this batch's vectors
    assert any(torch.allclose(cb.embeddings[3], v) for v in flat)
    # commitment: 0.25 · MSE(z, e) with the pre-update codes; perplexity of usage (1/3 each)
    np.testing.assert_allclose(commit.item(), 0.25 * F.mse_loss(flat, emb[idx.flatten()]).item(), rtol=1e-6)
    np.testing.assert_allclose(perp.item(), 3.0, rtol=1e-5)
    # straight-through: the gradient reaches z unchanged
    z = z.clone().requires_grad_(True)
    cb(z)[0].sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_codebook_initialises_from_the_first_batch_and_survives_a_reload():
    torch.manual_seed(0)
    cb = vq.Codebook(n_codes=8, dim=3)
    flat = torch.randn(5, 3)  # fewer vectors than codes: tiled with small jitter
    rows = cb._random_vectors(flat)
    assert rows.shape == (8, 3)
    assert all((flat - r).norm(dim=1).min() < 0.05 for r in rows)
    cb(flat.T.reshape(1, 3, 1, 1, 5))
    assert bool(cb.initialized) and not cb._need_init
    fresh = vq.Codebook(n_codes=8, dim=3)
    fresh.load_state_dict(cb.state_dict())
    assert not fresh._need_init  # a resumed run does not re-initialise


def explicit_locality(x, y, masks):
    """Reference: per sample crop both volumes to the mask's bounding box (np.nonzero), L1 mean;
    average over samples with a non-empty mask."""
    losses = []
    for i, m in enumerate(masks):
        nz = np.nonzero(m)
        if len(nz[0]) == 0:
            continue
        sl = tuple(slice(a.min(), a.max() + 1) for a in nz)
        losses.append(F.l1_loss(x[i, 0][sl], y[i, 0][sl]))
    return torch.stack(losses).mean()


def test_locality_loss_equals_explicit_crops():
    rng = np.random.default_rng(0)
    shape = (8, 12, 10)
    masks = []
    for k in range(4):
        m = np.zeros(shape, np.uint8)
        if k == 1:  # an empty mask contributes nothing
            masks.append(m)
            continue
        lo = rng.integers(0, 4, 3)
        hi = lo + rng.integers(2, 6, 3)
        if k == 2:
            hi[:] = shape  # a box touching the volume's far border
            lo[0] = 0      # ... and the near one
        m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = (rng.random(tuple(hi - lo)) > 0.3) + 1
        m[lo[0], lo[1], lo[2]] = 2
        m[hi[0] - 1, hi[1] - 1, hi[2] - 1] = 1
        masks.append(m)
    boxes = torch.tensor([vq.mask_box(m) or [0] * 6 for m in masks])
    has = torch.tensor([vq.mask_box(m) is not None for m in masks], dtype=torch.float)
    x, y = torch.randn(4, 1, *shape), torch.randn(4, 1, *shape)
    got = vq.locality_loss(x, y, boxes, has)
    torch.testing.assert_close(got, explicit_locality(x, y, masks))
    assert vq.locality_loss(x, y, boxes, torch.zeros(4)).item() == 0.0  # no box in the batch: zero


def test_metrics_in_closed_form():
    # float64: the variance of a constant, E[a²] − E[a]², cancels to float32 rounding noise
    # (≈ 2e-5 in SSIM), which depends on the CPU's convolution kernels
    a = torch.full((1, 1, 12, 16, 16), 0.3, dtype=torch.float64)
    b = torch.full((1, 1, 12, 16, 16), 0.5, dtype=torch.float64)
    c1 = 0.01**2
    expected = torch.tensor((2 * 0.3 * 0.5 + c1) / (0.09 + 0.25 + c1), dtype=torch.float64)
    torch.testing.assert_close(vq.ssim_and_cs(a, b)[0], expected.view(1, 1))
    x = torch.rand(1, 1, 12, 16, 16)
    torch.testing.assert_close(vq.ssim_and_cs(x, x)[0], torch.ones(1, 1))
    assert abs(vq.psnr(x, x + 0.1) - 20.0) < 1e-4
    m = torch.zeros_like(x, dtype=torch.bool)
    m[..., :4, :4, :4] = True
    y = x.clone()
    y[~m] += 0.5
    assert (vq.psnr(x, y, m) > 100
            and abs(vq.psnr(x, y) - 10 * np.log10(1 / (0.25 * (~m).float().mean().item()))) < 1e-3)


def vgg_and_lin_tables():
    """torchvision VGG16 `features` and LPIPS v0.1 linear-layer names and shapes, written out."""
    convs = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
             14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
             26: (512, 512), 28: (512, 512)}
    vgg = {}
    for i, (o, c) in convs.items():
        vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"] = (o, c, 3, 3), (o,)
    vgg["classifier.0.weight"] = (16, 8)  # the file also has the classifier (small stand-in): ignored
    lin = {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    return vgg, lin


def test_lpips_loads_torchvision_and_lpips_files(tmp_path, monkeypatch):
    vgg, lin = vgg_and_lin_tables()
    g = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(s, generator=g) * 0.05 for k, s in vgg.items()},
               tmp_path / "vgg16-397923af.pth")
    torch.save({k: torch.rand(s, generator=g) for k, s in lin.items()}, tmp_path / "vgg.pth")
    model = vq.load_lpips(str(tmp_path))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.all(model(a, a) == 0) and torch.all(model(a, b) > 0)
    (tmp_path / "vgg.pth").unlink()
    with pytest.raises(SystemExit, match="--perceptual-weight 0"):
        vq.load_lpips(str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit, match="cannot get the LPIPS/VGG16 weights"):
        vq.load_lpips("auto")
    # the paper's default weight without weight files: a clear error before any work
    r = subprocess.run([sys.executable, str(REPO / "03_vqgan.py"), "--prep", str(tmp_path)],
                       capture_output=True, text=True)
    assert (r.returncode != 0 and "--perceptual-weights DIR" in r.stderr
            and "--perceptual-weight 0" in r.stderr)


def two_phantom_volumes(small_prep):
    split = json.loads((small_prep / "split.json").read_text())
    vols = [xyz_to_dhw(read_nifti(small_prep / "images" / f"{n}.nii.gz")[0]) for n in split["train"][:2]]
    x = torch.from_numpy(np.stack(vols)[:, None]) * 2 - 1
    return x[:, :, :, 24:72, 24:72].contiguous()  # (2, 1, 16, 48, 48), the abdomen's centre


# 90 s on 2 cores; `make demo` checks the same at a larger scale in CI (held-out PSNR >= 20 dB)
@pytest.mark.slow
def test_tiny_model_overfits_two_phantoms(small_prep):
    torch.manual_seed(0)
    x = two_phantom_volumes(small_prep)
    m = vq.VQGAN(n_hiddens=8, n_codes=64, num_groups=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(150):
        rec, commit, _ = m(x)
        l1 = F.l1_loss(rec, x)
        opt.zero_grad()
        (4 * l1 + commit).backward()
        opt.step()
        losses.append(l1.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"overfit 2 phantoms (16×48×48): L1 {first:.4f} -> {last:.4f} in 150 steps")
    assert last < 0.5 * first


def train_cmd(prep, out, *extra):
    return [sys.executable, str(REPO / "03_vqgan.py"), "--prep", str(prep), "--out", str(out),
            "--n-hiddens", "8", "--num-groups", "8", "--n-codes", "32", "--disc-channels", "8",
            "--perceptual-weight", "0", "--disc-start", "3", "--batch-size", "2", "--log-every", "1",
            "--save-every", "4", "--device", "cpu", *extra]


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resume_equals_uninterrupted(tmp_path, masked_prep):
    r = subprocess.run(train_cmd(masked_prep, tmp_path / "a", "--steps", "8"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "step 1 took" in r.stdout and "7 steps more at this pace" in r.stdout  # the first step's line
    r = subprocess.run(train_cmd(masked_prep, tmp_path / "b", "--steps", "4"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    torn = tmp_path / "b" / f".ckpt.pt.{dead.pid}.tmp.pt"  # what a kill -9 during a save leaves
    torn.write_bytes(b"half a checkpoint")
    r = subprocess.run(train_cmd(masked_prep, tmp_path / "b", "--steps", "8"), capture_output=True, text=True)
    assert r.returncode == 0 and "resumed from" in r.stdout and "at step 4" in r.stdout, r.stderr
    assert "step 5 took" in r.stdout and "3 steps more at this pace" in r.stdout
    assert not torn.exists()
    a, b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    assert [row["step"] for row in b] == [str(s) for s in range(1, 9)]
    keys = ["l1", "commitment", "g_image", "g_volume", "feat_match", "locality", "d_loss", "perplexity"]
    for ra, rb in zip(a, b):
        for k in keys:
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-5, abs=1e-7), (ra["step"], k)
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert ca["step"] == cb["step"] == 8
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k])
    # the checkpoint alone rebuilds the autoencoder; metrics were written
    m = vq.load_vqgan(tmp_path / "b" / "ckpt.pt")
    assert m.kwargs == cb["model_kwargs"] and not m.training
    met = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert met["n_test"] == 2 and met["psnr"] > 0 and met["psnr_box"] is not None
    assert list((tmp_path / "b" / "previews").glob("step*.png"))


def test_ddp_two_gloo_processes_agree(tmp_path, masked_prep):
    r = torchrun(train_cmd(masked_prep, tmp_path / "ddp", "--steps", "4", "--fresh"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[:6000]
    assert ("2 process(es)" in r.stdout
            and "DDP check: max weight difference across 2 ranks = 0" in r.stdout), r.stdout


def test_train_step_sends_each_loss_to_its_own_weights():
    """One pass of each discriminator serves both losses: with plain SGD (lr 1, no clipping) every weight
    moves by minus the gradient of its own loss, computed here the long way (the discriminators frozen
    for the generator's loss; fresh passes on x and the detached x̂ for the hinge loss)."""
    args = vq.get_args(["--perceptual-weights", "auto", "--n-hiddens", "8", "--num-groups", "8", "--n-codes",
                        "32", "--disc-channels", "8", "--perceptual-weight", "0", "--grad-clip", "0"])
    torch.manual_seed(0)
    model = vq.VQGAN(args.n_hiddens, args.downsample, args.embedding_dim, args.n_codes,
                     args.num_groups).eval()
    d2, d3 = vq.PatchGAN(2, args.disc_channels, args.disc_layers), vq.PatchGAN(3, args.disc_channels,
                                                                             args.disc_layers)
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    boxes = torch.tensor([[4, 12, 4, 12, 4, 12], [0, 8, 2, 10, 6, 14]])
    has_box = torch.ones(2, dtype=torch.bool)
    r_model, r2, r3 = (copy.deepcopy(m) for m in (model, d2, d3))
    torch.manual_seed(3)  # the long way: the codebook is fixed in eval mode, so x̂ is the step's
    x_rec, commitment, _ = r_model(x)
    z, b = torch.randint(x.shape[2], (2,)), torch.arange(2)
    sl, sl_rec = x[b, :, z], x_rec[b, :, z]
    r2.requires_grad_(False), r3.requires_grad_(False)
    (lf2, ff2), (lf3, ff3) = r2(sl_rec), r3(x_rec)
    with torch.no_grad():
        fr = r2(sl)[1][:-1] + r3(x)[1][:-1]
    feat = sum(4 / (args.disc_layers + 1) * F.l1_loss(a, r) for a, r in zip(ff2[:-1] + ff3[:-1], fr))
    g_loss = (args.l1_weight * F.l1_loss(x_rec, x) + commitment - args.image_gan_weight * lf2.mean()
              - args.volume_gan_weight * lf3.mean() + args.gan_feat_weight * feat
              + args.lambda_loc * vq.locality_loss(x, x_rec, boxes, has_box))
    g_grads = torch.autograd.grad(g_loss, list(r_model.parameters()), allow_unused=True)
    r2.requires_grad_(True), r3.requires_grad_(True)
    hinge = lambda real, fake: 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    d_loss = (args.image_gan_weight * hinge(r2(sl)[0], r2(sl_rec.detach())[0])
              + args.volume_gan_weight * hinge(r3(x)[0], r3(x_rec.detach())[0]))
    d_grads = torch.autograd.grad(d_loss, [*r2.parameters(), *r3.parameters()])

    ae, disc = list(model.parameters()), [*d2.parameters(), *d3.parameters()]
    before = [p.detach().clone() for p in ae + disc]
    opts = torch.optim.SGD(ae, lr=1.0), torch.optim.SGD(disc, lr=1.0)
    torch.manual_seed(3)
    prec = choose_precision("cpu")
    _, stats = vq.train_step((model, d2, d3), opts, None, prec, x, boxes, has_box, True, args)
    torch.testing.assert_close(stats[7], d_loss.detach(), rtol=1e-5, atol=1e-6)
    for p0, p, g in zip(before, ae + disc, [*g_grads, *d_grads]):
        moved = torch.zeros_like(p0) if g is None else g
        torch.testing.assert_close(p0 - p.detach(), moved, rtol=1e-4, atol=1e-6)
    assert any(g is not None and g.abs().max() > 0 for g in d_grads) and g_grads[0].abs().max() > 0
