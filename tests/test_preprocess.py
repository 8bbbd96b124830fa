"""01_preprocess.py: geometry against independent world-coordinate computations, windowing,
window choice, crop/pad, the real TotalSegmentator CT, filtering, bad input, resume, split."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import REPO, SMALL_PREP


def run(prep, argv):
    prep.main(prep.get_args([str(a) for a in argv]))


def cli(script, *argv, cwd=None):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd)


def world_centroid(lab, affine, k):
    return (affine @ np.r_[np.argwhere(lab == k).mean(0), 1])[:3]


def tree_hash(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- unit maths
def test_hu_window_exact(prep):
    hu = np.array([-3000, -1000, -999, -300, 0, 400, 401, 3000], np.float32)
    np.testing.assert_allclose(prep.window_hu(hu, -1000, 400),
                               [0, 0, 1 / 1400, 0.5, 1000 / 1400, 1, 1, 1], rtol=0, atol=1e-7)


def test_choose_windows_hand_made(prep):
    counts = np.zeros(100, int)
    counts[50:61] = 10  # organ in slices 50..60, shorter than the window: centre it
    (s,) = prep.choose_windows(counts, 32)
    assert s <= 50 and s + 31 >= 60 and abs(s + 15.5 - 55) <= 0.5
    counts[80:100] = 1000  # a heavier block elsewhere wins
    (s,) = prep.choose_windows(counts, 32)
    assert s + 32 > 99 and s == 68
    assert prep.choose_windows(np.zeros(100, int), 32) == [34]  # no organ: central
    assert prep.choose_windows(np.ones(20, int), 32) == [-6]  # short volume: pad both sides
    c = np.zeros(50, int)
    c[20] = 1
    assert prep.choose_windows(c, 8, "all") == list(range(13, 21))
    assert prep.choose_windows(c, 8, "all", stride=4) == [16, 20]


def test_crop_pad_keeps_the_body_centred(prep):
    slab = np.full((200, 300, 4), -1000.0, np.float32)
    x, y = np.mgrid[:200, :300]
    body = ((x - 40) / 35.0) ** 2 + ((y - 150) / 60.0) ** 2 <= 1  # off-centre body
    slab[body] = 0.0
    slab[:, 260:264] = 200.0  # a table, separate from the body, must not pull the centre
    cx, cy = prep.body_centre(slab)
    assert abs(cx - 40) <= 1 and abs(cy - 150) <= 1
    for size in (256, 100):  # padding (body smaller than the crop) and cropping (larger)
        start = (int(round(cx - (size - 1) / 2)), int(round(cy - (size - 1) / 2)), 0)
        out = prep.crop_pad(slab, start, (size, size, 4), -1000.0)
        comp = np.argwhere(out[..., 0] == 0.0)
        centre = (comp.min(0) + comp.max(0)) / 2
        assert np.all(np.abs(centre - (size - 1) / 2) <= 1.0), centre
        assert out[0, 0, 0] == -1000.0 or size == 100


# --------------------------------------------------------------------------- geometry on phantoms
@pytest.mark.parametrize("k", [1, 2, 3])
def test_resampling_keeps_world_centroids_volumes_and_labels(prep, phantoms, k):
    hu, lab, aff = phantoms.make_case(0, k, phantoms.get_args(["--previews", "0"]))
    spacing = (1.6, 1.6, 2.3)
    n_out, ratio, aff_out = prep.resample_grid(lab.shape, aff, spacing)
    res = prep.resample_labels(lab, ratio, n_out)
    assert set(np.unique(res)) == set(np.unique(lab)), "label set unchanged"
    v_in, v_out = np.prod(np.diag(aff)[:3]), np.prod(spacing)
    for organ in set(np.unique(lab).tolist()) - {0}:
        moved = np.abs(world_centroid(res, aff_out, organ) - world_centroid(lab, aff, organ))
        assert np.all(moved < spacing), (organ, moved)  # less than one output voxel
        vol_in, vol_out = (lab == organ).sum() * v_in, (res == organ).sum() * v_out
        assert abs(vol_out / vol_in - 1) < 0.10, (organ, vol_in, vol_out)


def test_linear_resampling_is_exact_on_a_linear_field(prep):
    # f(world) = linear: trilinear interpolation must reproduce it at every output voxel centre.
    aff = np.array([[0.8, 0, 0, -50], [0, 0.7, 0, 20], [0, 0, 3.0, -40], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in (60, 50, 20)], indexing="ij"), -1)
    f = lambda w: 0.5 * w[..., 0] - 0.25 * w[..., 1] + 2.0 * w[..., 2]
    img = f(ijk @ aff[:3, :3].T + aff[:3, 3]).astype(np.float32)
    n_out, ratio, aff_out = prep.resample_grid(img.shape, aff, (1.6, 1.6, 2.3))
    out = prep.resample_image(img, ratio, n_out, (3, 13), order=1)
    o = (np.stack(np.meshgrid(*[np.arange(n) for n in (n_out[0], n_out[1], 10)], indexing="ij"), -1)
         + [0, 0, 3])
    np.testing.assert_allclose(out, f(o @ aff_out[:3, :3].T + aff_out[:3, 3]), atol=2e-3)
    # cubic B-splines reproduce linear fields too
    cubic = prep.resample_image(img, ratio, n_out, (3, 13), order=3)
    # edges: spline boundary; a 1-voxel shift would be >= 0.8
    np.testing.assert_allclose(cubic, out, atol=0.05)


def test_outputs_overlay_the_source_scan(tmp_path, prep, small_raw):
    """Independent of our reorientation: map each output voxel through its affine into the
    *stored* (LPS-like) source arrays with nibabel's own affines, and compare."""
    out = tmp_path / "prep"
    run(prep, ["--images", small_raw / "images", "--labels", small_raw / "labels", "--out", out, *SMALL_PREP])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 4
    for rec in summary["cases"]:
        src_i = nib.load(small_raw / "images" / f"{rec['case']}_0000.nii.gz")
        src_l = nib.load(small_raw / "labels" / f"{rec['case']}.nii.gz")
        img_o = nib.load(out / "images" / f"{rec['case']}.nii.gz")
        lab_o = nib.load(out / "labels" / f"{rec['case']}.nii.gz")
        assert img_o.shape == (96, 96, 16)
        assert img_o.get_data_dtype() == np.float32 and lab_o.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img_o.affine, lab_o.affine)
        assert nib.aff2axcodes(src_i.affine) == ("L", "P", "S")
        assert nib.aff2axcodes(img_o.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.sqrt((img_o.affine[:3, :3] ** 2).sum(0)), [3, 3, 4])
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in img_o.shape], indexing="ij"), -1).reshape(-1, 3)
        src_idx = (np.linalg.inv(src_i.affine) @ img_o.affine @ np.c_[idx, np.ones(len(idx))].T)[:3]
        inside = np.all((src_idx > -0.5) & (src_idx < np.array(src_i.shape)[:, None] - 0.5), 0)
        nearest = np.clip(np.rint(src_idx), 0, np.array(src_l.shape)[:, None] - 1).astype(int)
        lab_src = np.asarray(src_l.dataobj)[tuple(nearest)]
        lab_out = np.asarray(lab_o.dataobj).reshape(-1)
        organ = inside & ((lab_src > 0) | (lab_out > 0))
        assert (lab_src[organ] == lab_out[organ]).mean() > 0.98
        assert np.all(lab_out[~inside] == 0), "padding is background"
        hu = ndimage.map_coordinates(src_i.get_fdata(dtype=np.float32), src_idx, order=1, mode="nearest")
        img = np.asarray(img_o.dataobj).reshape(-1)
        strictly = np.all((src_idx >= 0) & (src_idx <= np.array(src_i.shape)[:, None] - 1), 0)
        np.testing.assert_allclose(img[strictly], prep.window_hu(hu[strictly], -1000, 400), atol=1e-4)
        assert np.all(img[~inside] == 0.0), "air padding"
        assert img.min() >= 0 and img.max() <= 1
        w = rec["windows"][0]
        assert w["organ_voxels"] > 0 and 4 in w["labels"]


