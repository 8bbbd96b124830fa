"""Shared fixtures: the repo on sys.path, the real data in tests/data (README there), small
phantom sets."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEST_DATA = REPO / "tests" / "data"

from common import load_stage  # noqa: E402

# Small phantoms (coarse voxels) keep the tests fast; 01 then targets a small grid too.
SMALL_PHANTOMS = ["--spacing-xy", "3.5", "4.5", "--spacing-z", "4", "6", "--z-extent", "120", "200",
                  "--previews", "0"]
SMALL_PREP = ["--spacing", "3", "3", "4", "--size", "96", "--depth", "16", "--workers", "1", "--no-previews"]


@pytest.fixture(scope="session")
def release_masks():
    """The two priori masks of the paper's release, with the structure vectors it computed."""
    return sorted((TEST_DATA / "lad_release_masks").glob("*.npz"))


@pytest.fixture(scope="session")
def totalseg_example():
    """TotalSegmentator's example CT and segmentation (Apache-2.0; tests/data/README.md)."""
    return TEST_DATA / "totalseg_example_ct_sm"


@pytest.fixture(scope="session")
def phantoms():
    return load_stage("00_phantoms")


@pytest.fixture(scope="session")
def prep():
    return load_stage("01_preprocess")


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory, phantoms):
    """Four small phantom cases (seed 1: three with a tumour) in raw/{images,labels}."""
    out = tmp_path_factory.mktemp("raw")
    phantoms.main(phantoms.get_args(["--out", str(out), "--n", "4", "--seed", "1", *SMALL_PHANTOMS]))
    return out


@pytest.fixture(scope="session")
def small_prep(tmp_path_factory, small_raw, prep):
    """small_raw preprocessed on a small grid (96×96×16 at 3×3×4 mm), with labels."""
    out = tmp_path_factory.mktemp("prep")
    prep.main(prep.get_args(["--images", str(small_raw / "images"), "--labels", str(small_raw / "labels"),
                             "--out", str(out), "--test-fraction", "0.5", *SMALL_PREP]))
    return out


@pytest.fixture(scope="session")
def masked_prep(tmp_path_factory, small_prep):
    """small_prep plus masks from 02 (--method labels)."""
    prep = shutil.copytree(small_prep, tmp_path_factory.mktemp("masked") / "prep")
    r = subprocess.run([sys.executable, str(REPO / "02_masks.py"), "--prep", str(prep), "--no-previews"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return prep


def torchrun(cmd, nproc=2, timeout=300):
    """Run a stage's command line under torchrun with `nproc` CPU processes (gloo on the loopback
    interface); retried once if only the process group's set-up failed (a port taken meanwhile)."""
    def launch():
        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        full = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
                *cmd[1:]]
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    r = launch()
    if r.returncode != 0 and any(
            m in r.stderr for m in ("Address already in use", "Connection refused", "RendezvousError")):
        r = launch()
    return r
