"""Did the demo learn? Checks on the outputs of `make demo` (runs/demo), shared by the Makefile's last
step and the slow test in tests/test_learning.py, so a regression that stops a model learning fails both.

    python tests/learning_checks.py runs/demo        # prints each check with its figure; exit 1 if one fails

The thresholds sit well below what the demo reaches on a 2-core CPU (README, "Two commands") and far above
what an untrained model gives (a VQ-GAN at initialisation: PSNR ≈ 10 dB; a probe trained on pairs whose
mask does not match the volume: Dice near 0).
"""
import csv
import json
import sys
from pathlib import Path

VQGAN_MIN_PSNR = 20.0         # dB on held-out volumes
LOSS_DROP = 0.4               # last logged diffusion loss / first logged loss must be below this
REAL_MIN_DICE = 0.4           # the fidelity probe trained on real data (the reference)
LAD_OVER_V0 = 0.05            # Lad's organ Dice minus V0's, same probe, same budget
CONTRAST_OVER_V0 = 20.0       # HU: Lad's organ contrast (inside its mask vs around it) minus V0's


def losses(log_csv):
    rows = list(csv.DictReader(Path(log_csv).read_text().splitlines()))
    return float(rows[0]["loss"]), float(rows[-1]["loss"])


def run_checks(runs):
    """[(name, figure as text, passed)] for a demo run folder (runs/demo)."""
    runs = Path(runs)
    out = []
    vq = json.loads((runs / "vqgan" / "metrics.json").read_text())
    out.append(("VQ-GAN held-out PSNR", f"{vq['psnr']:.2f} dB (box {vq['psnr_box']:.2f}) >= {VQGAN_MIN_PSNR}",
                vq["psnr"] >= VQGAN_MIN_PSNR))
    for name, folder in (("Lad", "diffusion"), ("V0", "diffusion_v0")):
        first, last = losses(runs / folder / "log.csv")
        out.append((f"{name} diffusion loss",
                    f"{first:.3f} -> {last:.3f} (ratio {last / first:.2f} < {LOSS_DROP})",
                    last < LOSS_DROP * first))
    res = json.loads((runs / "eval" / "metrics.json").read_text())["results"]
    real, lad, v0 = (res[k]["fidelity"]["dice_organ"] for k in ("real", "lad", "v0"))
    out.append(("fidelity probe on real data", f"organ Dice {real:.3f} >= {REAL_MIN_DICE}",
                real >= REAL_MIN_DICE))
    out.append(("fidelity: Lad above V0",
                f"organ Dice {lad:.3f} vs {v0:.3f} (margin {lad - v0:+.3f} >= {LAD_OVER_V0})",
                lad - v0 >= LAD_OVER_V0))
    lad, v0 = (res[k]["contrast"]["own_hu"] for k in ("lad", "v0"))
    out.append(("the organ where the mask says: Lad above V0",
                f"organ contrast {lad:.1f} vs {v0:.1f} HU (margin {lad - v0:+.1f} >= {CONTRAST_OVER_V0})",
                lad - v0 >= CONTRAST_OVER_V0))
    return out


def main(runs):
    checks = run_checks(runs)
    for name, figure, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {figure}")
    failed = [c for c in checks if not c[2]]
    print(f"learning checks: {len(checks) - len(failed)}/{len(checks)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
