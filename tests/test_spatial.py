"""04 --spatial (beyond the paper): the mask's latent joins z_t as channels. A change of the mask acts
where it happened, the null map learns, guidance applies, and a checkpoint rebuilds and samples."""
import json
import subprocess
import sys

import torch

from common import load_stage, save_checkpoint
from conftest import REPO

dm = load_stage("04_diffusion")


def tiny(mode="none", spatial=True, shape=(8, 4, 16, 16)):
    torch.manual_seed(0)
    return dm.Denoiser(dict(mode=mode, latent_shape=shape, depth=4),
                       dict(channels=8, dim=8, dim_mults=(1, 2), heads=2, dim_head=8), spatial)


def inside_over_outside(model):
    """Mean |Δε| where a 4×4 patch of the mask latent changed (all slices) over the mean at the border,
    2 or more latent voxels away from it."""
    g = torch.Generator().manual_seed(1)
    z, ml = torch.randn(2, 8, 4, 16, 16, generator=g), torch.randn(2, 8, 4, 16, 16, generator=g)
    betti = torch.randint(0, 3, (2, 24), generator=g)
    ml2 = ml.clone()
    ml2[..., 6:10, 6:10] += 3 * torch.randn(2, 8, 4, 4, 4, generator=g)
    t = torch.tensor([5, 40])
    with torch.no_grad():
        delta = (model(z, t, ml2, betti) - model(z, t, ml, betti)).abs().mean((0, 1, 2))  # (H, W)
    far = torch.ones(16, 16, dtype=torch.bool)
    far[2:14, 2:14] = False
    return (delta[6:10, 6:10].mean() / delta[far].mean()).item()


def test_a_mask_change_acts_where_it_happened():
    spatial, paper = inside_over_outside(tiny().eval()), inside_over_outside(tiny("content", False).eval())
    print(f"|Δε| inside the changed patch / far from it: spatial {spatial:.1f}, "
          f"the paper's vector {paper:.1f}")
    assert spatial > 4 and spatial > 2 * paper  # the vector's change reaches everywhere through the embedding


def test_the_null_map_learns_and_guidance_applies():
    d = tiny()
    diff = dm.GaussianDiffusion(50)
    assert d.unet.init_conv.in_channels == 16 and d.null_map.shape == (1, 8, 4, 16, 16) and d.conditional
    z0, ml, b = torch.randn(4, 8, 4, 16, 16), torch.randn(4, 8, 4, 16, 16), torch.randint(0, 3, (4, 24))
    diff.loss(d, z0, (ml, b), p_uncond=1.0).backward()  # every condition dropped: only the null map is seen
    assert d.null_map.grad.abs().sum() > 0
    d.zero_grad()
    diff.loss(d, z0, (ml, b), p_uncond=0.0).backward()
    assert d.null_map.grad is None or d.null_map.grad.abs().sum() == 0
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        diff.loss(d, z0, (ml, b), p_uncond=0.5, generator=torch.Generator().manual_seed(0)).backward()
        opt.step()
    assert d.null_map.abs().max() > 0, "the null map moved from its start at zero"
    # Eq. 4 with the map alone (no vector): w is not ignored, and the dropped pass sees the null map
    d.eval()
    t = torch.full((4,), 10)
    with torch.no_grad():
        c, u = d(z0, t, ml, b), d(z0, t, ml, b, drop=torch.ones(4, dtype=torch.bool))
        torch.testing.assert_close(u, d.unet(torch.cat([z0, d.null_map.expand_as(ml)], 1), t))
        torch.testing.assert_close(dm.guided_eps(d, z0, t, (ml, b), 1.0), 2 * c - u, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c, u)


def test_spatial_checkpoint_rebuilds_and_samples(tmp_path, masked_prep):
    vq = load_stage("03_vqgan")
    torch.manual_seed(0)
    m = vq.VQGAN(n_hiddens=8, n_codes=32, num_groups=8)
    save_checkpoint({"step": 0, "model_kwargs": m.kwargs, "model": m.state_dict()}, tmp_path / "vq.pt")
    cmd = lambda steps, *extra: [
        sys.executable, str(REPO / "04_diffusion.py"), "--prep", str(masked_prep),
        "--vqgan", str(tmp_path / "vq.pt"), "--out", str(tmp_path / "diff"), "--dim", "8",
        "--dim-mults", "1", "2", "--attn-heads", "2", "--attn-dim-head", "8", "--timesteps", "10",
        "--batch-size", "2", "--steps", str(steps), "--save-every", "2",
        "--ema-start", "1", "--ema-every", "1", "--device", "cpu", "--workers", "1", *extra]
    r = subprocess.run(cmd(2, "--spatial", "--cond", "both"), capture_output=True, text=True)
    assert r.returncode == 0 and "the mask as channels" in r.stdout, r.stderr[-2000:]
    model, diff, ck = dm.load_denoiser(tmp_path / "diff" / "ckpt.pt")
    assert ck["model_kwargs"]["spatial"] and model.null_map is not None and model.extractor.dim > 0
    for k, v in model.state_dict().items():  # the EMA weights, every one of them placed
        torch.testing.assert_close(v, ck["ema"][k])
    # the same folder without --spatial is another model: the resume is refused
    r = subprocess.run(cmd(4, "--cond", "both"), capture_output=True, text=True)
    assert r.returncode != 0 and "'spatial': True" in r.stderr and "--fresh" in r.stderr, r.stderr[-2000:]
    # 05 samples from it unchanged
    r = subprocess.run([sys.executable, str(REPO / "05_sample.py"), "--prep", str(masked_prep), "--vqgan",
                        str(tmp_path / "vq.pt"), "--diffusion", str(tmp_path / "diff" / "ckpt.pt"), "--out",
                        str(tmp_path / "s"), "--n-original", "1", "--n-augmented", "1", "--sampler", "ddim",
                        "--steps", "3", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0 and "+ the mask as channels" in r.stdout, r.stderr[-2000:]
    written = json.loads((tmp_path / "s" / "samples.json").read_text())["written"]
    assert written == {"original": 1, "augmented": 1}


def test_the_comparison_table_averages_the_seeds(tmp_path):
    """scripts/spatial_compare.py's table from two hand-made 06 outputs: the mean, each seed, a gap."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("spatial_compare", REPO / "scripts" / "spatial_compare.py")
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    row = lambda v: {"fid": v, "mmd": v, "fid_local": v, "mmd_local": v, "ms_ssim": v,
                     "fidelity": {"dice_organ": v, "dice_tumour": None}, "contrast": {"own_hu": 10 * v,
                                                                                      "shuffled_hu": v}}
    for seed, v in ((0, 0.2), (1, 0.4)):
        (tmp_path / f"seed{seed}" / "eval").mkdir(parents=True)
        results = {name: row(v + i) for i, name in enumerate(["real", *sc.MODELS])}
        (tmp_path / f"seed{seed}" / "eval" / "metrics.json").write_text(json.dumps({"results": results}))
    text = sc.table(tmp_path, [0, 1])
    lad = next(line for line in text.splitlines() if line.startswith("| lad |"))
    assert "| 1.3000 (1.2000 / 1.4000) |" in lad and "| 1.300 (1.200 / 1.400) | – |" in lad
    assert "| 13.0 (12.0 / 14.0) |" in lad
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["results"]["spatial_global"]["Dice organ"] == [4.2, 4.4] and (tmp_path / "table.md").is_file()
