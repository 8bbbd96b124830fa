"""Benchmark the three costs of the paper's schedule: a VQ-GAN training step, a diffusion training
step, and guided sampling (DDIM-50 and DDPM-300, decoded). Shapes are the paper's (docs/reference.md
§2-3) unless --small, which uses the CPU demo's (Makefile).

    python bench.py                  # the paper's shapes on the GPU
    python bench.py --small          # demo shapes; what CI runs on the CPU
    python bench.py --peers          # our steps against MONAI's at similar sizes (make bench-peers)

Every number comes from the same code the stages run (03's and 04's `train_step`, 04's
`sample_latents`), with random weights: timing does not depend on them. Each measurement is
warm-up steps, then `--repeats` timed steps (CUDA events on the GPU, no sync inside the loop),
reported as the median. FLOPs are counted once per step with torch.utils.flop_counter
(convolutions, matmuls and attention, the CPU's fused attention kernel included; elementwise work is
not counted), and MFU is that FLOP rate
over the peak this script measures with a large matmul in the run's precision (bf16 on CUDA, fp32
on the CPU), not over a datasheet figure. Prints a markdown table and writes JSON.
"""
import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
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
    p.add_argument("--peers", action="store_true",
                   help="our training steps against MONAI's DiffusionModelUNet and AutoencoderKL (fp32)")
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


def cpu_attention_flops(query, key, value, *args, **kwargs):
    """The CPU's fused attention kernel, which torch.utils.flop_counter does not know (it would count
    0): q·kᵀ and the weighted sum of v, 2·b·h·n_q·n_k·(d + d_v)."""
    b, h, n_q, d = query
    return 2 * b * h * n_q * key[2] * (d + value[-1])


def cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs):
    return 2 * cpu_attention_flops(query, key, value)  # the gradients of q, k, v: twice the forward's


aten = torch.ops.aten
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}


def count_flops(fn):
    """FLOPs of one call of fn() (forward and backward), by torch.utils.flop_counter."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
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
    """04's sample_latents (Eq. 4 guidance, w = 1: both passes as one doubled batch, or two on a CPU),
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


# --------------------------------------------------------------------------- peers (MONAI)
# Our denoiser's and autoencoder's training steps against MONAI's DiffusionModelUNet (what MAISI is built
# on) and AutoencoderKL at similar parameter counts, on the same input. MONAI's U-Net is fully 3-D
# (3×3×3 convolutions, depth downsampled too), attends only at its two lowest levels, and at the demo's
# latent depth of 4 has room for three levels; ours is the paper's (1×3×3 convolutions, attention along
# depth and per-slice linear attention at every level).
PEER_DENOISERS = {  # name: latent (C, D, H, W), our width, batch, MONAI channels and attention levels
    "demo": ((8, 4, 16, 16), 16, 8, (16, 32, 64), (False, True, True)),
    "latent 8×8×32×32": ((8, 8, 32, 32), 32, 4, (16, 32, 64, 128), (False, False, True, True)),
}


def peer_denoiser_steps(config, device):
    """One Adam step on the L1 noise loss, ours (the condition extractor included, 'both') and MONAI's
    (unconditional), on the same z_t and t."""
    from monai.networks.nets import DiffusionModelUNet
    diffusion = load_stage("04_diffusion")
    latent, dim, batch, channels, attention = PEER_DENOISERS[config]
    torch.manual_seed(0)
    ours = diffusion.Denoiser(dict(mode="both", latent_shape=latent, depth=latent[1] * 4),
                              dict(channels=latent[0], dim=dim, dim_mults=(1, 2, 4, 8), heads=4,
                                   dim_head=16)).to(device)
    theirs = DiffusionModelUNet(3, latent[0], latent[0], num_res_blocks=2, channels=channels,
                                attention_levels=attention, norm_num_groups=8,
                                num_head_channels=16).to(device)
    z, noise = torch.randn(batch, *latent, device=device), torch.randn(batch, *latent, device=device)
    t = torch.randint(0, 300, (batch,), device=device)
    cond = (torch.randn(batch, *latent, device=device),
            torch.randint(0, 3, (batch, latent[1] * 24), device=device))  # mask latent, Betti vector
    drop = torch.arange(batch, device=device) % 10 == 0
    return {"ours": (ours, lambda: F.l1_loss(ours(z, t, *cond, drop=drop), noise)),
            "MONAI": (theirs, lambda: F.l1_loss(theirs(z, timesteps=t), noise))}


def peer_autoencoder_steps(device):
    """One Adam step of the autoencoder alone at the demo's shapes (batch 2, 1×16×64×64): our VQ-GAN's
    L1 + commitment, MONAI's AutoencoderKL's L1 + KL; both downsample 4× to 8 latent channels."""
    from monai.networks.nets import AutoencoderKL
    vqgan = load_stage("03_vqgan")
    torch.manual_seed(0)
    ours = vqgan.VQGAN(n_hiddens=8, n_codes=512, num_groups=8).to(device)
    theirs = AutoencoderKL(3, 1, 1, channels=(8, 16, 32), latent_channels=8, num_res_blocks=(2, 2, 2),
                           attention_levels=(False,) * 3, norm_num_groups=8, with_encoder_nonlocal_attn=False,
                           with_decoder_nonlocal_attn=False).to(device)
    x = torch.rand(2, 1, 16, 64, 64, device=device) * 2 - 1

    def ours_loss():
        rec, commitment, _ = ours(x)
        return F.l1_loss(rec, x) + commitment

    def theirs_loss():
        rec, mu, sigma = theirs(x)
        kl = 0.5 * (mu.square() + sigma.square() - torch.log(sigma.square()) - 1).mean()
        return F.l1_loss(rec, x) + 1e-6 * kl
    return {"ours": (ours, ours_loss), "MONAI": (theirs, theirs_loss)}