# --------------------------------------------------------------------------- the real CT
def _example_subject(totalseg_example, root, per_organ):
    subj = root / "example"
    (subj / "segmentations").mkdir(parents=True) if per_organ else subj.mkdir(parents=True)
    src = totalseg_example
    os.symlink(src / "ct.nii.gz", subj / "ct.nii.gz")
    if not per_organ:
        os.symlink(src / "seg.nii.gz", subj / "seg.nii.gz")
        return subj
    seg = nib.load(src / "seg.nii.gz")  # TotalSegmentator's per-organ layout, made from the multi-label map
    s = np.asarray(seg.dataobj)
    v2_ids = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7, "aorta": 52}
    for name, i in v2_ids.items():
        nib.save(nib.Nifti1Image((s == i).astype(np.uint8), seg.affine),
                 subj / "segmentations" / f"{name}.nii.gz")
    return subj


def test_real_totalsegmentator_ct(tmp_path, prep, totalseg_example):
    _example_subject(totalseg_example, tmp_path / "ts", per_organ=False)
    out = tmp_path / "prep"
    run(prep, ["--totalseg", tmp_path / "ts", "--out", out, "--workers", "1"])
    rec = json.loads((out / "summary.json").read_text())["cases"][0]
    assert rec["status"] == "ok", rec
    img, lab = nib.load(out / "images" / "example.nii.gz"), nib.load(out / "labels" / "example.nii.gz")
    x, y = img.get_fdata(), np.asarray(lab.dataobj)
    assert x.shape == (256, 256, 32) and y.shape == (256, 256, 32)
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.05
    np.testing.assert_allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), [1.1, 1.1, 1.5])
    assert set(np.unique(y)) == {0, 1, 2, 3, 4}, "TotalSegmentator ids mapped to liver/kidney/spleen/pancreas"
    src = nib.load(totalseg_example / "seg.nii.gz")
    s = np.asarray(src.dataobj)
    assert rec["windows"][0]["organ_fraction_in_window"] > 0.9, "the pancreas is inside the window"
    # Same organ, same place in the world (source voxels are 3 mm). The pancreas lies inside
    # the window; the kidneys run beyond it, so only their in-plane position is compared.
    moved = world_centroid(y, img.affine, 4) - world_centroid(s, src.affine, 7)
    assert np.all(np.abs(moved) < 3.0), moved
    moved = world_centroid(y, img.affine, 2) - world_centroid(np.isin(s, (2, 3)), src.affine, True)
    assert np.all(np.abs(moved[:2]) < 6.0), moved
    assert (out / "previews" / "example.png").exists()

    # TotalSegmentator's per-organ folder layout gives the same labels.
    _example_subject(totalseg_example, tmp_path / "ts2", per_organ=True)
    run(prep, ["--totalseg", tmp_path / "ts2", "--out", tmp_path / "prep2", "--workers", "1",
               "--no-previews"])
    y2 = np.asarray(nib.load(tmp_path / "prep2" / "labels" / "example.nii.gz").dataobj)
    np.testing.assert_array_equal(y, y2)
    # --totalseg may name one subject's folder (as with a single downloaded example) as well as the dataset's
    run(prep, ["--totalseg", tmp_path / "ts2" / "example", "--out", tmp_path / "prep3", "--workers", "1",
               "--no-previews"])
    y3 = np.asarray(nib.load(tmp_path / "prep3" / "labels" / "example.nii.gz").dataobj)
    np.testing.assert_array_equal(y, y3)


