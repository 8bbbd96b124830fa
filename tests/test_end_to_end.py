"""Every stage in order, as a user runs them (one subprocess each), on six tiny phantoms: 00 → 07
with toy sizes and a few steps each. It checks that each stage finds what the one before wrote and
leaves what the next one reads; the other test files check what the numbers mean."""
import json
import math
import subprocess
import sys

from conftest import REPO, SMALL_PHANTOMS

TINY_PREP = ["--size", "32", "--depth", "8", "--spacing", "9", "9", "12", "--hu", "-200", "300",
             "--n-test", "2", "--workers", "1", "--no-previews"]


def run(stage, *argv):
    r = subprocess.run([sys.executable, str(REPO / stage), *map(str, argv)], capture_output=True, text=True)
    assert r.returncode == 0, f"{stage} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_every_stage_in_order_on_tiny_phantoms(tmp_path):
    raw, prep, runs = tmp_path / "raw", tmp_path / "prep", tmp_path / "runs"
    run("00_phantoms.py", "--out", raw, "--n", "6", "--seed", "0", *SMALL_PHANTOMS)
    run("01_preprocess.py", "--images", raw / "images", "--labels", raw / "labels", "--out", prep,
        *TINY_PREP)
    split = json.loads((prep / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["test"]) == 2

    run("02_masks.py", "--prep", prep, "--method", "labels", "--no-previews")
    assert len(list((prep / "masks").glob("*.nii.gz"))) == 6

    run("03_vqgan.py", "--prep", prep, "--out", runs / "vqgan", "--steps", "4", "--disc-start", "2",
        "--batch-size", "2", "--n-hiddens", "4", "--num-groups", "4", "--n-codes", "64",
        "--disc-channels", "8", "--perceptual-weight", "0", "--log-every", "2", "--save-every", "4")
    metrics = json.loads((runs / "vqgan" / "metrics.json").read_text())
    assert metrics["n_test"] == 2 and math.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1

    vqgan = runs / "vqgan" / "ckpt.pt"
    run("04_diffusion.py", "--prep", prep, "--vqgan", vqgan, "--out", runs / "diffusion", "--steps", "4",
        "--batch-size", "2", "--dim", "8", "--dim-mults", "1", "2", "--attn-heads", "2",
        "--attn-dim-head", "8", "--timesteps", "20", "--ema-start", "2", "--log-every", "2",
        "--save-every", "4", "--n-preview", "0", "--workers", "1")
    assert (runs / "diffusion" / "ckpt.pt").is_file()

    run("05_sample.py", "--prep", prep, "--vqgan", vqgan, "--diffusion", runs / "diffusion" / "ckpt.pt",
        "--out", runs / "samples", "--n-original", "2", "--n-augmented", "1", "--sampler", "ddim",
        "--steps", "4", "--no-previews")
    index = json.loads((runs / "samples" / "samples.json").read_text())
    assert index["written"] == {"original": 2, "augmented": 1}

    run("06_eval.py", "--real", prep, "--fake", f"lad={runs / 'samples'}", "--out", runs / "eval",
        "--med3d-depth", "10", "--pairs", "4", "--fidelity-steps", "2", "--fidelity-batch", "4",
        "--fidelity-width", "4")
    results = json.loads((runs / "eval" / "metrics.json").read_text())["results"]
    assert results["lad"]["n"] == 3 and math.isfinite(results["lad"]["fid"])
    assert 0 <= results["lad"]["fidelity"]["dice_organ"] <= 1

    run("07_ssl_seg.py", "--prep", prep, "--synthetic", f"lad={runs / 'samples'}", "--out", runs / "ssl",
        "--train", "real", "synthetic", "--backbone", "resnet18", "--iters", "2", "--runs", "1",
        "--sp-min-size", "20", "--pool-train", "1", "--pool-test", "1", "--log-every", "1",
        "--save-every", "2", "--workers", "1")
    summary = json.loads((runs / "ssl" / "results.json").read_text())["summary"]
    assert set(summary) == {"real", "synthetic-lad"}
    assert all(0 <= row["mean"]["mean"] <= 1 for row in summary.values())
