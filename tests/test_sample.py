"""05_sample.py: mask augmentation properties, Eq. 4 and the samplers against hand computation,
per-sample reproducibility, and the CLI end to end on tiny checkpoints."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from common import choose_precision, load_stage, read_nifti, save_checkpoint, xyz_to_dhw
from conftest import REPO

sm, dm = load_stage("05_sample"), load_stage("04_diffusion")


@pytest.fixture(scope="module")
def phantom_mask(masked_prep):
    name = sorted((masked_prep / "masks").glob("Case_*.nii.gz"))[0]
    return xyz_to_dhw(read_nifti(name, None)[0])


def test_flip_is_exact_and_invertible(phantom_mask):
    rng = lambda: np.random.default_rng(0)
    kw = dict(flip_prob=1.0, rotate=0.0, scale=(1.0, 1.0), translate=0.0, alpha=0.0)
    once, p = sm.augment_mask(phantom_mask, rng(), **kw)
    assert p["flip"] and np.array_equal(once, phantom_mask[:, :, ::-1])
    twice, _ = sm.augment_mask(once, rng(), **kw)
    np.testing.assert_array_equal(twice, phantom_mask)


def test_labels_kept_volume_bounded_no_specks(phantom_mask):
    specks = lambda m: sum(
        np.bincount(ndimage.label(m == k, np.ones((3, 3, 3)))[0].ravel())[1:].__lt__(4).sum()
        for k in (1, 2) if (m == k).any())
    base_specks = specks(phantom_mask)
    for seed in range(6):
        out, p = sm.augment_mask(phantom_mask, np.random.default_rng(seed),
                                 0.5, 10.0, (0.9, 1.1), 0.05, 0.0, 8.0)
        assert set(np.unique(out)) <= set(np.unique(phantom_mask)), "no new labels"
        ratio = (out > 0).sum() / (phantom_mask > 0).sum()
        assert 0.81 * 0.93 <= ratio <= 1.21 * 1.07, (seed, ratio, p)  # area scales by s², s in [0.9, 1.1]
        out, _ = sm.augment_mask(phantom_mask, np.random.default_rng(seed))  # with the elastic field on
        assert set(np.unique(out)) <= set(np.unique(phantom_mask))
        assert specks(out) <= base_specks, "nearest-neighbour warps make no isolated specks"


def test_elastic_field_smooth_and_deterministic():
    a = sm.elastic_field(np.random.default_rng(3), (64, 64), 4.0, 8.0)
    b = sm.elastic_field(np.random.default_rng(3), (64, 64), 4.0, 8.0)
    np.testing.assert_array_equal(a, b)
    assert abs(np.abs(a).max() - 4.0) < 1e-9
    assert (np.abs(np.diff(a, axis=1)).max() < 1.0
            and np.abs(np.diff(a, axis=2)).max() < 1.0), "smooth: < 1 voxel per voxel"
    assert not np.array_equal(a, sm.elastic_field(np.random.default_rng(4), (64, 64), 4.0, 8.0))


class Stub(torch.nn.Module):
    """ε(z, c) = a·z, ε(z) = b·z: Eq. 4 gives ((1 + w)·a − w·b)·z."""
    conditional = True  # what guided_eps asks of a denoiser

    def __init__(self, a=0.3, b=-0.2):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, z, t, m, bb, drop=None):
        if drop is None:
            return self.a * z
        return torch.where(drop.view(-1, *[1] * (z.ndim - 1)), self.b * z, self.a * z)


def test_ddpm_with_a_stub_matches_hand_computed_posterior_steps():
    T, w = 3, 1.0
    diff = dm.GaussianDiffusion(T)
    prec = choose_precision("cpu")
    shape = (2, 1, 2, 2, 2)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]
    cond = (torch.zeros(2, 1), torch.zeros(2, 1))
    got = dm.sample_latents(diff, Stub(), cond, shape, w, "ddpm", 0, gens(), "cpu", prec)
    # by hand, float64, with the same per-sample noise
    g = gens()
    draw = lambda: np.stack([torch.randn(shape[1:], generator=x).double().numpy() for x in g])
    betas = diff.betas.double().numpy()
    abar = np.cumprod(1 - betas)
    z = draw()
    for t in reversed(range(T)):
        eps = ((1 + w) * 0.3 - w * (-0.2)) * z
        x0 = np.clip(np.sqrt(1 / abar[t]) * z - np.sqrt(1 / abar[t] - 1) * eps, -1, 1)
        ab_prev = abar[t - 1] if t > 0 else 1.0
        mean = (betas[t] * np.sqrt(ab_prev) / (1 - abar[t]) * x0
                + (1 - ab_prev) * np.sqrt(1 - betas[t]) / (1 - abar[t]) * z)
        var = betas[t] * (1 - ab_prev) / (1 - abar[t])
        noise = draw()
        z = mean + (np.sqrt(max(var, 1e-20)) * noise if t > 0 else 0)
    np.testing.assert_allclose(got.numpy(), z, rtol=1e-4, atol=1e-5)


def test_ddim_is_deterministic_and_samples_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    d = dm.Denoiser(dict(mode="both", latent_shape=(8, 4, 8, 8), depth=4),
                    dict(channels=8, dim=8, dim_mults=(1, 2), heads=2, dim_head=8)).eval()
    diff = dm.GaussianDiffusion(20)
    prec = choose_precision("cpu")
    cond = (torch.randn(2, 8, 4, 8, 8), torch.randint(0, 3, (2, 24)))
    run = lambda seeds, c, sampler: dm.sample_latents(
        diff, d, c, (len(seeds), 8, 4, 8, 8), 1.0, sampler, 5,
        [torch.Generator().manual_seed(s) for s in seeds], "cpu", prec)
    a, b = run([1, 2], cond, "ddim"), run([1, 2], cond, "ddim")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # alone or in a batch: the same sample up to float summation order (a different seed differs by O(1))
    solo = run([1], tuple(c[:1] for c in cond), "ddim")
    torch.testing.assert_close(solo[0], a[0], atol=2e-3, rtol=0)
    solo = run([2], tuple(c[1:] for c in cond), "ddpm")  # ancestral noise is per sample too
    torch.testing.assert_close(solo[0], run([1, 2], cond, "ddpm")[1], atol=2e-3, rtol=0)
    assert (run([3], tuple(c[:1] for c in cond), "ddim")[0] - a[0]).abs().max() > 0.1
    assert a.abs().max() <= 1.0 + 1e-6


def test_end_to_end_on_tiny_checkpoints(tmp_path, masked_prep):
    vq = load_stage("03_vqgan")
    torch.manual_seed(0)
    m = vq.VQGAN(n_hiddens=8, n_codes=32, num_groups=8)
    save_checkpoint({"step": 0, "model_kwargs": m.kwargs, "model": m.state_dict()}, tmp_path / "vq.pt")
    r = subprocess.run([sys.executable, str(REPO / "04_diffusion.py"), "--prep", str(masked_prep),
                        "--vqgan", str(tmp_path / "vq.pt"), "--out", str(tmp_path / "diff"),
                        "--dim", "8", "--dim-mults", "1", "2", "--attn-heads", "2",
                        "--attn-dim-head", "8", "--timesteps", "10", "--batch-size", "2", "--steps", "2",
                        "--device", "cpu", "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # on a CPU, previews are drawn only when asked for (--n-preview)
    assert "previews skipped on the CPU" in r.stdout and not (tmp_path / "diff" / "previews").exists()
    cmd = [sys.executable, str(REPO / "05_sample.py"), "--prep", str(masked_prep),
           "--vqgan", str(tmp_path / "vq.pt"),
           "--diffusion", str(tmp_path / "diff" / "ckpt.pt"), "--out", str(tmp_path / "s"),
           "--n-original", "1", "--n-augmented", "2", "--batch-size", "2",
           "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 3 new volumes" in r.stdout and "s/volume" in r.stdout
    index = json.loads((tmp_path / "s" / "samples.json").read_text())
    samples = index["samples"]
    assert (index["composition"] == {"original": 1, "augmented": 2}
            and index["written"] == index["composition"])
    for sid, rec in samples.items():
        assert rec == json.loads((tmp_path / "s" / f"{sid}.json").read_text())
        img, msk = nib.load(tmp_path / "s" / f"{sid}.nii.gz"), nib.load(tmp_path / "s" / f"{sid}_mask.nii.gz")
        src = nib.load(masked_prep / "images" / f"{rec['case']}.nii.gz")
        np.testing.assert_array_equal(img.affine, src.affine)
        np.testing.assert_array_equal(msk.affine, src.affine)
        v = np.asarray(img.dataobj)
        assert (img.get_data_dtype() == np.int16 and v.shape == src.shape
                and v.min() >= -1000 and v.max() <= 400)
        assert set(np.unique(np.asarray(msk.dataobj))) <= {0, 1, 2}
    assert samples["sample_00000"]["mask"] == "original" and samples["sample_00000"]["augmentation"] is None
    assert [samples[f"sample_{i:05d}"]["mask"] for i in (1, 2)] == ["augmented", "augmented"]
    assert all(samples[f"sample_{i:05d}"]["augmentation"] is not None for i in (1, 2))
    # the original sample's mask is 02's mask of its case, voxel for voxel
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "s" / "sample_00000_mask.nii.gz").dataobj),
        np.asarray(nib.load(masked_prep / "masks"
                            / f"{samples['sample_00000']['case']}.nii.gz").dataobj))
    stamp = (tmp_path / "s" / "sample_00000.nii.gz").stat().st_mtime_ns
    # killed between a sample's volume and its record (written last), with a torn temp file beside it
    (tmp_path / "s" / "sample_00002.json").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "s" / f".sample_00002.nii.gz.{dead.pid}.tmp.nii.gz").write_bytes(b"torn")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "wrote 1 new volumes" in r.stdout, r.stdout  # that sample alone is redone
    assert not list((tmp_path / "s").glob(".*")) and (tmp_path / "s" / "sample_00002.json").exists()
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["written"] == index["composition"]
    assert (tmp_path / "s" / "sample_00000.nii.gz").stat().st_mtime_ns == stamp
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "wrote 0 new volumes" in r.stdout, r.stdout
    # another guidance weight into the same folder would mix two sets: refused, nothing written
    r = subprocess.run(cmd + ["--guidance", "2.0"], capture_output=True, text=True)
    assert r.returncode != 0 and "other settings (guidance)" in r.stderr, r.stderr[-500:]
    assert (tmp_path / "s" / "sample_00000.nii.gz").stat().st_mtime_ns == stamp


def test_composition_defaults_and_plan():
    # the augmented mask set, as large as the training set
    assert sm.composition(None, None, 800) == (400, 400)
    assert sm.composition(None, None, 7) == (4, 3)
    assert sm.composition(0, 256, 800) == (0, 256)         # Table 3
    assert sm.composition(0, None, 800) == (0, 800)         # Table 2, × rows: only augmented, as many
    assert sm.composition(None, 5, 800) == (795, 5) and sm.composition(900, None, 800) == (900, 0)
    names = ["a", "b", "c"]
    plan = sm.condition_plan(names, 2, 4)
    assert [case for _, case, _ in plan] == ["a", "b", "c", "a", "b", "c"], "each case once before any twice"
    assert [aug for _, _, aug in plan] == [False, False, True, True, True, True]
    assert [sid for sid, _, _ in plan] == [f"sample_{i:05d}" for i in range(6)]
    for bad in (["--n-original", "-1"], ["--n-original", "0", "--n-augmented", "0"]):
        with pytest.raises(SystemExit):
            sm.get_args(bad)
