"""Nothing a user owns is ever lost, and nothing stale or half-written is taken for a result.

One test per class of failure (docs/reliability.md lists each promise with its test):
data loss under hostile --out choices; leftovers of killed runs; one bad case costing only that
case; stale outputs after changed inputs or settings; resumes with other settings; bad arguments;
hostile files and checkpoints; degenerate sets in the evaluation.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

import common
from common import load_stage, read_nifti, save_checkpoint, write_nifti
from conftest import REPO, SMALL_PHANTOMS, SMALL_PREP

ph, pp, vq = load_stage("00_phantoms"), load_stage("01_preprocess"), load_stage("03_vqgan")
dm, ev = load_stage("04_diffusion"), load_stage("06_eval")


def hashes(folder):
    """sha1 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid():
    """The pid of a process that has exited (what a killed run's temp file names)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def run(script, *args, **kw):
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def refusal(stage, *argv):
    """Run a stage's main in this process (no interpreter start-up): it must stop with a message,
    which is returned (the one line a user sees)."""
    module = load_stage(stage)
    with pytest.raises(SystemExit) as e:
        module.main(module.get_args([str(a) for a in argv]))
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def prep_args(raw, out, *extra):
    return pp.get_args(["--images", str(raw / "images"), "--labels", str(raw / "labels"), "--out", str(out),
                        "--test-fraction", "0.5", *SMALL_PREP, *extra])


# --------------------------------------------------------------------------- 1, 2: data loss
def test_01_never_writes_where_its_inputs_live(tmp_path, small_raw):
    data = tmp_path / "data"
    shutil.copytree(small_raw, data / "raw")
    before = hashes(data)
    for out in (data, data / "raw", data / "raw" / "images", data / "raw" / "labels" / "sub", tmp_path):
        with pytest.raises(SystemExit, match="overlaps the input"):
            pp.main(prep_args(data / "raw", out))
        assert hashes(data) == before, f"--out {out} changed the inputs"
    assert sorted(p.name for p in data.iterdir()) == ["raw"]


def test_no_stage_writes_into_the_folders_it_reads(tmp_path, masked_prep):
    prep = shutil.copytree(masked_prep, tmp_path / "prep")
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "sample_00000.nii.gz").write_bytes(b"a sample")
    before = hashes(tmp_path)
    ckpts = ["--vqgan", tmp_path / "vq.pt", "--diffusion", tmp_path / "diff.pt"]
    for stage, argv in (("03_vqgan", ["--prep", prep, "--perceptual-weight", "0"]),
                        ("04_diffusion", ["--prep", prep, "--vqgan", tmp_path / "vq.pt"]),
                        ("05_sample", ["--prep", prep, *ckpts]),
                        ("06_eval", ["--real", prep, "--fake", f"lad={samples}"]),
                        ("07_ssl_seg", ["--prep", prep, "--synthetic", f"lad={samples}"])):
        module = load_stage(stage)
        reads_samples = stage in ("06_eval", "07_ssl_seg")
        for out in (prep, prep / "images", tmp_path) + ((samples,) if reads_samples else ()):
            with pytest.raises(SystemExit, match="overlaps the input"):
                module.main(module.get_args([*map(str, argv), "--out", str(out)]))
            assert hashes(tmp_path) == before, (stage, out)


def test_00_never_replaces_or_mixes_with_a_users_files(tmp_path):
    out = tmp_path / "raw"
    small = ["--n", "2", *SMALL_PHANTOMS]
    ph.main(ph.get_args(["--out", str(out), *small]))
    ph.main(ph.get_args(["--out", str(out), *small]))  # its own, unchanged folder: rewritten, fine
    scan = out / "images" / "Case_00001_0000.nii.gz"
    img = nib.load(scan)
    # the user's scan, saved under a phantom's name
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), scan)
    before = hashes(out)
    with pytest.raises(SystemExit, match="did not write or that changed"):
        ph.main(ph.get_args(["--out", str(out), *small]))
    assert hashes(out) == before
    other = tmp_path / "mine"  # a folder with other file names gets no phantoms beside them
    (other / "images").mkdir(parents=True)
    (other / "images" / "patient7.nii.gz").write_bytes(b"the user's scan")
    with pytest.raises(SystemExit, match="patient7"):
        ph.main(ph.get_args(["--out", str(other), *small]))
    assert [p.name for p in other.rglob("*")] == ["images", "patient7.nii.gz"]


# --------------------------------------------------------------------------- 5: leftovers of killed runs
def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    pid = dead_pid()
    stale = [tmp_path / f".ckpt.pt.{pid}.tmp.pt", tmp_path / "masks" / f".Case_00001.nii.gz.{pid}.tmp.nii.gz"]
    live = tmp_path / f".log.csv.{os.getpid()}.tmp.csv"  # another rank, still writing
    mine = tmp_path / ".notes.tmp.txt"                  # not a name atomic_path makes
    for f in (*stale, live, mine):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half")
    assert sorted(common.prepare_out(tmp_path)) == sorted(stale)
    assert live.exists() and mine.exists() and not any(f.exists() for f in stale)


def test_01_killed_and_rerun_finishes_without_leftovers(tmp_path, small_raw):
    out = tmp_path / "prep"
    cmd = [sys.executable, str(REPO / "01_preprocess.py"), "--images", str(small_raw / "images"), "--labels",
           str(small_raw / "labels"), "--out", str(out), *SMALL_PREP]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # kill -9 once the first case is done, in the middle of the run
        if p.poll() is not None or list((out / "cases").glob("*.json")):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    (out / "images").mkdir(parents=True, exist_ok=True)
    torn = out / "images" / f".Case_00004.nii.gz.{dead_pid()}.tmp.nii.gz"  # as a kill leaves it
    torn.write_bytes(b"torn")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [f for f in out.rglob(".*") if ".tmp" in f.name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 4
    assert summary["counts"]["outputs"] == len(list((out / "images").glob("*.nii.gz")))


def test_02_killed_between_a_mask_and_its_record_redoes_that_case(tmp_path, masked_prep):
    prep = shutil.copytree(masked_prep, tmp_path / "prep")
    stamps = {p.name: p.stat().st_mtime_ns for p in (prep / "masks").glob("*.nii.gz")}
    case = sorted(stamps)[1].removesuffix(".nii.gz")
    (prep / "masks" / "cases" / f"{case}.json").unlink()  # the mask was written, its record not yet
    (prep / "masks" / f".{case}.nii.gz.{dead_pid()}.tmp.nii.gz").write_bytes(b"torn")
    r = run("02_masks.py", "--prep", prep, "--no-previews")
    assert r.returncode == 0, r.stderr[-1000:]
    redone = [n for n, t in stamps.items() if (prep / "masks" / n).stat().st_mtime_ns != t]
    assert redone == [f"{case}.nii.gz"] and not list((prep / "masks").glob(".*"))
    assert json.loads((prep / "masks" / "summary.json").read_text())["counts"]["ok"] == len(stamps)


# ------------------------------------------------------------------------ 4, 6: one bad case costs one case
def test_a_dead_01_worker_costs_its_case_only(tmp_path, small_raw, monkeypatch):
    real = pp._process

    def dies_on_case_2(spec, cfg, warnings):  # a worker killed for memory: no exception, the process is gone
        if spec["case"] == "Case_00002":
            os._exit(9)
        return real(spec, cfg, warnings)
    monkeypatch.setattr(pp, "_process", dies_on_case_2)  # forked workers inherit it
    out = tmp_path / "prep"
    pp.main(prep_args(small_raw, out, "--workers", "2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 3 and list(summary["skipped"]) == ["Case_00002"]
    assert "worker process died" in summary["skipped"]["Case_00002"]
    split = json.loads((out / "split.json").read_text())
    assert "Case_00002" not in split["train"] + split["test"] and len(split["train"] + split["test"]) == 3


def test_a_volume_without_a_mask_costs_that_volume(tmp_path, masked_prep, capsys):
    prep = shutil.copytree(masked_prep, tmp_path / "prep")
    split = json.loads((prep / "split.json").read_text())
    (prep / "masks" / f"{split['train'][0]}.nii.gz").unlink()  # 02 skipped it (no label map, say)
    got = common.read_split(prep, masks=True)
    assert got["train"] == split["train"][1:] and got["test"] == split["test"]
    assert split["train"][0] in capsys.readouterr().out
    r = run("03_vqgan.py", "--prep", prep, "--out", tmp_path / "vq", "--n-hiddens", "8", "--num-groups", "8",
            "--n-codes", "32", "--disc-channels", "8", "--perceptual-weight", "0", "--disc-start", "1",
            "--batch-size", "1", "--steps", "1", "--device", "cpu")
    assert r.returncode == 0 and "left out" in r.stdout, r.stderr[-2000:]
    with pytest.raises(SystemExit, match="split.json not found"):
        common.read_split(tmp_path)


def test_headers_are_checked_before_any_voxel_is_read(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 512))
    hdr.set_data_dtype(np.float32)  # 8 GiB promised by a 352-byte header
    hdr["vox_offset"] = 352
    (tmp_path / "huge.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 89)
    with pytest.raises(ValueError, match="promises 8.0 GiB"):
        read_nifti(tmp_path / "huge.nii")
    hdr.set_data_shape((64, 64, 16))  # within the limit but truncated: rejected without reading
    (tmp_path / "short.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 89)
    with pytest.raises(ValueError, match="truncated"):
        read_nifti(tmp_path / "short.nii")
    # a gzip: the header decides, before anything is decompressed
    write_nifti(tmp_path / "ok.nii.gz", np.zeros((64, 64, 64)), np.eye(4), np.float32)
    with pytest.raises(ValueError, match="over the 0.0001 GiB limit"):
        read_nifti(tmp_path / "ok.nii.gz", max_gb=1e-4)


def test_ct_stored_without_its_hu_offset_is_reported(tmp_path, small_raw, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    f = raw / "images" / "Case_00001_0000.nii.gz"
    img = nib.load(f)
    shifted = nib.Nifti1Image((np.asarray(img.dataobj).astype(np.int32) + 1024).astype(np.uint16), img.affine)
    shifted.header.set_slope_inter(1, 0)
    nib.save(shifted, f)
    pp.main(prep_args(raw, tmp_path / "prep"))
    assert "Case_00001" in capsys.readouterr().out
    rec = json.loads((tmp_path / "prep" / "cases" / "Case_00001.json").read_text())
    assert any("no air at all" in w for w in rec["warnings"])


# --------------------------------------------------------------------------- 7: stale or mixed outputs
def test_01_redoes_what_changed_and_refuses_another_dataset(tmp_path, small_raw, monkeypatch):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    out = tmp_path / "prep"
    pp.main(prep_args(raw, out))
    other = tmp_path / "other"  # the same case names from another folder: not this output's dataset
    shutil.copytree(small_raw, other)
    with pytest.raises(SystemExit, match="other settings \\(inputs\\)"):
        pp.main(prep_args(other, out))
    # an input changed since its case was done: that case is redone, the others kept
    f = raw / "images" / "Case_00003_0000.nii.gz"
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), f)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}
    pp.main(prep_args(raw, out))
    redone = [n for n, t in stamps.items() if (out / "cases" / n).stat().st_mtime_ns != t]
    assert redone == ["Case_00003.json"]
    # --overwrite with another HU window, killed after one case, then rerun without --overwrite
    real, seen = pp.process_case, []

    def killed_after_one(spec, job):
        if seen:
            raise KeyboardInterrupt
        seen.append(spec["case"])
        return real(spec, job)
    monkeypatch.setattr(pp, "process_case", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        pp.main(prep_args(raw, out, "--hu", "-200", "300", "--overwrite"))
    monkeypatch.setattr(pp, "process_case", real)
    pp.main(prep_args(raw, out, "--hu", "-200", "300"))
    for rec in (out / "cases").glob("*.json"):
        assert json.loads(rec.read_text())["settings"]["hu"] == [-200, 300], rec.name  # no mix of two windows


def test_02_refuses_masks_of_another_prep_and_a_failed_run_changes_nothing(tmp_path, masked_prep, small_raw):
    prep = shutil.copytree(masked_prep, tmp_path / "prep")
    cfg = (prep / "masks" / "config.json").read_bytes()
    r = run("02_masks.py", "--prep", prep, "--method", "universeg", "--weights", tmp_path / "missing.pt",
            "--no-previews")
    assert r.returncode != 0 and "missing.pt" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert (prep / "masks" / "config.json").read_bytes() == cfg  # the failed run left the record alone
    pp.main(prep_args(small_raw, prep, "--depth", "12", "--overwrite"))  # 01 redone with other slices
    r = run("02_masks.py", "--prep", prep, "--no-previews")
    assert r.returncode == 1 and "other settings (prep)" in r.stderr, r.stderr[-1000:]
    with pytest.raises(SystemExit, match="rerun 02_masks.py --overwrite"):  # 03-06: no 12 with 8 slices
        common.read_split(prep, masks=True)


# ------------------------------------------------------------------------ 8, 10: resumes, checkpoints, grids
def tiny_vqgan(path, seed=0):
    torch.manual_seed(seed)
    m = vq.VQGAN(n_hiddens=8, n_codes=32, num_groups=8)
    save_checkpoint({"step": 0, "model_kwargs": m.kwargs, "model": m.state_dict()}, path)
    return m


def test_resumes_and_samples_with_other_settings_are_refused(tmp_path, masked_prep):
    tiny_vqgan(tmp_path / "vq.pt")
    tiny_vqgan(tmp_path / "vq2.pt", seed=1)
    diff = ["--prep", masked_prep, "--out", tmp_path / "diff", "--dim", "8", "--dim-mults", "1", "2",
            "--attn-heads", "2", "--attn-dim-head", "8", "--timesteps", "10", "--batch-size", "2",
            "--n-preview", "0", "--log-every", "1", "--device", "cpu", "--workers", "1"]
    r = run("04_diffusion.py", *diff, "--vqgan", tmp_path / "vq.pt", "--steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    for extra, named in ((["--vqgan", tmp_path / "vq.pt", "--lr", "3e-4"], "--lr 0.0001 -> 0.0003"),
                         (["--vqgan", tmp_path / "vq2.pt"], "the --vqgan checkpoint"),
                         (["--vqgan", tmp_path / "vq.pt", "--timesteps", "20"], "timesteps")):
        message = refusal("04_diffusion", *diff, *extra, "--steps", "4")
        assert named in message and "--fresh" in message, (extra, message)
    log = (tmp_path / "diff" / "log.csv").read_text().split()
    assert [row.split(",")[0] for row in log] == ["step", "1", "2"]
    sample = ["--prep", masked_prep, "--out", tmp_path / "s", "--n-original", "1", "--n-augmented", "0",
              "--sampler", "ddim", "--steps", "2", "--device", "cpu"]
    ckpt = tmp_path / "diff" / "ckpt.pt"
    message = refusal("05_sample", *sample, "--diffusion", ckpt, "--vqgan", tmp_path / "vq2.pt")
    assert "another VQ-GAN" in message
    # another grid: the masks would put each sample in the wrong place (affine), so 05 refuses
    small = shutil.copytree(masked_prep, tmp_path / "small")
    for f in (small / "masks").glob("*.nii.gz"):
        m, aff = read_nifti(f, None)
        write_nifti(f, m[:64, :64], aff, np.uint8)
    message = refusal("05_sample", *sample, "--diffusion", ckpt, "--vqgan", tmp_path / "vq.pt",
                      "--prep", small)
    assert "holds volumes of shape" in message
    # NaN weights (a diverged run): refused before sampling, so no volume of NaN (or of zeros) is written
    ck = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in ck["ema"].items() if v.is_floating_point())
    ck["ema"][name] = torch.full_like(ck["ema"][name], float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    r = run("05_sample.py", *sample, "--diffusion", tmp_path / "nan.pt", "--vqgan", tmp_path / "vq.pt")
    assert r.returncode == 1 and "NaN or inf" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert not list((tmp_path / "s").glob("sample_*"))


def test_03_resume_on_other_data_is_refused(tmp_path, masked_prep):
    args = ["--out", tmp_path / "vq", "--n-hiddens", "8", "--num-groups", "8", "--n-codes", "32",
            "--disc-channels", "8", "--perceptual-weight", "0", "--batch-size", "1", "--device", "cpu"]
    r = run("03_vqgan.py", "--prep", masked_prep, *args, "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    other = shutil.copytree(masked_prep, tmp_path / "other")
    split = json.loads((other / "split.json").read_text())
    split["train"] = split["train"][:1]
    (other / "split.json").write_text(json.dumps(split))
    message = refusal("03_vqgan", "--prep", other, *args, "--steps", "2")
    assert "the training data" in message and "--fresh" in message


def test_corrupt_diverged_and_foreign_checkpoints_get_one_line(tmp_path):
    m = tiny_vqgan(tmp_path / "vq.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "vq.pt").read_bytes()[:500])
    with pytest.raises(SystemExit) as e:
        common.load_checkpoint(tmp_path / "torn.pt")
    assert "torn.pt" in str(e.value) and "weights_only=False" not in str(e.value)

    class Payload:  # a pickle that would run code: never unpickled
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="never unpickled"):
        common.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    sd = m.state_dict()
    sd[next(k for k, v in sd.items() if v.is_floating_point())] = torch.full_like(next(
        v for v in sd.values() if v.is_floating_point()), float("nan"))
    save_checkpoint({"model_kwargs": m.kwargs, "model": sd}, tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match="NaN or inf"):
        vq.load_vqgan(tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of 04_diffusion.py"):
        dm.load_denoiser(tmp_path / "vq.pt")


# --------------------------------------------------------------------------- 9: arguments
BAD_ARGS = {  # stage: [(arguments, the flag the one-line error must name)]
    "00_phantoms": [(["--n", "0"], "--n"), (["--n", "-3"], "--n"), (["--spacing-z", "5", "2"], "--spacing-z"),
                    (["--tumour-fraction", "2"], "--tumour-fraction"), (["--previews", "-1"], "--previews")],
    "01_preprocess": [(["--size", "0"], "--size"), (["--depth", "0"], "--depth"),
                      (["--hu", "0", "0"], "--hu"),
                      (["--hu", "400", "-1000"], "--hu"), (["--spacing", "1", "0", "1"], "--spacing"),
                      (["--organ", "abc"], "--organ"), (["--workers", "0"], "--workers"),
                      (["--test-fraction", "1.5"], "--test-fraction"), (["--n-test", "-1"], "--n-test"),
                      (["--window-stride", "0"], "--window-stride"),
                      (["--require-organs", "lungs"], "--require-organs")],
    "02_masks": [(["--organ", "abc"], "--organ"), (["--tumour", "x,y"], "--tumour"),
                 (["--support-size", "0"], "--support-size"), (["--ensemble", "0"], "--ensemble"),
                 (["--batch", "-1"], "--batch")],
    "03_vqgan": [(["--downsample", "3", "3", "3"], "--downsample"), (["--steps", "-5"], "--steps"),
                 (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
                 (["--n-codes", "0"], "--n-codes"), (["--lr", "0"], "--lr"), (["--lr", "-1e-4"], "--lr"),
                 (["--lambda-loc", "-1"], "--lambda-loc"),
                 (["--disc-start", "-1"], "--disc-start"), (["--save-every", "0"], "--save-every"),
                 (["--log-every", "0"], "--log-every"), (["--grad-clip", "-1"], "--grad-clip")],
    "04_diffusion": [(["--grad-accum", "0"], "--grad-accum"), (["--p-uncond", "2"], "--p-uncond"),
                     (["--p-uncond", "-0.1"], "--p-uncond"), (["--steps", "0"], "--steps"),
                     (["--batch-size", "0"], "--batch-size"), (["--timesteps", "0"], "--timesteps"),
                     (["--lr", "0"], "--lr"), (["--ema-decay", "1.5"], "--ema-decay"),
                     (["--dim", "0"], "--dim"),
                     (["--n-preview", "-1"], "--n-preview"), (["--workers", "0"], "--workers"),
                     (["--micro-batch", "-1"], "--micro-batch"),
                     (["--preview-steps", "0"], "--preview-steps")],
    "05_sample": [(["--n-original", "0", "--n-augmented", "0"], "--n-augmented"),
                  (["--n-original", "-1"], "--n-original"),
                  (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
                  (["--guidance", "-1"], "--guidance"), (["--scale", "1.1", "0.9"], "--scale"),
                  (["--flip-prob", "2"], "--flip-prob"), (["--elastic-sigma", "0"], "--elastic-sigma")],
    "06_eval": [(["--pairs", "0"], "--pairs"), (["--batch-size", "0"], "--batch-size"),
                (["--fidelity-steps", "-1"], "--fidelity-steps"),
                (["--fidelity-shift", "2"], "--fidelity-shift"),
                (["--fidelity-width", "0"], "--fidelity-width"), (["--fake", "runs/samples"], "--fake"),
                (["--fake", "a/b=runs/samples"], "--fake"), (["--fake", "lad="], "--fake")],
    "07_ssl_seg": [(["--runs", "0"], "--runs"), (["--iters", "-1"], "--iters"), (["--lr", "0"], "--lr"),
                   (["--window", "275", "-125"], "--window"), (["--pool-train", "0"], "--pool-train"),
                   (["--chunks", "0"], "--chunks"), (["--proto-thresh", "2"], "--proto-thresh"),
                   (["--scale", "1.2", "0.9"], "--scale"), (["--lr-step", "0"], "--lr-step"),
                   (["--synthetic", "runs/samples"], "--synthetic"), (["--organs", "liver"], "--organs")],
}


@pytest.mark.parametrize("stage", sorted(BAD_ARGS))
def test_bad_arguments_exit_2_with_one_line_naming_the_flag(stage, capsys):
    module = load_stage(stage)
    for argv, flag in BAD_ARGS[stage]:
        with pytest.raises(SystemExit) as e:
            module.get_args(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"argument {flag}" in err, (argv, err)


def test_stages_need_their_inputs_and_say_so(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("03_vqgan.py", "--prep", empty, "--perceptual-weight", "0", "--out", tmp_path / "v")  # the CLI
    one_line = len(r.stderr.strip().splitlines()) == 1
    assert r.returncode == 1 and "Traceback" not in r.stderr and one_line, r.stderr
    assert "split.json" in r.stderr
    message = refusal("04_diffusion", "--prep", empty, "--vqgan", tmp_path / "none.pt",
                      "--out", tmp_path / "d")
    assert "none.pt: no checkpoint here" in message
    assert "split.json not found" in refusal("06_eval", "--real", empty, "--out", tmp_path / "e")
    listed = tmp_path / "listed"  # a split that names a volume whose file is gone: that volume is left out
    (listed / "images").mkdir(parents=True)
    (listed / "split.json").write_text(json.dumps({"train": ["gone"], "test": []}))
    message = refusal("03_vqgan", "--prep", listed, "--perceptual-weight", "0", "--out", tmp_path / "v2")
    assert "no training volume with a mask" in message
    # a folder that cannot be written, a full disk: one line, no traceback
    def denied(*args):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(common.Path, "write_bytes", denied)
    with pytest.raises(SystemExit, match="cannot write here \\(Permission denied\\)"):
        common.prepare_out(tmp_path / "ro")

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt.pt"))
    with pytest.raises(SystemExit, match="ckpt.pt: No space left on device"):
        common.run_stage(full_disk, lambda: None)


# --------------------------------------------------------------------------- 3, 10: degenerate sets in 06
def test_fid_refuses_one_sample_and_nan_instead_of_hanging():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ev.fid(a, b[:1])
    b[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ev.fid(a, b)


def test_ms_ssim_works_on_fewer_than_16_slices():
    torch.manual_seed(0)
    for depth in (1, 4, 8, 12):
        x = torch.rand(2, 1, depth, 32, 32, dtype=torch.float64)
        same = ev.ms_ssim_3d(x, x, 1.0)
        torch.testing.assert_close(same, torch.ones(2, dtype=torch.float64))  # identical volumes: exactly 1
        assert torch.isfinite(ev.ms_ssim_3d(x, torch.rand_like(x), 1.0)).all()


def test_06_rejects_a_single_volume_set_and_skips_nan_or_blank_volumes(tmp_path, masked_prep):
    split = json.loads((masked_prep / "split.json").read_text())
    img, aff = read_nifti(masked_prep / "images" / f"{split['train'][0]}.nii.gz")
    one = tmp_path / "one"
    write_nifti(one / "s0.nii.gz", np.rint(img * 1400 - 1000), aff, np.int16)
    eval_args = ["--real", str(masked_prep), "--out", str(tmp_path / "eval"), "--med3d-depth", "10",
                 "--pairs", "2", "--fidelity-steps", "0"]
    with pytest.raises(SystemExit, match="a set needs at least 2"):
        ev.main(ev.get_args([*eval_args, "--fake", f"one={one}"]))
    bad = tmp_path / "bad"
    write_nifti(bad / "s0.nii.gz", np.full(img.shape, np.nan), aff, np.float32)   # NaN (a float volume)
    write_nifti(bad / "s1.nii.gz", np.zeros(img.shape), aff, np.int16)            # what NaN weights wrote
    for i in (2, 3):
        write_nifti(bad / f"s{i}.nii.gz", np.rint(img * 1400 - 1000), aff, np.int16)
    res = ev.main(ev.get_args([*eval_args, "--fake", f"bad={bad}"]))
    assert res["bad"]["n"] == 2 and np.isfinite(res["bad"]["fid"])
