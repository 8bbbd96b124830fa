"""Benchmark the three costs of the paper's schedule: a VQ-GAN training step, a diffusion training
step, and guided sampling (DDIM-50 and DDPM-300, decoded). Shapes are the paper's (docs/reference.md
§2-3) unless --small, which uses the CPU demo's (Makefile).

    python bench.py                  # the paper's shapes on the GPU
    python bench.py --small          # demo shapes; what CI runs on the CPU

Every number comes from the same code the stages run (03's and 04's `train_step`, 04's
`sample_latents`), with random weights: timing does not depend on them. Each measurement is
warm-up steps, then `--repeats` timed steps (CUDA events on the GPU, no sync inside the loop),
reported as the median. FLOPs are counted once per step with torch.utils.flop_counter
(convolutions, matmuls and attention; elementwise work is not counted), and MFU is that FLOP rate
over the peak this script measures with a large matmul in the run's precision (bf16 on CUDA, fp32
on the CPU), not over a datasheet figure. Prints a markdown table and writes JSON.
"""
import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import choose_precision, load_stage, peak_memory_gb, pick_device, print0, save_json

# The paper's shapes and model sizes are the stages' own defaults (03's and 04's get_args); --small
# overrides them with the demo's (Makefile).
VOLUME = {"paper": (32, 256, 256), "small": (16, 64, 64)}
SMALL_VQGAN = dict(n_hiddens=8, n_codes=512, num_groups=8, disc_channels=16, perceptual_weight=0.0)
SMALL_DIFFUSION = dict(dim=16, attn_heads=4, attn_dim_head=16, batch_size=8)


def stage_args(stage, small, overrides):
    """A stage's parsed defaults (the paper's settings), with the demo's sizes when `small`. 03 insists
    on a source for the LPIPS weights; bench never loads them (random weights cost the same)."""
    args = load_stage(stage).get_args(["--perceptual-weights", "auto"] if stage == "03_vqgan" else [])
    if small:
        vars(args).update(overrides)
    return args


def build_vqgan(va, device):
    vqgan = load_stage("03_vqgan")
    return vqgan.VQGAN(va.n_hiddens, va.downsample, va.embedding_dim, va.n_codes, va.num_groups).to(device)


def build_denoiser(da, latent, depth, device):
    diffusion = load_stage("04_diffusion")
    return diffusion.Denoiser(dict(mode="both", latent_shape=latent, depth=depth),
                       dict(channels=latent[0], dim=da.dim, dim_mults=da.dim_mults, heads=da.attn_heads,
                            dim_head=da.attn_dim_head)).to(device)


