"""The demo must learn, not only run: `make demo` end to end into a temporary folder, then the learning
checks of tests/learning_checks.py (VQ-GAN PSNR, diffusion losses, Lad's mask fidelity and organ contrast
above V0's). About 12 minutes on 2 CPU cores, so marked slow; CI runs `make demo`, which ends with the
same checks."""
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
import learning_checks  # noqa: E402


@pytest.mark.slow
def test_demo_learns(tmp_path):
    r = subprocess.run(["make", "-C", str(REPO), "demo", f"DEMO={tmp_path / 'data'}",
                        f"DEMO_RUNS={tmp_path / 'runs'}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = learning_checks.run_checks(tmp_path / "runs")
    assert all(ok for _, _, ok in checks), "\n".join(
        f"{n}: {f} {'ok' if ok else 'FAILED'}" for n, f, ok in checks)
