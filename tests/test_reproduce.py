"""scripts/reproduce_paper.sh: it stops with a message naming what is missing, and every command it would run
(DRY=1) is accepted by that stage's own argument parser, so a renamed flag breaks this test, not a GPU run."""
import os
import shlex
import subprocess

import pytest

from conftest import REPO
from common import load_stage

SCRIPT = REPO / "scripts" / "reproduce_paper.sh"


def run(env, tmp_path):
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})


def test_missing_inputs_stop_with_a_message(tmp_path):
    stub = tmp_path / "py"
    stub.write_text("#!/bin/sh\nexit 0\n")          # a "python" that reports a CUDA device
    stub.chmod(0o755)
    r = run({"PY": str(stub), "UNIVERSEG": "", "MED3D": ""}, tmp_path)
    assert r.returncode == 2 and "UNIVERSEG" in r.stderr
    (tmp_path / "u.pt").touch(), (tmp_path / "m.pth").touch()
    r = run({"PY": str(stub), "UNIVERSEG": str(tmp_path / "u.pt"), "MED3D": str(tmp_path / "m.pth"), "LPIPS": str(tmp_path),
             "ACT1K_IMAGES": ""}, tmp_path)
    assert r.returncode == 2 and "ACT1K_IMAGES" in r.stderr and "AbdomenCT-1K" in r.stderr


@pytest.mark.parametrize("extra", [{}, {"QUICK": "1", "NGPU": "2"}])
def test_every_command_parses(tmp_path, extra):
    for d in ("ai", "al", "ts", "lpips"):
        (tmp_path / d).mkdir()
    (tmp_path / "u.pt").touch(), (tmp_path / "m.pth").touch()
    env = {"DRY": "1", "ACT1K_IMAGES": str(tmp_path / "ai"), "ACT1K_LABELS": str(tmp_path / "al"),
           "TOTALSEG": str(tmp_path / "ts"), "UNIVERSEG": str(tmp_path / "u.pt"), "MED3D": str(tmp_path / "m.pth"), "LPIPS": str(tmp_path / "lpips"), **extra}
    r = run(env, tmp_path)
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    stages = {}
    for c in cmds:
        i = next(k for k, a in enumerate(c) if a.endswith(".py"))
        stages.setdefault(c[i][:-3], []).append(c[i + 1:])
    # both datasets, both VQ-GANs, five diffusion models, 13 sample sets, 3 evaluations, Fig. 6
    assert {k: len(v) for k, v in stages.items()} == {"01_preprocess": 2, "02_masks": 2, "03_vqgan": 4, "04_diffusion": 10,
                                                       "05_sample": 26, "06_eval": 6, "07_ssl_seg": 2}
    for stage, argvs in stages.items():
        module = load_stage(stage)
        for argv in argvs:
            module.get_args(argv)                     # argparse exits on an unknown flag or a bad value
