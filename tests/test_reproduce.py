"""scripts/reproduce_paper.sh: it stops with a message naming what is missing, and every command it would run
(DRY=1) is accepted by that stage's own argument parser, so a renamed flag breaks this test, not a GPU run."""
import os
import shlex
import subprocess

import pytest

from conftest import REPO
from common import load_stage

SCRIPT = REPO / "scripts" / "reproduce_paper.sh"
pt = load_stage("scripts/paper_tables")


def run(env, tmp_path):
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env})


def test_missing_inputs_stop_with_a_message(tmp_path):
    stub = tmp_path / "py"
    stub.write_text("#!/bin/sh\nexit 0\n")          # a "python" that reports a CUDA device
    stub.chmod(0o755)
    r = run({"PY": str(stub), "UNIVERSEG": "", "MED3D": ""}, tmp_path)
    assert r.returncode == 2 and "UNIVERSEG" in r.stderr
    (tmp_path / "u.pt").touch()
    (tmp_path / "m.pth").touch()
    r = run({"PY": str(stub), "UNIVERSEG": str(tmp_path / "u.pt"), "MED3D": str(tmp_path / "m.pth"),
             "LPIPS": str(tmp_path), "ACT1K_IMAGES": ""}, tmp_path)
    assert r.returncode == 2 and "ACT1K_IMAGES" in r.stderr and "AbdomenCT-1K" in r.stderr


def dry_run(tmp_path, extra):
    """The commands the script would run (DRY=1), as (script, argv) pairs."""
    for d in ("ai", "al", "ts", "lpips", "msd/labelsTr"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / "u.pt").touch()
    (tmp_path / "m.pth").touch()
    env = {"DRY": "1", "ACT1K_IMAGES": str(tmp_path / "ai"), "ACT1K_LABELS": str(tmp_path / "al"),
           "TOTALSEG": str(tmp_path / "ts"), "UNIVERSEG": str(tmp_path / "u.pt"),
           "MED3D": str(tmp_path / "m.pth"), "LPIPS": str(tmp_path / "lpips"), **extra}
    r = run(env, tmp_path)
    assert r.returncode == 0, r.stderr
    cmds = []
    for line in r.stdout.splitlines():
        if line.startswith("+ "):
            c = shlex.split(line[2:])
            i = next(k for k, a in enumerate(c) if a.endswith(".py"))
            cmds.append((c[i][:-3], c[i + 1:]))
    return cmds


@pytest.mark.parametrize("extra", [{}, {"QUICK": "1", "NGPU": "2"}, {"TUMOUR_SUPPORT": "msd"}])
def test_every_command_parses(tmp_path, extra):
    extra = {k: str(tmp_path / v) if k == "TUMOUR_SUPPORT" else v for k, v in extra.items()}
    stages = {}
    for script, argv in dry_run(tmp_path, extra):
        stages.setdefault(script, []).append(argv)
    # both datasets (+ MSD tumour support on each grid), both VQ-GANs, five diffusion models,
    # 13 sample sets each (5 ✓/V0, 4 ×, 4 Table 3), 3 evaluations, Fig. 6, the tables
    assert {k: len(v) for k, v in stages.items()} == {
        "01_preprocess": 4 if "TUMOUR_SUPPORT" in extra else 2, "02_masks": 2, "03_vqgan": 4,
        "04_diffusion": 10, "05_sample": 26, "06_eval": 6, "07_ssl_seg": 2, "scripts/paper_tables": 2}
    for stage, argvs in stages.items():
        module = load_stage(stage)
        for argv in argvs:
            module.get_args(argv)                     # argparse exits on an unknown flag or a bad value
    if "TUMOUR_SUPPORT" in extra:
        assert all("--tumour-support" in argv for argv in stages["02_masks"])
    vq = [load_stage("03_vqgan").get_args(argv) for argv in stages["03_vqgan"]]
    if not extra.get("QUICK"):  # the schedule that made the paper's numbers, in fp32 as the release
        assert all((a.steps, a.disc_start, a.precision, a.grad_clip) == (50_000, 25_000, "fp32", 1.0)
                   for a in vq)


def test_the_rehearsal_runs_the_paper_runs_commands(tmp_path):
    """TINY=1 is the same sequence of commands as the GPU run; only sizes, step counts and the weights'
    offline paths differ (and it makes its own phantoms first)."""
    paper = dry_run(tmp_path, {})
    tiny = [c for c in dry_run(tmp_path, {"TINY": "1"}) if c[0] != "00_phantoms"]
    assert [s for s, _ in tiny] == [s for s, _ in paper]
    flags = lambda argv: [a for a in argv if a.startswith("--")]
    differ = {"--method", "--weights", "--perceptual-weights", "--perceptual-weight", "--med3d-weights",
              "--precision", "--med3d-depth"}
    for (stage, a), (_, b) in zip(tiny, paper):
        assert set(flags(b)) - differ <= set(flags(a)), (stage, set(flags(b)) - set(flags(a)))
        for f in ("--cond", "--lambda-loc", "--guidance", "--n-original", "--n-augmented", "--fake",
                  "--synthetic"):
            if f in b and f != "--n-augmented":
                assert [a[i + 1].split("=")[0] for i, x in enumerate(a) if x == f] == \
                       [b[i + 1].split("=")[0] for i, x in enumerate(b) if x == f], (stage, f)
