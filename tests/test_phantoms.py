"""00_phantoms.py: determinism, anatomy in world coordinates, realistic HU, storage, grid size, safety."""
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from common import read_nifti
from conftest import REPO, SMALL_PHANTOMS, SMALL_PREP


def default_args(phantoms, extra=()):
    return phantoms.get_args(["--previews", "0", *extra])


def world_centroid(lab, affine, k):
    return (affine @ np.r_[np.argwhere(lab == k).mean(0), 1])[:3]


def test_deterministic_per_seed_and_case(phantoms):
    args = default_args(phantoms)
    a = phantoms.make_case(0, 3, args)
    b = phantoms.make_case(0, 3, args)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = phantoms.make_case(1, 3, args)
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_case_does_not_depend_on_n(tmp_path, phantoms):
    for n in (2, 3):
        phantoms.main(phantoms.get_args(["--out", str(tmp_path / f"n{n}"), "--n", str(n), *SMALL_PHANTOMS]))
    for sub in ("images/Case_00002_0000.nii.gz", "labels/Case_00002.nii.gz"):
        x, y = (nib.load(tmp_path / f"n{n}" / sub) for n in (2, 3))
        np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
        np.testing.assert_array_equal(x.affine, y.affine)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_anatomy_and_intensities(phantoms, k):
    hu, lab, aff = phantoms.make_case(0, k, default_args(phantoms))
    assert hu.dtype == np.int16 and lab.dtype == np.uint8
    present = set(np.unique(lab).tolist())
    assert {0, 1, 2, 3, 4} <= present <= {0, 1, 2, 3, 4, 5}
    liver, kidney, spleen, pancreas = (world_centroid(lab, aff, i) for i in (1, 2, 3, 4))
    # RAS world: +x is the patient's right, +y anterior.
    assert liver[0] > 20 and spleen[0] < -20, "liver on the right, spleen on the left"
    xs = np.array([(aff @ np.r_[i, 0, 0, 1])[0] for i in np.argwhere(lab == 2)[:, 0]])
    assert xs.min() < -30 and xs.max() > 30, "two kidneys, one each side"
    pan_x = np.array([(aff @ np.r_[i, 0, 0, 1])[0] for i in np.argwhere(lab == 4)[:, 0]])
    assert pan_x.min() < -20 and pan_x.max() > 10, "pancreas crosses the midline"
    assert pancreas[1] > kidney[1], "pancreas lies anterior to the kidneys"
    med = {i: np.median(hu[lab == i]) for i in (1, 2, 3, 4)}
    assert 40 < med[1] < 90 and 130 < med[2] < 220 and 30 < med[3] < 80 and 60 < med[4] < 130
    if 5 in present:  # tumour: hypodense, inside or touching the pancreas
        assert np.median(hu[lab == 5]) < med[4] - 20
        from scipy import ndimage
        assert (ndimage.binary_dilation(lab == 4, iterations=2) & (lab == 5)).any()
    assert np.median(hu[:3, :3, :]) < -900, "air in the corners"
    assert (hu > 300).sum() > 100, "bone"
    assert ((hu > -150) & (hu < -60)).sum() > 0.05 * hu.size, "fat"
    assert ((hu < -900) & (lab == 0)).sum() > 0, "air / bowel gas"


def test_spacing_and_extent_vary(phantoms):
    args = default_args(phantoms)
    cases = [phantoms.make_case(0, k, args) for k in range(1, 7)]
    sp = np.array([np.diag(c[2])[:3] for c in cases])
    assert np.all(sp[:, 2] > sp[:, 0]), "anisotropic: slices thicker than pixels"
    assert len(set(np.round(sp[:, 0], 3))) == 6 and len(set(c[0].shape[2] for c in cases)) >= 4