def test_totalseg_require_organs_filter(tmp_path, prep, small_raw):
    root = tmp_path / "ts"
    names = {1: "liver", 2: "kidney_right", 3: "spleen", 4: "pancreas"}
    for subj, case, drop, cut in (("s01", 1, None, False), ("s02", 2, "spleen", False),
                                  ("s03", 3, None, True)):
        d = root / subj / "segmentations"
        d.mkdir(parents=True)
        shutil.copy(small_raw / "images" / f"Case_0000{case}_0000.nii.gz", root / subj / "ct.nii.gz")
        lab = nib.load(small_raw / "labels" / f"Case_0000{case}.nii.gz")
        a = np.asarray(lab.dataobj).copy()
        a[:, :, [0, -1]] = 0  # every organ inside the scan ...
        if cut:
            a[40:50, 40:50, -1] = 1  # ... except a liver that runs off the last slice
        for k, name in names.items():
            if name != drop:
                nib.save(nib.Nifti1Image((a == k).astype(np.uint8), lab.affine), d / f"{name}.nii.gz")
    out = tmp_path / "prep"
    run(prep, ["--totalseg", root, "--out", out, "--require-organs", "liver,kidney,spleen,pancreas",
               *SMALL_PREP])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {**summary["counts"], "ok": 1, "skipped": 2}
    assert summary["skipped"]["s02"] == "dropped: missing required organ spleen (label 3)"
    assert summary["skipped"]["s03"] == "dropped as incomplete: liver (label 1) is cut by the last slice"


