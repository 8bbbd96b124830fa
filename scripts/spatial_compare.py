"""Beyond the paper: the spatial condition (04 --spatial) against Lad and V0 on the demo's data.

Trains four denoisers at the same budget for each seed -- Lad (--cond both), V0 (--cond none), spatial
(--cond none --spatial) and spatial + global (--cond both --spatial) -- two at a time, one core each;
samples each with 05 and evaluates the four sets together with 06. Writes <out>/seed<k>/ per seed and
<out>/table.md + <out>/results.json: every metric per seed and the mean over the seeds.

    make demo-spatial        # after `make demo` (its phantoms, masks and VQ-GAN); about 75 min on 2 cores
    python scripts/spatial_compare.py --diff-args "..." --sample-args "..." --eval-args "..." --seeds 0 1
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"lad": ["--cond", "both"], "v0": ["--cond", "none"], "spatial": ["--cond", "none", "--spatial"],
          "spatial_global": ["--cond", "both", "--spatial"]}
# (column, how to read it from 06's metrics.json, digits)
COLUMNS = [("FID", lambda r: r["fid"], 4), ("MMD", lambda r: r["mmd"], 4),
           ("FID local", lambda r: r["fid_local"], 4), ("MMD local", lambda r: r["mmd_local"], 4),
           ("MS-SSIM", lambda r: r["ms_ssim"], 4), ("Dice organ", lambda r: r["fidelity"]["dice_organ"], 3),
           ("Dice tumour", lambda r: r["fidelity"]["dice_tumour"], 3),
           ("contrast HU, own mask", lambda r: r["contrast"]["own_hu"], 1),
           ("contrast HU, another's", lambda r: r["contrast"]["shuffled_hu"], 1)]


def run(cmd, log=None):
    """Run a stage; with `log`, in the background on one core, its output in that file."""
    print("+", shlex.join(cmd), f"> {log}" if log else "", flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT)
        return None
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_pair(pair, seed, out, args):
    procs = []
    for name in pair:
        folder = out / f"seed{seed}" / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "04_diffusion.py", *shlex.split(args.diff_args), *MODELS[name],
               "--seed", str(seed), "--out", str(folder)]
        procs.append((name, run(cmd, folder.parent / f"{name}.log")))
    for name, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"error: 04_diffusion.py for {name}, seed {seed} failed: see "
                             f"{out / f'seed{seed}' / f'{name}.log'}")


def table(out, seeds):
    per_seed = {s: json.loads((out / f"seed{s}" / "eval" / "metrics.json").read_text())["results"]
                for s in seeds}
    rows, record = [], {}
    for name in ["real", *MODELS]:
        cells, record[name] = [], {}
        for col, get, digits in COLUMNS:
            vals = []
            for s in seeds:
                try:
                    vals.append(get(per_seed[s][name]))
                except (KeyError, TypeError):
                    vals.append(None)
            record[name][col] = vals
            known = [v for v in vals if v is not None]
            cells.append("–" if not known else f"{sum(known) / len(known):.{digits}f} ("
                         + " / ".join("–" if v is None else f"{v:.{digits}f}" for v in vals) + ")")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    head = ("| set | " + " | ".join(c for c, _, _ in COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|\n")
    note = (f"Mean over seeds {', '.join(map(str, seeds))} (each seed in brackets); 06 with random "
            f"MedicalNet features on the demo's phantoms. Lad and V0 are the paper's; spatial and "
            f"spatial_global are not.")
    text = f"{note}\n\n{head}" + "\n".join(rows) + "\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"seeds": seeds, "columns": [c for c, _, _ in COLUMNS],
                                                  "results": record}, indent=1))
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diff-args", required=True, help="04's arguments shared by the four models")
    p.add_argument("--sample-args", required=True, help="05's arguments (without --diffusion, --out)")
    p.add_argument("--eval-args", required=True, help="06's arguments (without --fake, --out)")
    p.add_argument("--out", type=Path, default=Path("runs/demo/spatial"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    for seed in args.seeds:
        base = args.out / f"seed{seed}"
        train_pair(["lad", "v0"], seed, args.out, args)
        train_pair(["spatial", "spatial_global"], seed, args.out, args)
        for name in MODELS:
            run([sys.executable, "05_sample.py", *shlex.split(args.sample_args), "--seed", str(seed),
                 "--diffusion", str(base / name / "ckpt.pt"), "--out", str(base / f"samples_{name}")])
        run([sys.executable, "06_eval.py", *shlex.split(args.eval_args), "--out", str(base / "eval"),
             *(a for name in MODELS for a in ("--fake", f"{name}={base / f'samples_{name}'}"))])
    print(table(args.out, args.seeds))


if __name__ == "__main__":
    main()
