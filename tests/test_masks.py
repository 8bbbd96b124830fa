"""02_masks.py: UniverSeg against the published parameter table and an independent literal
forward pass; label masks exact on the image grid; support sampling; the CLI end to end."""
import json
import shutil
import subprocess
import sys
import urllib.error

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import load_stage
from conftest import REPO

masks = load_stage("02_masks")


def official_table():
    """Parameter names and shapes of the official UniverSeg v1 state_dict, written out from
    docs/reference.md §5 (not derived from our model)."""
    t = {}
    for kind, n, cin in (("enc_blocks", 4, None), ("dec_blocks", 3, 256)):
        for i in range(n):
            c = cin if cin else (3 if i == 0 else 128)
            t[f"{kind}.{i}.cross.cross_conv.weight"] = (64, c, 3, 3)
            t[f"{kind}.{i}.cross.cross_conv.bias"] = (64,)
            for side in ("target", "support"):
                t[f"{kind}.{i}.{side}.vmapped.conv.weight"] = (64, 64, 3, 3)
                t[f"{kind}.{i}.{side}.vmapped.conv.bias"] = (64,)
    t["out_conv.conv.weight"] = (1, 64, 1, 1)
    t["out_conv.conv.bias"] = (1,)
    return t


def test_official_weights_load_strictly(tmp_path):
    table = official_table()
    assert len(table) == 44 and sum(int(np.prod(s)) for s in table.values()) == 1_182_785
    model = masks.UniverSeg()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == table
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in table.items()}
    torch.save(state, tmp_path / "w.pt")
    loaded = masks.load_universeg(str(tmp_path / "w.pt"), "cpu")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k])
    del state["out_conv.conv.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="not a UniverSeg v1 state_dict"):
        masks.load_universeg(str(tmp_path / "bad.pt"), "cpu")


def test_weights_auto_offline_says_what_to_do(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit, match="could not download the UniverSeg weights.*--weights PATH"):
        masks.load_universeg("auto", "cpu")


def literal_forward(sd, target, s_img, s_lab):
    """The official computation spelled out: every (target, support) pair concatenated and
    convolved, per-item convs in loops, LeakyReLU(0.01), max-pool / bilinear (align_corners)."""
    conv = lambda x, name, act: (lambda y: F.leaky_relu(y, 0.01) if act else y)(
        F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], padding=sd[name + ".weight"].shape[-1] // 2))

    def block(prefix, t, s):  # t (B, Ct, H, W), s list of S × (B, Cs, H, W)
        inter = [conv(torch.cat([t, sj], 1), f"{prefix}.cross.cross_conv", False) for sj in s]
        t = conv(torch.stack(inter).mean(0), f"{prefix}.target.vmapped.conv", True)
        return t, [conv(i, f"{prefix}.support.vmapped.conv", True) for i in inter]

    t, s = target, [torch.cat([s_img[:, j], s_lab[:, j]], 1) for j in range(s_img.shape[1])]
    skips = []
    for i in range(4):
        t, s = block(f"enc_blocks.{i}", t, s)
        if i < 3:
            skips.append((t, s))
            t, s = F.max_pool2d(t, 2), [F.max_pool2d(x, 2) for x in s]
    up = lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    for i in range(3):
        ts, ss = skips.pop()
        t, s = block(f"dec_blocks.{i}", torch.cat([up(t), ts], 1),
                     [torch.cat([up(a), b], 1) for a, b in zip(s, ss)])
    return conv(t, "out_conv.conv", False)


def test_forward_matches_the_literal_official_computation_and_ignores_support_order():
    torch.manual_seed(0)
    model = masks.UniverSeg().eval()
    target, s_img = torch.rand(2, 1, 32, 32), torch.rand(2, 5, 1, 32, 32)
    s_lab = (torch.rand(2, 5, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        out = model(target, s_img, s_lab)
        ref = literal_forward(model.state_dict(), target, s_img, s_lab)
        perm = torch.randperm(5)
        shuffled = model(target, s_img[:, perm], s_lab[:, perm])
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shuffled, out, atol=1e-5, rtol=1e-4)


def test_support_sampling_is_mostly_positive_and_never_the_case_itself():
    d, h = 10, 16
    labels = {c: np.zeros((d, h, h), np.uint8) for c in ("a", "b", "c")}
    for c in labels:
        labels[c][2:8, 4:10, 4:10] = 4  # slices 2..7 contain the organ
    images = {c: np.random.default_rng(i).random((d, h, h)).astype(np.float32) for i, c in enumerate(labels)}
    pool = masks.SupportPool(list(labels), images, labels, {"organ": [4], "tumour": [5]}, size=16)
    rng = np.random.default_rng(0)
    img, lab = pool.sample("organ", 8, rng, exclude="a")
    assert img.shape == (8, 1, 16, 16) and set(lab.unique().tolist()) <= {0.0, 1.0}
    assert int((lab.flatten(1).amax(1) > 0).sum()) == 6  # round(8 × 0.75)
    assert pool.sample("tumour", 8, rng) is None  # no slice has the tumour label
    for _ in range(20):  # case "a" is never in its own support set
        idx_img, _ = pool.sample("organ", 8, rng, exclude="a")
        assert not any(torch.equal(x, y) for x in idx_img for y in pool.images[pool.case_of == "a"])


def test_mask_helpers_on_hand_made_shapes():
    lab = np.zeros((4, 6, 6), np.uint8)
    lab[1, 1:3, 1:3], lab[2, 2, 2], lab[3, 4, 4] = 4, 5, 1
    m = masks.mask_from_labels(lab, [4], [5])
    assert (m.dtype == np.uint8 and m[1, 1, 1] == 1 and m[2, 2, 2] == 2 and m[3, 4, 4] == 0
            and m.sum() == 4 + 2)
    assert (masks.mask_from_labels(lab, [1, 4], []) > 0).sum() == 5
    big = np.zeros((6, 10, 10), np.uint8)
    big[0:3, 0:3, 0:3], big[5, 8, 8] = 1, 2
    big[1, 1, 1] = 2
    kept = masks.largest_component(big)
    assert kept[5, 8, 8] == 0 and kept[1, 1, 1] == 2 and (kept > 0).sum() == 27


def test_dice_hand_made():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros_like(a)
    a[0, 0, :2] = True
    b[0, 0, 1:4] = True
    assert masks.dice(a, b) == pytest.approx(2 * 1 / 5)
    assert masks.dice(a, a) == 1.0
    assert masks.dice(a, np.zeros_like(a)) == 0.0
    assert masks.dice(np.zeros_like(a), np.zeros_like(a)) is None  # nothing to score


def run_masks(prep_dir, *argv):
    return subprocess.run([sys.executable, str(REPO / "02_masks.py"), "--prep", str(prep_dir), *argv],
                          capture_output=True, text=True)


def test_labels_method_is_exact_on_the_image_grid(tmp_path, small_prep):
    prep = shutil.copytree(small_prep, tmp_path / "prep")
    r = run_masks(prep)
    assert r.returncode == 0, r.stderr
    split = json.loads((prep / "split.json").read_text())
    for name in split["train"] + split["test"]:
        img = nib.load(prep / "images" / f"{name}.nii.gz")
        lab = np.asarray(nib.load(prep / "labels" / f"{name}.nii.gz").dataobj)
        m = nib.load(prep / "masks" / f"{name}.nii.gz")
        assert m.get_data_dtype() == np.uint8 and m.shape == img.shape
        np.testing.assert_array_equal(m.affine, img.affine)  # bit for bit
        for key in ("srow_x", "srow_y", "srow_z", "pixdim", "quatern_b", "qoffset_x"):
            np.testing.assert_array_equal(m.header[key], img.header[key])
        expect = np.where(lab == 5, 2, np.where(lab == 4, 1, 0))
        np.testing.assert_array_equal(np.asarray(m.dataobj), expect)
    summary = json.loads((prep / "masks" / "summary.json").read_text())
    assert summary["counts"]["ok"] == 4 and summary["counts"]["empty"] == 0
    assert any(c["tumour_voxels"] > 0 for c in summary["cases"])
    assert (prep / "masks" / "previews" / f"{split['train'][0]}.png").exists()
    # any label ids: liver + spleen as the organ, no tumour (settings changed -> --overwrite)
    r = run_masks(prep, "--organ", "1,3", "--tumour", "")
    assert r.returncode != 0 and "other settings" in r.stderr
    r = run_masks(prep, "--organ", "1,3", "--tumour", "", "--overwrite")
    assert r.returncode == 0, r.stderr
    name = split["train"][0]
    lab = np.asarray(nib.load(prep / "labels" / f"{name}.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(prep / "masks" / f"{name}.nii.gz").dataobj),
                                  np.isin(lab, [1, 3]))


def test_empty_and_unlabelled_cases_are_reported(tmp_path, small_prep):
    prep = shutil.copytree(small_prep, tmp_path / "prep")
    name = json.loads((prep / "split.json").read_text())["train"][0]
    (prep / "labels" / f"{name}.nii.gz").unlink()  # an unlabelled case
    r = run_masks(prep, "--organ", "9", "--tumour", "")  # an organ id nobody has: every mask empty
    assert r.returncode == 0, r.stderr
    s = json.loads((prep / "masks" / "summary.json").read_text())
    assert s["counts"] == {"cases": 4, "ok": 3, "skipped": 1, "empty": 3, "with_tumour": 0}
    assert s["warnings"] == [masks.NO_TUMOUR] and "WARNING: no mask holds a tumour" in r.stdout
    rec = {c["case"]: c for c in s["cases"]}
    assert "no label map" in rec[name]["reason"]
    assert all("empty mask" in c["warnings"][0] for c in s["cases"] if c["status"] == "ok")


def test_universeg_end_to_end_with_small_random_weights(tmp_path, small_prep):
    prep = shutil.copytree(small_prep, tmp_path / "prep")
    torch.manual_seed(0)
    torch.save(masks.UniverSeg().state_dict(), tmp_path / "w.pt")
    r = run_masks(prep, "--method", "universeg", "--weights", tmp_path / "w.pt", "--support-size", "3",
                  "--resolution", "32", "--ensemble", "2", "--largest-component")
    assert r.returncode == 0, r.stderr
    s = json.loads((prep / "masks" / "summary.json").read_text())
    assert s["counts"]["ok"] == 4 and s["config"]["method"] == "universeg" and s["masks_per_second"] > 0
    for c in s["cases"]:  # labelled cases are scored against their labels (random weights: any value)
        assert 0.0 <= c["dice_organ"] <= 1.0
        m = nib.load(prep / "masks" / f"{c['case']}.nii.gz")
        assert m.shape == (96, 96, 16) and set(np.unique(np.asarray(m.dataobj))) <= {0, 1, 2}
    assert "UniverSeg on cpu (fp32)" in r.stdout and "Dice against the labels" in r.stdout
    r = run_masks(prep, "--method", "universeg")
    assert r.returncode != 0 and "needs --weights" in r.stderr


def test_tumour_support_from_another_labelled_set(tmp_path, small_prep):
    """A dataset without tumour labels (AbdomenCT-1K, TotalSegmentator) gets no tumour support of its
    own: 02 says so loudly. --tumour-support takes the tumour examples from another 01 folder. The
    UniverSeg here answers 'yes' everywhere (zero output weights, bias +5), so a task that runs
    covers every voxel: the masks show exactly which tasks ran."""
    prep = shutil.copytree(small_prep, tmp_path / "prep")
    for f in (prep / "labels").iterdir():  # no tumour in this dataset's labels
        img = nib.load(f)
        lab = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.where(lab == 5, 4, lab).astype(np.uint8), img.affine, img.header), f)
    model = masks.UniverSeg()
    state = model.state_dict()
    state["out_conv.conv.weight"].zero_()
    state["out_conv.conv.bias"].fill_(5.0)
    torch.save(state, tmp_path / "w.pt")
    args = ("--method", "universeg", "--weights", tmp_path / "w.pt", "--support-size", "3",
            "--resolution", "32", "--no-previews")
    r = run_masks(prep, *args)
    assert r.returncode == 0, r.stderr
    s = json.loads((prep / "masks" / "summary.json").read_text())
    assert s["counts"]["with_tumour"] == 0 and s["warnings"] == [masks.NO_TUMOUR]
    assert ("no support slice contains the tumour label" in r.stdout
            and "WARNING: no mask holds a tumour" in r.stdout)
    name = s["cases"][0]["case"]
    assert set(np.unique(np.asarray(nib.load(prep / "masks" / f"{name}.nii.gz").dataobj))) == {1}
    r = run_masks(prep, *args, "--tumour-support", small_prep, "--overwrite")
    assert r.returncode == 0, r.stderr
    s = json.loads((prep / "masks" / "summary.json").read_text())
    assert s["counts"]["with_tumour"] == 4 and s["warnings"] == []
    assert s["config"]["tumour_support"] == str(small_prep)
    assert "tumour support: " in r.stdout and str(small_prep) in r.stdout
    assert set(np.unique(np.asarray(nib.load(prep / "masks" / f"{name}.nii.gz").dataobj))) == {2}
    r = run_masks(prep, "--tumour-support", small_prep)
    assert r.returncode != 0 and "needs --method universeg" in r.stderr