# --------------------------------------------------------------------------- bad input
def _bad_folder(root, small_raw):
    im, lb = root / "images", root / "labels"
    im.mkdir(parents=True)
    lb.mkdir()
    for c in ("Case_00001", "Case_00002"):
        shutil.copy(small_raw / "images" / f"{c}_0000.nii.gz", im)
        shutil.copy(small_raw / "labels" / f"{c}.nii.gz", lb)
    src_i = nib.load(small_raw / "images" / "Case_00003_0000.nii.gz")
    src_l = nib.load(small_raw / "labels" / "Case_00003.nii.gz")
    a, l, aff = src_i.get_fdata(dtype=np.float32), np.asarray(src_l.dataobj), src_i.affine
    save = lambda arr, affine, path: nib.save(nib.Nifti1Image(arr, affine), path)
    bad = {}
    raw = (small_raw / "images" / "Case_00003_0000.nii.gz").read_bytes()
    (im / "Case_10001_0000.nii.gz").write_bytes(raw[: len(raw) // 2])
    bad["Case_10001"] = "cannot read NIfTI"
    save(np.stack([a, a], -1), aff, im / "Case_10002_0000.nii.gz")
    bad["Case_10002"] = "image is 4-D"
    for c in ("Case_10001", "Case_10002"):  # labelled: an unlabelled image is skipped before it is read
        shutil.copy(small_raw / "labels" / "Case_00003.nii.gz", lb / f"{c}.nii.gz")
    save(a, aff, im / "Case_10003_0000.nii.gz")
    save(l[:-2], aff, lb / "Case_10003.nii.gz")
    bad["Case_10003"] = "does not match the image's"
    save(a, aff, im / "Case_10004_0000.nii.gz")
    shifted = aff.copy()
    shifted[0, 3] += 5.0
    save(l, shifted, lb / "Case_10004.nii.gz")
    bad["Case_10004"] = "label affine differs"
    nan = a.copy()
    nan[5, 5, 5], nan[6, 6, 6] = np.nan, np.inf
    save(nan, aff, im / "Case_10005_0000.nii.gz")
    shutil.copy(small_raw / "labels" / "Case_00003.nii.gz", lb / "Case_10005.nii.gz")
    bad["Case_10005"] = "2 NaN/inf voxels"
    save(a, aff, im / "Case_10006_0000.nii.gz")
    save(np.zeros_like(l), aff, lb / "Case_10006.nii.gz")
    bad["Case_10006"] = "label map is empty"
    return bad


def test_bad_inputs_are_reported_and_skipped(tmp_path, small_raw):
    bad = _bad_folder(tmp_path / "raw", small_raw)
    before = tree_hash(tmp_path / "raw")
    out = tmp_path / "prep"
    r = cli("01_preprocess.py", "--images", tmp_path / "raw" / "images",
            "--labels", tmp_path / "raw" / "labels", "--out", out, *SMALL_PREP[:-3], "--workers", "2")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 2 and summary["counts"]["skipped"] == len(bad)
    for case, phrase in bad.items():
        reason = summary["skipped"][case]
        assert phrase in reason and case in reason, (case, reason)  # names the file and the problem
        assert f"skipped {case}" in r.stderr + r.stdout
    assert sorted(p.name for p in (out / "images").iterdir()) == ["Case_00001.nii.gz", "Case_00002.nii.gz"]
    assert tree_hash(tmp_path / "raw") == before, "the input folder is never modified"


def test_exit_code_non_zero_only_when_nothing_succeeds(tmp_path, small_raw):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "Case_1_0000.nii.gz").write_bytes(b"not a nifti")
    r = cli("01_preprocess.py", "--images", tmp_path / "images", "--labels", tmp_path / "none",
            "--out", tmp_path / "o", *SMALL_PREP)
    assert r.returncode != 0 and "no case could be preprocessed" in r.stderr
    r = cli("01_preprocess.py", "--images", tmp_path / "empty", "--out", tmp_path / "o2")
    assert r.returncode != 0 and "no such folder" in r.stderr


# --------------------------------------------------------------------------- modes, resume, split
def test_resume_skips_done_cases_and_guards_settings(tmp_path, prep, small_raw, capsys):
    argv = ["--images", small_raw / "images", "--labels", small_raw / "labels",
            "--out", tmp_path / "p", *SMALL_PREP]
    run(prep, argv)
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p" / "images").iterdir()}
    capsys.readouterr()
    run(prep, argv)
    assert "resuming: 4 cases already done" in capsys.readouterr().out
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p" / "images").iterdir()}
    (tmp_path / "p" / "images" / "Case_00002.nii.gz").unlink()  # a lost output is redone
    run(prep, argv)
    assert "resuming: 3 cases" in capsys.readouterr().out
    assert (tmp_path / "p" / "images" / "Case_00002.nii.gz").exists()
    with pytest.raises(SystemExit, match="other settings"):
        run(prep, argv + ["--depth", "8"])  # a later flag overrides
    run(prep, argv + ["--overwrite"])
    assert stamp != {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p" / "images").iterdir()}


def test_without_labels_the_central_window(tmp_path, prep, small_raw):
    run(prep, ["--images", small_raw / "images", "--labels", tmp_path / "nolabels",
               "--out", tmp_path / "p", *SMALL_PREP])
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["counts"]["ok"] == 4 and not (tmp_path / "p" / "labels").exists()
    for rec in s["cases"]:
        n = rec["resampled_shape"][2]
        assert rec["windows"][0]["z_start"] == (n - 16) // 2 and "central" in rec["warnings"][0]


def test_with_labels_an_unlabelled_image_is_skipped_not_split(tmp_path, prep, small_raw):
    """The paper uses the annotated cases only: with a label folder, an image without its label map
    is reported and skipped, so it can reach neither split (07 tests on the test split's labels)."""
    labels = tmp_path / "labels"
    shutil.copytree(small_raw / "labels", labels)
    gone = sorted(labels.iterdir())[0]
    gone.unlink()
    run(prep, ["--images", small_raw / "images", "--labels", labels, "--out", tmp_path / "p",
               "--n-test", "2", *SMALL_PREP])
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    split = json.loads((tmp_path / "p" / "split.json").read_text())
    case = gone.name.removesuffix(".nii.gz")
    assert s["counts"]["ok"] == 3 and case in s["skipped"] and "no label map" in s["skipped"][case]
    assert case not in split["train_cases"] + split["test_cases"]


def test_all_windows_and_split_by_case(tmp_path, prep, small_raw):
    run(prep, ["--images", small_raw / "images", "--labels", small_raw / "labels", "--out", tmp_path / "p",
               "--windows", "all", "--window-stride", "3", "--n-test", "1", *SMALL_PREP])
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    split = json.loads((tmp_path / "p" / "split.json").read_text())
    assert s["counts"]["outputs"] > 4 and len(split["test_cases"]) == 1
    for rec in s["cases"]:
        starts = [w["z_start"] for w in rec["windows"]]
        assert len(starts) > 1 and np.all(np.diff(starts) == 3)
        for w in rec["windows"]:
            assert w["organ_voxels"] > 0
            lab = np.asarray(nib.load(tmp_path / "p" / "labels" / f"{w['name']}.nii.gz").dataobj)
            assert (lab == 4).sum() == w["organ_voxels"]
        side = {"train" if w["name"] in split["train"] else "test" for w in rec["windows"]}
        assert len(side) == 1, "all windows of a case stay on one side of the split"


def test_split_is_deterministic(prep):
    cases = {f"c{i}": [f"c{i}"] for i in range(10)}
    a, b = prep.make_split(cases, 0, 0.2, None), prep.make_split(cases, 0, 0.2, None)
    assert a == b and len(a["test"]) == 2 and len(a["train"]) == 8 and not set(a["test"]) & set(a["train"])
    assert (prep.make_split(cases, 1, 0.2, None)["test"] != a["test"]
            or prep.make_split(cases, 2, 0.2, None)["test"] != a["test"])
    assert len(prep.make_split(cases, 0, 0.2, 3)["test"]) == 3


def test_refuses_output_inside_the_input(tmp_path, small_raw):
    r = cli("01_preprocess.py", "--images", small_raw / "images", "--labels", small_raw / "labels",
            "--out", small_raw / "images" / "prep")
    assert r.returncode != 0 and "overlaps the input" in r.stderr


def test_default_layout_end_to_end(tmp_path):
    """`python 00_phantoms.py` then `python 01_preprocess.py`, no paths given (the README's layout)."""
    r = cli("00_phantoms.py", "--n", "3", "--previews", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("01_preprocess.py", "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    prep = tmp_path / "data" / "prep"
    split = json.loads((prep / "split.json").read_text())
    assert len(split["train"]) + len(split["test"]) == 3
    for name in split["train"] + split["test"]:
        img = nib.load(prep / "images" / f"{name}.nii.gz")
        assert img.shape == (256, 256, 32) and (prep / "previews" / f"{name}.png").exists()
        assert (np.asarray(nib.load(prep / "labels" / f"{name}.nii.gz").dataobj) == 4).any()
    assert "3 volumes" in r.stdout or "wrote 3 volumes" in r.stdout
