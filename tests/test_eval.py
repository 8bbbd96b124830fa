"""06_eval.py outside the metric functions: boxes, MDS, ellipse fit, Dice, the fidelity probe, end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from conftest import REPO
from common import load_stage, read_nifti, write_nifti

ev = load_stage("06_eval")


# --------------------------------------------------------------------------- boxes
def test_organ_box_and_crop_at_the_borders():
    a = np.zeros((8, 10, 12), np.uint8)
    b = np.zeros_like(a)
    a[0, 0, 3:5] = 1            # touches the first slice and the first row
    b[7, 4:10, 11] = 2          # touches the last slice, last row and last column
    box = ev.organ_box([a, np.zeros_like(a), b])
    assert box == [0, 8, 0, 10, 3, 12]
    vols = np.arange(2 * 8 * 10 * 12, dtype=np.float32).reshape(2, 8, 10, 12)
    c = ev.crop(vols, box)
    assert c.shape == (2, 8, 10, 9)
    assert np.array_equal(c, vols[:, :, :, 3:])
    assert ev.organ_box([np.zeros_like(a)]) is None
    inner = np.zeros_like(a)
    inner[2:4, 5:7, 6:9] = 1
    assert ev.organ_box([inner]) == [2, 4, 5, 7, 6, 9]


def test_organ_box_ignores_stray_voxels_but_keeps_real_parts():
    """One stray voxel of a predicted mask must not widen the box to the whole volume; a second
    part of the organ of real size (a pancreas cut in two on a slice) still counts."""
    organ = np.zeros((16, 32, 32), np.uint8)
    organ[6:10, 12:20, 10:22] = 1                                 # 384 voxels
    stray = organ.copy()
    stray[0, 0, 0] = 1
    stray[15, 31, 31] = 2
    assert ev.organ_box([organ, stray]) == [6, 10, 12, 20, 10, 22]
    split = organ.copy()
    split[6:10, 24:28, 26:30] = 1                                  # 64 voxels: a sixth of the largest part
    assert ev.organ_box([split]) == [6, 10, 12, 28, 10, 30]


# --------------------------------------------------------------------------- MDS and ellipse
def test_classical_mds_recovers_planar_distances():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(30, 2)) * [3.0, 1.0]
    basis, _ = np.linalg.qr(rng.normal(size=(10, 2)))         # an isometric embedding into 10-D
    x = plane @ basis.T + rng.normal(size=10)
    emb = ev.classical_mds(x)
    assert emb.shape == (30, 2)
    np.testing.assert_allclose(pdist(emb), pdist(plane), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("angle", [0.3, -1.1])
def test_fit_ellipse_recovers_a_known_ellipse(angle):
    s = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    ca, sa = np.cos(angle), np.sin(angle)
    ex, ey = 5 * np.cos(s), 2 * np.sin(s)
    pts = np.stack([3 + ca * ex - sa * ey, -1 + sa * ex + ca * ey], 1)
    centre, axes, ang = ev.fit_ellipse(pts)
    np.testing.assert_allclose(centre, [3, -1], atol=1e-6)
    order = np.argsort(axes)[::-1]
    np.testing.assert_allclose(axes[order], [5, 2], atol=1e-6)
    major = ang if axes[0] > axes[1] else ang + np.pi / 2       # direction of the 5-axis, mod π
    assert abs(np.sin(major - angle)) < 1e-6
    assert ev.fit_ellipse(pts[:4]) is None
    assert ev.fit_ellipse(np.stack([s, 2 * s], 1)) is None   # collinear: no ellipse


# --------------------------------------------------------------------------- the fidelity probe
def test_segnet_learns_a_bright_organ():
    """The probe must find an organ from its appearance: a bright blob in noise, at random places."""
    rng = np.random.default_rng(0)

    def make(n):
        vols = rng.normal(0.4, 0.05, (n, 4, 32, 32)).astype(np.float32)
        masks = np.zeros((n, 4, 32, 32), np.uint8)
        for i in range(n):
            y, x = rng.integers(4, 22, 2)
            masks[i, 1:3, y:y + 8, x:x + 8] = 1
        vols[masks > 0] += 0.3
        return vols, list(masks)

    tr, te = make(8), make(4)
    args = ev.get_args(["--fidelity-steps", "150", "--fidelity-batch", "8", "--fidelity-width", "8"])
    trained = ev.fidelity(tr[0], tr[1], te[0], te[1], args, "cpu")
    # the same probe trained on masks that do not match their volumes (rolled by one case)
    wrong = ev.fidelity(tr[0], tr[1][1:] + tr[1][:1], te[0], te[1], args, "cpu")
    print("probe Dice: matched", trained["dice_organ"], "mismatched", wrong["dice_organ"])
    assert trained["dice_organ"] > 0.8
    assert trained["dice_organ"] > wrong["dice_organ"] + 0.3


def test_segnet_shift_hides_the_usual_position():
    """Masks that ignore their volumes (an unconditional generator's) but always sit where the organ
    usually lies: without the random shifts the probe learns that position and scores on real cases
    whose organ is there; with them it cannot, and only appearance could have helped."""
    rng = np.random.default_rng(1)
    usual = (slice(12, 20), slice(12, 20))

    def make(n, random_blob):
        vols = rng.normal(0.4, 0.05, (n, 4, 32, 32)).astype(np.float32)
        masks = np.zeros((n, 4, 32, 32), np.uint8)
        masks[:, 1:3][(..., *usual)] = 1
        for i in range(n):
            y, x = rng.integers(0, 24, 2) if random_blob else (12, 12)
            vols[i, 1:3, y:y + 8, x:x + 8] += 0.3
        return vols, list(masks)

    tr, te = make(8, True), make(4, False)
    dice = {s: ev.fidelity(tr[0], tr[1], te[0], te[1], ev.get_args(
        ["--fidelity-steps", "150", "--fidelity-batch", "8", "--fidelity-width", "8",
         "--fidelity-shift", str(s)]),
        "cpu")["dice_organ"] for s in (0.0, 0.25)}
    print("probe Dice on position-only masks:", dice)
    assert dice[0.0] > 0.5     # 0.66 when written
    assert dice[0.25] < 0.2    # 0.0 when written


# --------------------------------------------------------------------------- loading
def test_volume_to_unit_and_load_set_skip_bad_files(tmp_path, capsys):
    hu = (-1000.0, 400.0)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    vol = np.full((6, 5, 4), -300, np.int16)                    # (X, Y, Z)
    vol[0, 0, 0] = 400                                          # (a constant volume is not an image: skipped)
    write_nifti(tmp_path / "a.nii.gz", vol, aff, np.int16)
    write_nifti(tmp_path / "a_mask.nii.gz", np.ones((6, 5, 4)), aff, np.uint8)
    write_nifti(tmp_path / "b.nii.gz", np.zeros((6, 5, 3)), aff, np.int16)   # wrong shape
    (tmp_path / "c.nii.gz").write_bytes(b"not a nifti")                       # corrupt
    names, vols, masks = ev.load_set(ev.fake_pairs(tmp_path), hu, shape=(4, 5, 6))
    out = capsys.readouterr().out
    assert names == ["a"]
    assert vols.shape == (1, 4, 5, 6)
    np.testing.assert_allclose(vols.reshape(-1)[1:], 0.5)                    # -300 HU on [-1000, 400]
    assert vols.reshape(-1)[0] == 1.0
    assert masks[0].shape == (4, 5, 6)
    assert "b.nii.gz" in out and "shape" in out and "c.nii.gz" in out
    unit = np.linspace(0, 1, 10, dtype=np.float32)
    assert np.allclose(ev.volume_to_unit(unit, hu, "x"), unit)  # 01's [0, 1] output stays as it is


# --------------------------------------------------------------------------- end to end
def _write_fake(folder, prep, names, hu, masks_from=None, noise=None):
    folder.mkdir(parents=True)
    masks_from = masks_from or names
    rng = np.random.default_rng(0)
    for i, (n, mn) in enumerate(zip(names, masks_from)):
        img, aff = read_nifti(prep / "images" / f"{n}.nii.gz")
        if noise:
            img = np.clip(img + rng.normal(0, noise, img.shape), 0, 1)
        write_nifti(folder / f"s{i}.nii.gz", np.rint(img * (hu[1] - hu[0]) + hu[0]), aff, np.int16)
        mask = read_nifti(prep / "masks" / f"{mn}.nii.gz", None)[0]
        write_nifti(folder / f"s{i}_mask.nii.gz", mask, aff, np.uint8)


def test_end_to_end_on_tiny_folders(tmp_path, masked_prep):
    split = json.loads((masked_prep / "split.json").read_text())
    hu = json.loads((masked_prep / "config.json").read_text())["hu"]
    names = split["train"] + split["test"]
    _write_fake(tmp_path / "copy", masked_prep, names, hu)                      # the real set again, in HU
    _write_fake(tmp_path / "noisy", masked_prep, names, hu, noise=0.15)
    # a killed writer's temp file
    (tmp_path / "noisy" / ".s0.nii.gz.4242.tmp.nii.gz").write_bytes(b"half-written")
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "06_eval.py"), "--real", str(masked_prep),
           "--fake", f"copy={tmp_path / 'copy'}",
           "--fake", f"noisy={tmp_path / 'noisy'}", "--out", str(out), "--med3d-depth", "10", "--pairs", "10",
           "--fidelity-steps", "20", "--fidelity-batch", "4", "--fidelity-width", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr + r.stdout
    m = json.loads((out / "metrics.json").read_text())
    res = m["results"]
    assert m["settings"]["features"]["weights"] == "random"
    train_masks = [read_nifti(masked_prep / "masks" / f"{n}.nii.gz", None)[0].transpose(2, 1, 0)
                   for n in split["train"]]
    assert m["settings"]["organ_box"] == ev.organ_box(train_masks), "the box comes from the training masks"
    assert res["noisy"]["n"] == len(names) and res["noisy"]["composition"] is None  # not a 05 folder
    assert ev.RANDOM_NOTE in (out / "table.md").read_text() and ev.RANDOM_NOTE in r.stdout
    assert r.stdout.count("probe step 1 took") == 3 and "[noisy] features, MS-SSIM" in r.stdout  # it talks
    assert res["copy"]["fid"] < 1e-3 * res["noisy"]["fid"]                    # HU rounding only
    assert res["copy"]["fid_local"] < res["noisy"]["fid_local"]
    assert res["copy"]["ms_ssim"] == pytest.approx(res["real"]["ms_ssim"], abs=1e-3)
    for k in ("real", "copy", "noisy"):
        assert 0 <= res[k]["fidelity"]["dice_organ"] <= 1
    assert (out / "mds.png").stat().st_size > 0
    assert len(list((out / "cache").glob("*.npy"))) == 6
    # a second run reads the cached features and gives the same figures
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads((out / "metrics.json").read_text())["results"]
    assert res2["noisy"]["fid"] == res["noisy"]["fid"]
