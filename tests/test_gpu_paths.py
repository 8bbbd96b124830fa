"""The GPU's code paths, run on the CPU so that the first GPU run is not their first run: bf16 and
fp16 autocast (with the GradScaler) through 03's and 04's training steps and 05's sampling, DDP with
two gloo processes for 04 and 05, and torch.compile on a tiny denoiser."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import choose_precision, load_stage, save_checkpoint
from conftest import REPO, torchrun

vq, dm = load_stage("03_vqgan"), load_stage("04_diffusion")


def tiny_denoiser():
    torch.manual_seed(0)
    return dm.Denoiser(dict(mode="both", latent_shape=(8, 4, 8, 8), depth=16),
                       dict(channels=8, dim=8, dim_mults=(1, 2), heads=2, dim_head=8))


def vqgan_losses(precision, steps=2):
    """03's train_step with both discriminators and the locality loss on: the logged losses."""
    args = vq.get_args(["--perceptual-weights", "auto", "--n-hiddens", "8", "--num-groups", "8",
                        "--n-codes", "32", "--disc-channels", "8", "--perceptual-weight", "0"])
    prec = choose_precision("cpu", precision)
    torch.manual_seed(0)
    model = vq.VQGAN(args.n_hiddens, args.downsample, args.embedding_dim, args.n_codes, args.num_groups)
    d2, d3 = vq.PatchGAN(2, args.disc_channels, args.disc_layers), vq.PatchGAN(3, args.disc_channels,
                                                                             args.disc_layers)
    opts = (torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9)),
            torch.optim.Adam([*d2.parameters(), *d3.parameters()], lr=1e-4, betas=(0.5, 0.9)))
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    boxes, has_box = torch.tensor([[4, 12, 4, 12, 4, 12]] * 2), torch.ones(2, dtype=torch.bool)
    rows = [vq.train_step((model, d2, d3), opts, None, prec, x, boxes, has_box, True, args)[1]
            for _ in range(steps)]
    return torch.stack(rows), prec


def diffusion_losses(precision, steps=3):
    prec = choose_precision("cpu", precision)
    d = tiny_denoiser()
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(5, 8, 4, 8, 8, generator=g), torch.randn(5, 8, 4, 8, 8, generator=g),
            torch.randint(0, 3, (5, 96), generator=g))
    return torch.stack([dm.train_step(d, dm.GaussianDiffusion(20), opt, prec, data, 4, 1, 0.25, g)
                        for _ in range(steps)])[:, None], prec


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps_close_to_fp32(precision):
    for losses in (vqgan_losses, diffusion_losses):
        ref, _ = losses("fp32")
        got, prec = losses(precision)
        assert torch.isfinite(got).all(), (losses.__name__, got)
        assert prec.name == precision and prec.scaler.is_enabled() == (precision == "fp16")
        if precision == "fp16":  # the scaler was used: its scale exists (made at the first scale())
            assert prec.scaler._scale is not None and prec.scaler.get_scale() in (2.0**16, 2.0**15, 2.0**14)
        # the same steps, a few low bits apart (bf16 keeps 8 bits of mantissa, fp16 11); the GAN terms
        # are differences of small numbers, compared only for being finite
        cols = [0, 1, 6] if losses is vqgan_losses else [0]    # L1, commitment, locality; the loss
        torch.testing.assert_close(got[:, cols], ref[:, cols], rtol=0.05, atol=0.01,
                                   msg=lambda m: f"{losses.__name__}: {m}")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_sampling_close_to_fp32(precision):
    """04's sample_latents (Eq. 4, DDIM-5) and 03's decoder, as 05 runs them, under autocast."""
    d = tiny_denoiser().eval()
    torch.manual_seed(0)
    vqgan = vq.VQGAN(n_hiddens=8, n_codes=32, num_groups=8).eval()
    cond = (torch.randn(2, 8, 4, 8, 8), torch.randint(0, 3, (2, 96)))
    ddpm = dm.GaussianDiffusion(50)
    out = {}
    for p in ("fp32", precision):
        prec = choose_precision("cpu", p)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        z = dm.sample_latents(ddpm, d, cond, (2, 8, 4, 8, 8), 1.0, "ddim", 5, gens, "cpu", prec)
        with torch.no_grad(), prec.autocast():
            out[p] = z, vqgan.decode(z[:1], quantize=False).float()
    # mean relative error in units of the format's rounding (bf16 2^-8, fp16 2^-11); measured with these
    # random weights: latents 2.8 and 0.7 units, decoded volumes 21 and 5.4 (untrained GroupNorms amplify)
    unit = {"bf16": 2**-8, "fp16": 2**-11}[precision]
    for (got, ref), bound in zip(zip(out[precision], out["fp32"]), (5, 32)):
        assert torch.isfinite(got).all()
        assert (got - ref).abs().mean() / ref.abs().mean() < bound * unit


