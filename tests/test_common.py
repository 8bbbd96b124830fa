"""common.py: NIfTI geometry, atomic writes, checkpoints, precision, distributed, previews, stages."""
import json
import os
import socket
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import common


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    f = tmp_path / "out.json"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with common.atomic_path(f) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash while writing")
    assert f.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left behind
    with common.atomic_path(f) as tmp:
        assert tmp.name.endswith(".json") and tmp != f
        tmp.write_text("new")
    assert f.read_text() == "new"


def test_read_nifti_reorients_to_ras_and_keeps_world_positions(tmp_path):
    # A volume stored LPS-like (x and y flipped, oblique-free), one marked voxel.
    data = np.zeros((5, 6, 7), np.int16)
    data[1, 2, 3] = 7
    aff = np.array([[-2.0, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 3, -5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "x.nii.gz")
    world = aff @ [1, 2, 3, 1]

    arr, affine = common.read_nifti(tmp_path / "x.nii.gz", dtype=None)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert arr.dtype == np.int16 and arr.shape == (5, 6, 7)
    idx = np.argwhere(arr == 7)[0]
    np.testing.assert_allclose(affine @ [*idx, 1], world)
    np.testing.assert_allclose(common.spacing_of(affine), [2, 1.5, 3])


def test_write_nifti_roundtrip_and_header(tmp_path):
    a = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    aff = np.diag([1.6, 1.6, 2.3, 1.0])
    aff[:3, 3] = [-10, 5, 100]
    common.write_nifti(tmp_path / "y.nii.gz", a, aff, np.float32)
    img = nib.load(tmp_path / "y.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), a)
    np.testing.assert_allclose(img.affine, aff)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_read_nifti_names_the_file_on_a_truncated_gz(tmp_path):
    a = np.random.default_rng(0).integers(-1000, 400, (64, 64, 32)).astype(np.int16)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "good.nii.gz")
    raw = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.nii.gz"):
        common.read_nifti(tmp_path / "cut.nii.gz")


@pytest.mark.parametrize("name, cid", [("Case_00001_0000.nii.gz", "Case_00001"),
                                       ("Case_00001.nii.gz", "Case_00001"),
                                       ("pancreas_001.nii.gz", "pancreas_001"), ("s0011.nii", "s0011"),
                                       ("liver_12_0000.nii", "liver_12")])
def test_case_id(name, cid):
    assert common.case_id(name) == cid


def test_layout_conversion_is_a_transpose():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (X, Y, Z)
    d = common.xyz_to_dhw(a)
    assert d.shape == (4, 3, 2) and d[3, 2, 1] == a[1, 2, 3]
    np.testing.assert_array_equal(common.dhw_to_xyz(d), a)


def test_checkpoint_roundtrip_and_weights_only(tmp_path):
    obj = {"model": {"w": torch.arange(3.0)}, "step": 7, "args": {"lr": 1e-4, "name": "x"}}
    common.save_checkpoint(obj, tmp_path / "ckpt.pt")
    back = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert back["step"] == 7 and back["args"] == obj["args"]
    torch.testing.assert_close(back["model"]["w"], obj["model"]["w"])
    # an arbitrary pickled object is refused: checkpoints are never executed
    torch.save({"evil": common.Dist(0, 1, 0, torch.device("cpu"))}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="bad.pt: cannot load this checkpoint") as e:  # one line, the file
        common.load_checkpoint(tmp_path / "bad.pt")
    assert "weights_only=False" not in str(e.value)  # never the advice to unpickle it anyway
    with pytest.raises(SystemExit, match="missing.pt: no checkpoint here"):
        common.load_checkpoint(tmp_path / "missing.pt")


def test_seed_everything_repeats():
    common.seed_everything(3)
    a = (torch.rand(3), np.random.rand(3))
    common.seed_everything(3)
    b = (torch.rand(3), np.random.rand(3))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_precision_on_cpu():
    p = common.choose_precision("cpu")
    assert p.dtype is None and p.name == "fp32" and not p.scaler.is_enabled()
    with p.autocast():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    for want, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):  # the GPU's path, on the CPU
        p = common.choose_precision("cpu", want)
        with p.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
        assert p.name == want and p.scaler.is_enabled() == (want == "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precision_on_cuda():
    p = common.choose_precision("cuda")
    assert p.dtype in (torch.bfloat16, torch.float16)
    assert p.scaler.is_enabled() == (p.dtype is torch.float16)
    with p.autocast():
        y = torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
    assert y.dtype == p.dtype


def test_single_process_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = common.setup_distributed("cpu")
    assert (d.rank, d.world_size, d.is_main, d.device.type) == (0, 1, True, "cpu")


def test_distributed_gloo_group_of_one(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    d = common.setup_distributed("cpu")
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        t = torch.tensor([2.0])
        torch.distributed.all_reduce(t)
        assert t.item() == 2.0 and d.is_main
    finally:
        common.teardown_distributed()
    assert not torch.distributed.is_initialized()


def test_save_preview_writes_png(tmp_path):
    img = torch.rand(8, 20, 24)
    lab = np.zeros((8, 20, 24), np.uint8)
    lab[3:5, 5:10, 6:12] = 4
    common.save_preview(tmp_path / "p.png", [img, img.numpy()], [lab, None], ["a", "b"],
                        spacing=(2.3, 1.6, 1.6))
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_save_preview_slices_through_the_given_centres(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to read its titles
    img = np.zeros((8, 20, 24), np.float32)
    common.save_preview(tmp_path / "p.png", [img, img], None, ["a", "b"], centres=[(3, 12.4, 5.6), None])
    titles = [ax.get_title() for ax in figs[0].axes]
    assert titles[:3] == ["a · axial z=3", "coronal y=12", "sagittal x=6"]
    assert titles[3:] == ["b · axial z=4", "coronal y=10", "sagittal x=12"]       # the middle


def test_previews_keep_one_colour_per_structure_and_draw_a_legend(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    img = np.zeros((6, 20, 20), np.float32)
    labels = np.zeros((6, 20, 20), np.uint8)   # 01's label map: the liver (1) and the pancreas (4)
    labels[:, 2:8, 2:8], labels[:, 10:16, 10:16] = 1, 4
    mask = np.zeros((6, 20, 20), np.uint8)     # 02's mask of the same pancreas: organ (1), a tumour (2)
    mask[:, 10:16, 10:16], mask[:, 12:14, 12:14] = 1, 2
    common.save_preview(tmp_path / "a.png", img, labels)
    common.save_preview(tmp_path / "b.png", img, mask, names=common.MASK_NAMES)

    def drawn(fig):  # legend name -> colour, and the colours of the contours on the axial view
        box = fig.legends[0]
        legend = {t.get_text(): to_hex(h.get_color()) for t, h in zip(box.texts, box.legend_handles)}
        contours = {to_hex(c.get_edgecolor()[0]) for c in fig.axes[0].collections}
        return legend, contours

    (la, ca), (lb, cb) = drawn(figs[0]), drawn(figs[1])
    assert set(la) == {"liver", "pancreas"} and set(lb) == {"organ", "tumour"}
    assert la["pancreas"] == lb["organ"] == to_hex("gold")  # the organ of interest: gold in every stage
    assert lb["tumour"] != la["liver"] and ca == set(la.values()) and cb == set(lb.values())
    assert [ax.get_title() for ax in figs[1].axes] == ["axial z=3", "coronal y=10", "sagittal x=10"]


def test_duration_reads_as_a_person_would_say_it():
    assert [common.duration(s) for s in (0.53, 42, 210, 3 * 3600, 3 * 86400)] == \
        ["0.53 s", "42 s", "3.5 min", "3.0 h", "3.0 days"]


def test_load_stage_imports_without_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stage run by accident would write data/ here
    sys.modules.pop("00_phantoms", None)
    m = common.load_stage("00_phantoms")
    assert hasattr(m, "make_case") and common.load_stage("00_phantoms") is m
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="99_nothing"):
        common.load_stage("99_nothing")


def test_guard_settings_refuses_mixing_runs(tmp_path):
    p = tmp_path / "out" / "config.json"
    common.guard_settings(p, {"spacing": (1.6, 1.6, 2.3), "organ": 4})
    common.guard_settings(p, {"spacing": [1.6, 1.6, 2.3], "organ": 4})  # same settings (as JSON): fine
    with pytest.raises(SystemExit, match=r"other settings \(organ\)"):
        common.guard_settings(p, {"spacing": (1.6, 1.6, 2.3), "organ": 1})
    common.guard_settings(p, {"spacing": (1.6, 1.6, 2.3), "organ": 1}, overwrite=True)
    assert '"organ": 1' in p.read_text()


def test_csv_logger_starts_fresh_and_a_resume_drops_rows_past_its_step(tmp_path):
    p = tmp_path / "run" / "log.csv"
    write = common.csv_logger(p, ["step", "loss"])
    write([1, 0.123456789])
    write([2, 0.2])
    write([3, 0.3])  # logged after the step-2 checkpoint, then killed
    common.csv_logger(p, ["step", "loss"], start_step=2)([3, 0.31])  # resumed at 2: step 3 again, once
    assert p.read_text().splitlines() == ["step,loss", "1,0.123457", "2,0.2", "3,0.31"]
    common.csv_logger(p, ["step", "loss"], enabled=False)([4, 1.0])  # rank > 0: writes nothing
    assert p.read_text().splitlines()[-1] == "3,0.31"
    common.csv_logger(p, ["step", "loss"])
    assert p.read_text().splitlines() == ["step,loss"]


def test_soft_tissue_window_follows_the_prep_hu_window(tmp_path):
    assert common.soft_tissue(None) == pytest.approx((800 / 1400, 1300 / 1400))   # the paper's [-1000, 400]
    (tmp_path / "config.json").write_text(json.dumps({"hu": [-200, 300]}))
    assert common.soft_tissue(tmp_path) == pytest.approx((0.0, 1.0))
    (tmp_path / "config.json").write_text(json.dumps({"hu": [-100, 900]}))
    assert common.soft_tissue(tmp_path) == pytest.approx((0.0, 0.4))  # -200 HU clipped to the window
    # hu wins
    assert common.soft_tissue(tmp_path, hu=(-1000, 400)) == pytest.approx((800 / 1400, 1300 / 1400))