def latent_shape(va, volume):
    return (va.embedding_dim, *(n // f for n, f in zip(volume, va.downsample)))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the CPU demo's shapes (64×64×16, small widths)")
    p.add_argument("--only", nargs="+", choices=["vqgan", "diffusion", "ddim", "ddpm"],
                   default=["vqgan", "diffusion", "ddim", "ddpm"], help="what to time")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, allocator)")
    p.add_argument("--repeats", type=int, default=10, help="timed training steps (median reported)")
    p.add_argument("--sample-repeats", type=int, default=3, help="timed sampling runs (median reported)")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="volumes per sampling run (default: 4, --small: 1)")
    p.add_argument("--diffusion-batch", type=int, default=None,
                   help="diffusion training batch (default: 04's, 20; --small: 8); FLOPs scale "
                        "linearly with it")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks first")
    p.add_argument("--flops-only", action="store_true",
                   help="count the FLOPs of each step and stop (no timing): the paper's shapes on a "
                        "CPU, for estimates")
    p.add_argument("--out", type=Path, default=Path("runs/bench/bench.json"), help="JSON results")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, warmup, repeats):
    """Median seconds per call of fn(): CUDA events around each call, one synchronisation at the
    end (no host waits between calls); wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        times = [start.elapsed_time(end) / 1000 for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def count_flops(fn):
    """FLOPs of one call of fn() (forward and backward), by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, dtype, n=None, repeats=20):
    """FLOP/s of a large square matmul in `dtype`: the peak MFU is measured against."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    med, _ = time_it(lambda: a @ b, device, 3, repeats)
    return 2 * n**3 / med


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------- the three costs
def vqgan_step(small, device, prec, compile_):
    """03's train_step with both discriminators and the locality loss on (LPIPS too at the paper's shapes)."""
    vqgan = load_stage("03_vqgan")
    va = stage_args("03_vqgan", small, SMALL_VQGAN)
    model = build_vqgan(va, device)
    d2 = vqgan.PatchGAN(2, va.disc_channels, va.disc_layers).to(device)
    d3 = vqgan.PatchGAN(3, va.disc_channels, va.disc_layers).to(device)
    # LPIPS with random weights: the cost is the same as with the pretrained ones
    lpips = vqgan.LPIPS().to(device).eval().requires_grad_(False) if va.perceptual_weight > 0 else None
    fused = device.type == "cuda"
    opt_ae = torch.optim.Adam(model.parameters(), lr=va.lr, betas=(0.5, 0.9), fused=fused)
    opt_d = torch.optim.Adam([*d2.parameters(), *d3.parameters()], lr=va.lr, betas=(0.5, 0.9), fused=fused)
    nets = tuple(torch.compile(m) for m in (model, d2, d3)) if compile_ else (model, d2, d3)
    b = va.batch_size
    d, h, w = VOLUME["small" if small else "paper"]
    x = torch.rand(b, 1, d, h, w, device=device) * 2 - 1
    boxes = torch.tensor([[8, 24, h // 4, h // 2, w // 4, w // 2]] * b, device=device)
    has_box = torch.ones(b, dtype=torch.bool, device=device)
    step = lambda: vqgan.train_step(nets, (opt_ae, opt_d), lpips, prec, x, boxes, has_box, True, va)
    return step, b, f"{b}×1×{d}×{h}×{w}", lambda: count_flops(step)


def diffusion_step(small, device, prec, compile_, batch=None):
    """04's train_step: Unet3D + condition extractor ('both': content + Betti), one optimiser step."""
    diffusion = load_stage("04_diffusion")
    va = stage_args("03_vqgan", small, SMALL_VQGAN)
    da = stage_args("04_diffusion", small, SMALL_DIFFUSION)
    volume = VOLUME["small" if small else "paper"]
    latent = latent_shape(va, volume)
    model = build_denoiser(da, latent, volume[0], device)
    opt = torch.optim.Adam(model.parameters(), lr=da.lr, fused=device.type == "cuda")
    model_t = torch.compile(model) if compile_ else model
    ddpm = diffusion.GaussianDiffusion(da.timesteps).to(device)
    n = 32  # a resident training set, as in 04
    data = (torch.rand(n, *latent, device=device) * 2 - 1, torch.randn(n, *latent, device=device),
            torch.randint(0, 4, (n, volume[0] * 6), device=device))
    gen = torch.Generator(device=device).manual_seed(0)
    b = batch or da.batch_size
    step = lambda: diffusion.train_step(model_t, ddpm, opt, prec, data, b, 1, da.p_uncond, gen)
    shape = f"{b}×{'×'.join(map(str, latent))}, cond {model.extractor.dim}-d"
    return step, b, shape, lambda: count_flops(step)


def sampling(small, device, prec, sampler, steps, batch, compile_):
    """04's sample_latents (Eq. 4 guidance, w = 1: conditional and unconditional passes as one batch),
    then 03's decoder through the quantiser, as 05 runs them (file writing not included)."""
    diffusion = load_stage("04_diffusion")
    va = stage_args("03_vqgan", small, SMALL_VQGAN)
    da = stage_args("04_diffusion", small, SMALL_DIFFUSION)
    d, h, w = volume = VOLUME["small" if small else "paper"]
    latent = latent_shape(va, volume)
    denoiser = build_denoiser(da, latent, d, device).eval().requires_grad_(False)
    vqgan = build_vqgan(va, device).eval().requires_grad_(False)
    if compile_:
        denoiser.unet = torch.compile(denoiser.unet)
    ddpm = diffusion.GaussianDiffusion(da.timesteps).to(device)
    cond = (torch.randn(batch, *latent, device=device), torch.randint(0, 4, (batch, d * 6), device=device))
    shape = (batch, *latent)

    @torch.no_grad()
    def run():
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        z = diffusion.sample_latents(ddpm, denoiser, cond, shape, 1.0, sampler, steps, gens, device, prec)
        with prec.autocast():
            return vqgan.decode(z, quantize=True)

    @torch.no_grad()
    def flops():  # every step costs the same: count one guided step and the decoder, not the whole run
        z = torch.randn(shape, device=device)
        t = torch.full((batch,), 10, device=device)
        with prec.autocast():
            one = count_flops(lambda: diffusion.guided_eps(denoiser, z, t, cond, 1.0))
            n_steps = ddpm.T if sampler == "ddpm" else steps
            return n_steps * one + count_flops(lambda: vqgan.decode(z, quantize=True))
    return run, batch, f"{batch}×1×{d}×{h}×{w}, {sampler.upper()}-{steps}, w = 1", flops