def test_compiled_denoiser_matches_eager():
    """torch.compile traces the denoiser (rotary and bucket caches included) without a graph break
    that changes a number: aot_eager (TorchDynamo + AOTAutograd, no C++ code generation) against
    eager, forward and gradients."""
    torch._dynamo.reset()
    d = tiny_denoiser()
    z, ml, b = torch.randn(2, 8, 4, 8, 8), torch.randn(2, 8, 4, 8, 8), torch.randint(0, 3, (2, 96))
    t, drop = torch.tensor([3, 7]), torch.tensor([False, True])
    eager = d(z, t, ml, b, drop=drop)
    eager.square().mean().backward()
    grads = [p.grad.clone() for p in d.parameters()]
    d.zero_grad()
    compiled = torch.compile(d, backend="aot_eager")(z, t, ml, b, drop=drop)
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(d.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compile_flag_of_04_with_inductor(tmp_path, masked_prep):
    """04 --compile as a GPU user runs it, on the CPU: TorchInductor generates and compiles C++."""
    m = vq.VQGAN(n_hiddens=8, n_codes=32, num_groups=8)
    save_checkpoint({"step": 0, "model_kwargs": m.kwargs, "model": m.state_dict()}, tmp_path / "vq.pt")
    r = subprocess.run(diffusion_cmd(masked_prep, tmp_path, "--compile"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step       2 | loss" in r.stdout


def diffusion_cmd(prep, tmp, *extra):
    return [sys.executable, str(REPO / "04_diffusion.py"), "--prep", str(prep), "--vqgan", str(tmp / "vq.pt"),
            "--out", str(tmp / "diff"), "--dim", "8", "--dim-mults", "1", "2", "--attn-heads", "2",
            "--attn-dim-head", "8", "--timesteps", "10", "--batch-size", "2", "--steps", "2",
            "--log-every", "1", "--device", "cpu", "--workers", "1", *extra]


def test_ddp_04_and_05_with_two_gloo_processes(tmp_path, masked_prep):
    """04 under torchrun keeps both ranks' weights equal; 05 under torchrun shards the samples over
    the ranks and gathers them into one samples.json, each volume what one process makes of it."""
    torch.manual_seed(0)
    m = vq.VQGAN(n_hiddens=8, n_codes=32, num_groups=8)
    save_checkpoint({"step": 0, "model_kwargs": m.kwargs, "model": m.state_dict()}, tmp_path / "vq.pt")
    r = torchrun(diffusion_cmd(masked_prep, tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert ("2 process(es)" in r.stdout
            and "DDP check: max weight difference across 2 ranks = 0" in r.stdout), r.stdout

    def sample(out):
        return [sys.executable, str(REPO / "05_sample.py"), "--prep", str(masked_prep),
                "--vqgan", str(tmp_path / "vq.pt"), "--diffusion", str(tmp_path / "diff" / "ckpt.pt"),
                "--out", str(tmp_path / out), "--n-original", "2", "--n-augmented", "1",
                "--sampler", "ddim", "--steps", "5", "--batch-size", "2", "--device", "cpu"]
    r = torchrun(sample("two"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    one = subprocess.run(sample("one"), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    index = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert sorted(index["samples"]) == [f"sample_{i:05d}" for i in range(3)]
    assert index["written"] == index["composition"] == {"original": 2, "augmented": 1}
    read = lambda p: np.asarray(__import__("nibabel").load(p).dataobj).astype(int)
    for sid in index["samples"]:
        # each sample draws from its own generator: the process and batch it ran in do not matter
        # (up to float rounding in the batched kernels: at most 1 HU after conversion to int16)
        assert np.abs(read(tmp_path / "two" / f"{sid}.nii.gz") - read(tmp_path / "one" / f"{sid}.nii.gz")
                      ).max() <= 1
        assert np.array_equal(read(tmp_path / "two" / f"{sid}_mask.nii.gz"),
                              read(tmp_path / "one" / f"{sid}_mask.nii.gz"))