def interleaved(fns, device, warmup, repeats):
    """Median seconds per call of each fn, the calls taking turns (ours, theirs, ours, ...): a machine
    that slows down for a while slows both."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def block_times(model, run, device, repeats=5):
    """Forward + backward time of each kind of block of our Unet3D, each timed alone on the input it
    gets inside the network; as fractions of their sum."""
    diffusion = load_stage("04_diffusion")
    kinds = {diffusion.ResnetBlock: "ResNet blocks (1×3×3 convolutions)",
             diffusion.LinearAttentionBlock: "per-slice linear attention",
             diffusion.DepthAttention: "attention along depth",
             diffusion.SpatialAttention: "full attention in each slice (middle)",
             torch.nn.Conv3d: "first/last convolutions, downsampling", torch.nn.ConvTranspose3d: "upsampling"}
    calls, hooks, claimed = [], [], []
    for name, module in model.named_modules():
        if type(module) in kinds and not any(name.startswith(c + ".") for c in claimed):
            claimed.append(name)
            hooks.append(module.register_forward_hook(lambda m, args, out: calls.append((m, args))))
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    total = {}
    for module, args in calls:
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
                     for a in args)
        med, _ = time_it(lambda: module(*args).float().sum().backward(), device, 1, repeats)
        total[kinds[type(module)]] = total.get(kinds[type(module)], 0.0) + med
    return total


def peers(args, device):
    """Our training steps against MONAI's, side by side in this process; returns the rows."""
    try:
        import monai
    except ImportError:
        raise SystemExit("error: --peers needs MONAI (a benchmark-only dependency): make bench-peers, or "
                         "pip install monai einops") from None
    rows, breakdowns = [], {}
    jobs = {f"denoiser, {c}": (lambda c=c: peer_denoiser_steps(c, device)) for c in PEER_DENOISERS}
    jobs["autoencoder, demo"] = lambda: peer_autoencoder_steps(device)
    for label, build in jobs.items():
        pair = build()
        steps = {}
        for name, (model, loss_fn) in pair.items():
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)

            def step(model=model, loss_fn=loss_fn, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_fn().backward()
                opt.step()
            steps[name] = step
        med = interleaved(steps, device, args.warmup, args.repeats)
        row = dict(what=label, ratio=med["ours"] / med["MONAI"])
        for name, (model, _) in pair.items():
            row[name] = dict(ms=1000 * med[name], params=sum(p.numel() for p in model.parameters()),
                             flops=count_flops(steps[name]))
        rows.append(row)
        print0(f"{label}: ours {row['ours']['ms']:.1f} ms, MONAI {row['MONAI']['ms']:.1f} ms, "
               f"ratio {row['ratio']:.2f}")
        if label.startswith("denoiser"):
            model, loss_fn = pair["ours"]
            breakdowns[label] = block_times(model.unet, loss_fn, device)
    info = dict(monai=monai.__version__, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                device=device_name(device), threads=torch.get_num_threads())
    lines = [f"{info['device']} · torch {info['torch']} · MONAI {info['monai']} · fp32 · {info['date']} · "
             f"medians of {args.repeats}, interleaved", "",
             "| training step | ours ms | MONAI ms | ours / MONAI | ours params | MONAI params "
             "| ours GFLOP | MONAI GFLOP |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, m = r["ours"], r["MONAI"]
        lines.append(f"| {r['what']} | {o['ms']:.1f} | {m['ms']:.1f} | **{r['ratio']:.2f}** | "
                     f"{o['params'] / 1e6:.2f}M | {m['params'] / 1e6:.2f}M | {o['flops'] / 1e9:.2f} | "
                     f"{m['flops'] / 1e9:.2f} |")
    for label, blocks in breakdowns.items():
        whole = sum(blocks.values())
        lines += ["", f"Where our denoiser's step goes ({label}; each block timed alone, forward and "
                      "backward):",
                  "", "| block | ms | share |", "|---|---|---|"]
        lines += [f"| {k} | {1000 * v:.1f} | {100 * v / whole:.0f} % |"
                  for k, v in sorted(blocks.items(), key=lambda kv: -kv[1])]
    text = "\n".join(lines)
    print0("\n" + text)
    out = args.out.with_name("peers.json")
    save_json({"info": info, "rows": rows, "blocks": breakdowns, "table": text}, out)
    print0(f"wrote {out}")
    return rows


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.peers:
        return peers(args, device)
    if device.type != "cuda" and not args.small:
        print0("note: the paper's shapes on the CPU take minutes per step; --small is the CPU benchmark")
    batch = args.sample_batch or (1 if args.small else 4)
    peak_dtype = prec.dtype or torch.float32
    peak = matmul_peak(device, peak_dtype)
    name = device_name(device)
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
