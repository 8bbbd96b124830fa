"""scripts/gpu_check.sh and scripts/gpu_summary.py: the script is valid bash, its dry run prints every
command and each is accepted by its own argument parser (a renamed flag fails here, not on the first GPU),
and the summary's pass/fail against hand-made results."""
import json
import os
import shlex
import subprocess

import pytest

from conftest import REPO
from common import load_stage

SCRIPT = REPO / "scripts" / "gpu_check.sh"
summary = load_stage("scripts/gpu_summary")


def test_script_is_valid_bash_and_its_dry_run_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "DRY": "1", "LPIPS": "weights/lpips"})
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    scripts = [next(a for a in c if a.endswith(".py")) for c in cmds if any(a.endswith(".py") for a in c)]
    assert scripts == ["bench.py", "bench.py", "00_phantoms.py", "01_preprocess.py", "02_masks.py",
                       "03_vqgan.py", "04_diffusion.py", "scripts/gpu_summary.py"]
    assert cmds[0][1:4] == ["-m", "pytest", "-q"] and "gpu" in cmds[0]
    for c in cmds[1:]:
        i = next(k for k, a in enumerate(c) if a.endswith(".py"))
        name, argv = c[i][:-3], c[i + 1:]
        if name == "scripts/gpu_summary":
            assert argv == ["--out", "runs/gpu_check"]  # run below on made-up results
            continue
        args = load_stage(name).get_args(argv)
        if name == "bench":
            assert args.precision in ("bf16", "fp32") and not args.small  # the paper's shapes
        if name in ("03_vqgan", "04_diffusion"):
            assert args.steps == 300 and args.fresh
        if name == "03_vqgan":
            assert str(args.perceptual_weights) == "weights/lpips"


def write_bench(path, rows):
    path.write_text(json.dumps({"info": {"device_name": "Test GPU"}, "rows": rows}))


def test_summary_against_hand_made_results(tmp_path):
    row = lambda name, s, mfu, vols=1: dict(name=name, median_s=s, mfu=mfu, volumes=vols, peak_mem_gb=10.0)
    write_bench(tmp_path / "bench_bf16.json", [
        row("VQ-GAN training step", 0.1, 0.20, 2), row("diffusion training step", 0.05, 0.30, 20),
        row("sampling DDIM-50 + decode", 2.0, 0.1, 4), row("sampling DDPM-300 + decode", 24.0, 0.1, 4)])
    (tmp_path / "vqgan").mkdir()
    (tmp_path / "vqgan" / "log.csv").write_text("step,l1\n25,0.5\n50,0.3\n300,0.1\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1"/></testsuites>')
    s = summary.main(["--out", str(tmp_path)])
    c = {k: (v["value"], v["passed"]) for k, v in s["checks"].items()}
    assert c["VQ-GAN MFU (bf16)"] == (0.20, True)
    assert c["diffusion MFU (bf16, batch 20)"] == (0.30, False)
    assert c["DDIM-50 s/volume (decoded)"] == (0.5, True)             # 2 s for 4 volumes
    assert c["DDPM-300 s/volume (decoded)"] == (6.0, False)           # 24 s for 4
    # 50k × 0.1 s + 150k × 0.05 s + 800 × 6 s = 17,300 s
    assert c["paper chain for one model, hours"][0] == pytest.approx(17_300 / 3600)
    assert s["losses"]["VQ-GAN L1 (first, last logged)"] == (0.5, 0.1)
    assert s["losses"]["diffusion loss (first, last logged)"] is None   # no 04 log: missing, not a pass
    assert s["gpu_tests"] == dict(tests=4, failures=1, errors=0, skipped=1, passed=2)
    md = (tmp_path / "summary.md").read_text()
    assert "Test GPU" in md and "| VQ-GAN MFU (bf16) | 20.0 % | >= 0.15 | pass |" in md
    assert "**fail**" in md and "0.5000 → 0.1000 (falls)" in md
    assert "diffusion loss (first, last logged): missing" in md
    # nothing measured at all: every target is missing
    empty = summary.main(["--out", str(tmp_path / "none")])
    assert all(v["passed"] is None for v in empty["checks"].values())