# --------------------------------------------------------------------------- main
def measure(name, build, device, warmup, repeats, peak, flops_only=False):
    fn, volumes, shape, flop_fn = build()
    flops = flop_fn()
    if flops_only:
        print0(f"{name}: {flops / 1e12:.3f} TFLOP per step ({shape})")
        return dict(name=name, shape=shape, volumes=volumes, flops=flops)
    reset_peak(device)
    med, times = time_it(fn, device, warmup, repeats)
    row = dict(name=name, shape=shape, volumes=volumes, median_s=med, times_s=times, flops=flops,
               tflops=flops / med / 1e12, mfu=flops / med / peak, volumes_per_s=volumes / med,
               peak_mem_gb=peak_memory_gb(device))
    print0(f"{name}: {1000 * med:.1f} ms median of {len(times)}, {row['tflops']:.3f} TFLOP/s, "
           f"MFU {100 * row['mfu']:.1f} %")
    return row


def table(rows, info):
    lines = [f"{info['device_name']} · torch {info['torch']} · {info['precision']} · "
             f"shapes: {info['shapes']} · measured matmul peak {info['peak_tflops']:.2f} TFLOP/s "
             f"({info['peak_dtype']}) · {info['date']}", "",
             "| what | batch | median ms | volumes/s | s/volume | TFLOP/s | MFU | peak memory GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['shape']} | {1000 * r['median_s']:.1f} | "
                     f"{r['volumes_per_s']:.2f} | {r['median_s'] / r['volumes']:.3f} | "
                     f"{r['tflops']:.3f} | {100 * r['mfu']:.1f} % | {r['peak_mem_gb']:.2f} |")
    mem = "GPU: peak allocated per row" if info["device"] == "cuda" else "CPU: the process's peak RSS so far"
    lines += ["", f"FLOPs: torch.utils.flop_counter (matmul, conv, attention); memory: {mem}; "
                  f"random weights."]
    return "\n".join(lines)


def main(args):
    device = pick_device(args.device)
    prec = choose_precision(device, args.precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif not args.small:
        print0("note: the paper's shapes on the CPU take minutes per step; --small is the CPU benchmark")
    torch.manual_seed(0)
    batch = args.sample_batch or (1 if args.small else 4)
    peak_dtype = prec.dtype or torch.float32
    peak = matmul_peak(device, peak_dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    info = dict(device=device.type, device_name=name, torch=torch.__version__, precision=prec.name,
                shapes="small (demo)" if args.small else "paper", peak_tflops=peak / 1e12,
                peak_dtype=str(peak_dtype).replace("torch.", ""), date=time.strftime("%Y-%m-%d"),
                compile=args.compile)
    print0(f"{name}, torch {torch.__version__}, {prec.name}; matmul peak {peak / 1e12:.2f} TFLOP/s")
    jobs = {
        "VQ-GAN training step": (
            "vqgan", lambda: vqgan_step(args.small, device, prec, args.compile), args.repeats),
        "diffusion training step": (
            "diffusion",
            lambda: diffusion_step(args.small, device, prec, args.compile, args.diffusion_batch),
            args.repeats),
        "sampling DDIM-50 + decode": (
            "ddim", lambda: sampling(args.small, device, prec, "ddim", 50, batch, args.compile),
            args.sample_repeats),
        "sampling DDPM-300 + decode": (
            "ddpm", lambda: sampling(args.small, device, prec, "ddpm", 300, batch, args.compile),
            args.sample_repeats),
    }
    rows = []
    for label, (key, build, repeats) in jobs.items():
        if key in args.only:
            warmup = args.warmup if key in ("vqgan", "diffusion") else min(args.warmup, 1)
            rows.append(measure(label, build, device, warmup, repeats, peak, args.flops_only))
    if args.flops_only:
        save_json({"info": info, "rows": rows}, args.out)
        print0(f"wrote {args.out}")
        return rows
    text = table(rows, info)
    print0("\n" + text)
    save_json({"info": info, "rows": rows, "table": text}, args.out)
    print0(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main(get_args())