def test_files_are_stored_lps_like_with_the_same_world_geometry(tmp_path, phantoms):
    phantoms.main(phantoms.get_args(["--out", str(tmp_path), "--n", "1", *SMALL_PHANTOMS]))
    img = nib.load(tmp_path / "images" / "Case_00001_0000.nii.gz")
    lab = nib.load(tmp_path / "labels" / "Case_00001.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(img.affine, lab.affine)
    hu, ras_lab, ras_aff = phantoms.make_case(0, 1, phantoms.get_args(SMALL_PHANTOMS))
    for k in (1, 3, 4):  # the same organ sits at the same world position either way
        np.testing.assert_allclose(world_centroid(np.asarray(lab.dataobj), lab.affine, k),
                                   world_centroid(ras_lab, ras_aff, k), atol=1e-3)


def test_default_grid_follows_the_field_of_view_spacing_and_extent(phantoms):
    """At the default (demo) settings each grid is what the flags ask for, and no larger: voxel
    sizes within --spacing-xy/--spacing-z, a 380-440 mm field of view centred on x = y = 0, a z
    extent within --z-extent. The grid size is what keeps generation cheap; the time per case is
    printed, never asserted (it depends on the machine's load)."""
    args = default_args(phantoms)
    t = time.perf_counter()
    for k in range(1, 6):
        hu, lab, aff = phantoms.make_case(0, k, args)
        assert hu.ndim == 3 and lab.shape == hu.shape and hu.shape[0] == hu.shape[1]
        sx, sy, sz = np.diag(aff)[:3]
        np.testing.assert_array_equal(aff[:3, :3], np.diag([sx, sy, sz]))  # RAS, axis-aligned
        assert sx == sy and args.spacing_xy[0] <= sx <= args.spacing_xy[1]
        assert args.spacing_z[0] <= sz <= args.spacing_z[1]
        nx, _, nz = hu.shape
        assert 380 - sx <= nx * sx <= 440 + sx, "field of view, to the nearest voxel"
        np.testing.assert_allclose(aff[:2, 3] + (nx - 1) * sx / 2, 0, atol=1e-3)
        assert args.z_extent[0] - sz <= nz * sz <= args.z_extent[1] + sz, "z extent, to a slice"
    per_case = (time.perf_counter() - t) / 5
    print(f"phantom generation at default (demo) size: {per_case:.2f} s/case")


def test_refuses_to_overwrite_foreign_files(tmp_path):
    (tmp_path / "images").mkdir()
    theirs = tmp_path / "images" / "Case_00001_0000.nii.gz"
    theirs.write_bytes(b"somebody's real AbdomenCT-1K case")
    r = subprocess.run([sys.executable, str(REPO / "00_phantoms.py"), "--out", str(tmp_path),
                        "--n", "1", *SMALL_PHANTOMS], capture_output=True, text=True)
    assert r.returncode != 0 and "did not write" in r.stderr and str(theirs) in r.stderr
    assert theirs.read_bytes() == b"somebody's real AbdomenCT-1K case"


def test_totalseg_layout_preprocesses_like_the_abdomenct1k_layout(tmp_path, phantoms, prep):
    """The same phantoms in TotalSegmentator's layout (one file per organ, v2 names) go through
    01 --totalseg to the same image and the same labels, the tumour counted as pancreas."""
    for layout in ("abdomenct1k", "totalseg"):
        phantoms.main(phantoms.get_args(["--out", str(tmp_path / layout), "--n", "2", "--layout", layout,
                                         *SMALL_PHANTOMS]))
    assert sorted(p.name for p in (tmp_path / "totalseg" / "s0001" / "segmentations").iterdir()) == [
        f"{o}.nii.gz" for o in ("kidney_left", "kidney_right", "liver", "pancreas", "spleen")]
    a, t = tmp_path / "prep_a", tmp_path / "prep_t"
    prep.main(prep.get_args(["--images", str(tmp_path / "abdomenct1k" / "images"), "--labels",
                             str(tmp_path / "abdomenct1k" / "labels"), "--out", str(a), *SMALL_PREP]))
    prep.main(prep.get_args(["--totalseg", str(tmp_path / "totalseg"), "--out", str(t), *SMALL_PREP]))
    for k in (1, 2):
        img_a = read_nifti(a / "images" / f"Case_{k:05d}.nii.gz")[0]
        img_t = read_nifti(t / "images" / f"s{k:04d}.nii.gz")[0]
        np.testing.assert_array_equal(img_a, img_t)
        lab_a = read_nifti(a / "labels" / f"Case_{k:05d}.nii.gz", None)[0]
        lab_t = read_nifti(t / "labels" / f"s{k:04d}.nii.gz", None)[0]
        np.testing.assert_array_equal(np.where(lab_a == 5, 4, lab_a), lab_t)
        assert (lab_t == 2).sum() > 0 and (lab_t == 4).sum() > 0
