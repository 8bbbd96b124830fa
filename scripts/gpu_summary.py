"""The summary of scripts/gpu_check.sh: its figures against the targets, as runs/gpu_check/summary.json and
summary.md. Reads bench_bf16.json and bench_fp32.json (bench.py), vqgan/log.csv and diffusion/log.csv (03, 04)
and gpu_tests.xml (pytest) from --out; a missing input is reported as missing, not as a pass.

The paper's chain for one model is one VQ-GAN (50k iterations), one diffusion model (150k steps at batch 20)
and one set of 800 DDPM-300 samples, from the bf16 step times measured here.
"""
import argparse
import csv
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import save_json  # noqa: E402

TARGETS = {  # name: (comparison, value)
    "diffusion MFU (bf16, batch 20)": (">=", 0.35),
    "VQ-GAN MFU (bf16)": (">=", 0.15),
    "DDIM-50 s/volume (decoded)": ("<=", 1.0),
    "DDPM-300 s/volume (decoded)": ("<=", 5.0),
    "paper chain for one model, hours": ("<=", 8.0),
}
SCHEDULE = dict(vqgan_steps=50_000, diffusion_steps=150_000, samples=800)


def bench_rows(path):
    if not path.is_file():
        return {}
    return {r["name"]: r for r in json.loads(path.read_text())["rows"]}


def loss_fall(path, column):
    """(first, last) logged value of a column of a training log, or None if the log is missing."""
    if not path.is_file():
        return None
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get(column) not in (None, "")]
    return (float(rows[0][column]), float(rows[-1][column])) if len(rows) >= 2 else None


def tests_result(path):
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return dict(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"])


def summarise(out):
    bf16, fp32 = bench_rows(out / "bench_bf16.json"), bench_rows(out / "bench_fp32.json")
    get = lambda rows, name, key: rows.get(name, {}).get(key)
    per_volume = lambda name: (get(bf16, name, "median_s") / get(bf16, name, "volumes")
                               if get(bf16, name, "median_s") is not None else None)
    vq_s = get(bf16, "VQ-GAN training step", "median_s")
    dm_s = get(bf16, "diffusion training step", "median_s")
    ddpm = per_volume("sampling DDPM-300 + decode")
    chain = (None if None in (vq_s, dm_s, ddpm) else
             (SCHEDULE["vqgan_steps"] * vq_s + SCHEDULE["diffusion_steps"] * dm_s
              + SCHEDULE["samples"] * ddpm) / 3600)
    figures = {
        "diffusion MFU (bf16, batch 20)": get(bf16, "diffusion training step", "mfu"),
        "VQ-GAN MFU (bf16)": get(bf16, "VQ-GAN training step", "mfu"),
        "DDIM-50 s/volume (decoded)": per_volume("sampling DDIM-50 + decode"),
        "DDPM-300 s/volume (decoded)": ddpm,
        "paper chain for one model, hours": chain,
    }
    checks = {}
    for name, (op, target) in TARGETS.items():
        v = figures[name]
        ok = None if v is None else (v >= target if op == ">=" else v <= target)
        checks[name] = dict(value=v, target=f"{op} {target}", passed=ok)
    info = {k: json.loads((out / f).read_text())["info"] for k, f in
            (("bf16", "bench_bf16.json"), ("fp32", "bench_fp32.json")) if (out / f).is_file()}
    return dict(
        date=time.strftime("%Y-%m-%d"), device=next((i["device_name"] for i in info.values()), None),
        checks=checks, gpu_tests=tests_result(out / "gpu_tests.xml"),
        bench={"bf16": bf16, "fp32": fp32}, bench_info=info,
        losses={"VQ-GAN L1 (first, last logged)": loss_fall(out / "vqgan" / "log.csv", "l1"),
                "diffusion loss (first, last logged)": loss_fall(out / "diffusion" / "log.csv", "loss")})


def markdown(s):
    mark = {True: "pass", False: "**fail**", None: "missing"}
    pct = lambda v: "—" if v is None else f"{100 * v:.1f} %"
    lines = [f"GPU check · {s['device'] or 'unknown device'} · {s['date']}", "",
             "| target | measured | wanted | |", "|---|---|---|---|"]
    for name, c in s["checks"].items():
        value = c["value"]
        shown = "—" if value is None else (f"{100 * value:.1f} %" if "MFU" in name else f"{value:.3g}")
        lines.append(f"| {name} | {shown} | {c['target']} | {mark[c['passed']]} |")
    lines += ["", "| bench (paper shapes) | bf16 ms | fp32 ms | bf16 MFU | fp32 MFU | bf16 peak GB |",
              "|---|---|---|---|---|---|"]
    for name, r in s["bench"]["bf16"].items():
        f = s["bench"]["fp32"].get(name, {})
        ms = lambda row: "—" if "median_s" not in row else f"{1000 * row['median_s']:.1f}"
        lines.append(f"| {name} | {ms(r)} | {ms(f)} | {pct(r.get('mfu'))} | {pct(f.get('mfu'))} | "
                     f"{r.get('peak_mem_gb', 0):.1f} |")
    lines += [""]
    for name, fall in s["losses"].items():
        trend = None if fall is None else ("falls" if fall[1] < fall[0] else "does not fall")
        shown = "missing" if fall is None else f"{fall[0]:.4f} → {fall[1]:.4f} ({trend})"
        lines.append(f"- {name}: {shown}")
    t = s["gpu_tests"]
    lines.append("- GPU tests: " + ("missing" if t is None else f"{t['passed']} passed, "
                                    f"{t['failures'] + t['errors']} failed, {t['skipped']} skipped"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="gpu_check.sh's output folder")
    args = p.parse_args(argv)
    s = summarise(args.out)
    save_json(s, args.out / "summary.json")
    text = markdown(s)
    (args.out / "summary.md").write_text(text)
    print(text + f"wrote {args.out / 'summary.json'} and {args.out / 'summary.md'}")
    return s


if __name__ == "__main__":
    main()
