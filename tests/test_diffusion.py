"""04_diffusion.py: schedule and posterior against direct computation, Betti vectors against the
released vectors and scipy, the condition and its null embedding, guidance, parameter parity,
learning, and resume."""
import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from common import choose_precision, load_stage, save_checkpoint
from conftest import REPO

dm = load_stage("04_diffusion")


def test_cosine_schedule_and_posterior_against_direct_computation():
    T, s = 300, 0.008
    diff = dm.GaussianDiffusion(T)
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    abar = np.array([f(t) / f(0) for t in range(1, T + 1)])  # ᾱ_t, before clipping β
    betas = np.clip(1 - abar / np.r_[1.0, abar[:-1]], 0, 0.9999)
    np.testing.assert_allclose(diff.betas.numpy(), betas, rtol=1e-5, atol=1e-7)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(diff.alphas_cumprod.numpy(), abar, rtol=1e-5)
    # q(z_{t-1} | z_t, z_0) as the product of two Gaussians, done by hand in float64
    x0, xt = 0.3, -0.8
    for t in (1, 10, 150, 299):
        a_t, ab_prev = 1 - betas[t], abar[t - 1]
        prec = 1 / (1 - ab_prev) + a_t / betas[t]
        mean = (np.sqrt(ab_prev) * x0 / (1 - ab_prev) + np.sqrt(a_t) * xt / betas[t]) / prec
        m, v, _ = diff.q_posterior(torch.tensor([x0]), torch.tensor([xt]), torch.tensor([t]))
        np.testing.assert_allclose(m.item(), mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(v.item(), 1 / prec, rtol=1e-4)
    # q_sample moments and the inverse map from noise to z_0
    t = torch.full((200_000,), 120)
    x = torch.full((200_000,), 0.7)
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    z = diff.q_sample(x, t, noise)
    assert (abs(z.mean().item() - np.sqrt(abar[120]) * 0.7) < 0.01
            and abs(z.var().item() - (1 - abar[120])) < 0.01)
    torch.testing.assert_close(diff.predict_x0(z, t, noise), x, atol=1e-4, rtol=1e-4)


def scipy_betti(region):
    """β0 = 8-connected components of the region; β1 = 4-connected components of its complement
    that do not touch the border (the outside is background)."""
    if not region.any():
        return 0, 0
    b0 = ndimage.label(region, structure=np.ones((3, 3)))[1]
    comp, n = ndimage.label(~region)
    border = set(np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))) - {0}
    return b0, n - len(border)


def test_betti_vector_matches_scipy_and_handles_empty_labels():
    rng = np.random.default_rng(0)
    mask = (rng.random((6, 24, 24)) > 0.6).astype(np.uint8)
    mask[rng.random((6, 24, 24)) > 0.9] = 2
    mask[5] = 0  # a slice with background only: labels 1 and 2 empty -> β0 = 0
    v = dm.betti_vector(mask).reshape(6, 6)
    for j in range(6):
        for label in range(3):
            assert tuple(v[j, 2 * label: 2 * label + 2]) == scipy_betti(mask[j] == label), (j, label)
    assert tuple(v[5]) == (1, 0, 0, 0, 0, 0)
    ring = np.zeros((1, 9, 9), np.uint8)  # organ: a ring (one component, one hole)
    ring[0, 2:7, 2:7] = 1
    ring[0, 4, 4] = 0
    # background: the outside plus the centre pixel (two components), and the ring is a hole in it
    assert tuple(dm.betti_vector(ring)) == (2, 1, 1, 1, 0, 0)


def test_betti_vector_reproduces_the_released_vectors(release_masks):
    assert len(release_masks) == 2
    for f in release_masks:
        d = np.load(f)
        v = dm.betti_vector(d["mask"]).reshape(-1, 6)
        v[:, 0::2] = np.maximum(v[:, 0::2], 1)  # the release counted an empty label as β0 = 1
        np.testing.assert_array_equal(v.reshape(-1), d["topo"], err_msg=f.name)


def test_parameter_count_matches_the_reference():
    d = dm.Denoiser(dict(mode="both", latent_shape=(8, 8, 64, 64), depth=32),
                    dict(channels=8, dim=64, dim_mults=(1, 2, 4, 8), heads=8, dim_head=32))
    n = sum(p.numel() for p in d.parameters())
    print(f"Unet3D + extractor: {n:,} parameters, condition {d.extractor.dim}-d")
    assert d.extractor.dim == 704 and abs(n / 41.3e6 - 1) < 0.03


def tiny(mode="both", shape=(8, 4, 8, 8), depth=4):
    torch.manual_seed(0)
    return dm.Denoiser(dict(mode=mode, latent_shape=shape, depth=depth),
                       dict(channels=8, dim=8, dim_mults=(1, 2), heads=2, dim_head=8))


def test_null_embedding_learns_drop_rate_and_condition_matters():
    d = tiny()
    diff = dm.GaussianDiffusion(50)
    z0, ml, b = torch.randn(4, 8, 4, 8, 8), torch.randn(4, 8, 4, 8, 8), torch.randint(0, 3, (4, 24))
    assert isinstance(d.unet.null_cond, torch.nn.Parameter) and d.unet.null_cond.shape == (1, d.extractor.dim)
    diff.loss(d, z0, (ml, b), p_uncond=1.0).backward()
    assert d.unet.null_cond.grad.abs().sum() > 0, "the null embedding is trained"
    # all dropped
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in d.extractor.content.parameters())
    d.zero_grad()
    diff.loss(d, z0, (ml, b), p_uncond=0.0).backward()
    assert d.unet.null_cond.grad.abs().sum() == 0
    assert all(p.grad.abs().sum() > 0 for p in d.extractor.content.parameters()), "content convs are trained"

    seen = []
    spy = lambda z, t, m, bb, drop: (seen.append(drop), torch.zeros_like(z))[1]
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        diff.loss(spy, torch.zeros(500, 1), (None, None), p_uncond=0.25, generator=g)
    rate = torch.cat(seen).float().mean().item()
    assert abs(rate - 0.25) < 0.01, rate

    d.eval()
    t = torch.tensor([5, 5])
    z = torch.randn(1, 8, 4, 8, 8).repeat(2, 1, 1, 1, 1)
    same_ml = torch.stack([ml[0], ml[0]])
    with torch.no_grad():
        out = d(z, t, same_ml, torch.stack([b[0], b[0]]))
        torch.testing.assert_close(out[0], out[1])
        out = d(z, t, same_ml, torch.stack([b[0], b[0] + 3]))  # another structure condition
        assert (out[0] - out[1]).abs().max() > 1e-4
        out = d(z, t, torch.stack([ml[0], ml[0] + 1]), b[:2].clone().fill_(1))  # another content condition
        assert (out[0] - out[1]).abs().max() > 1e-4
        assert (d(z, t, ml[:2], b[:2], drop=torch.tensor([True, False]))[0]
                - d(z, t, ml[:2], b[:2])[0]).abs().max() > 1e-4


def test_depth_attention_against_a_direct_computation():
    """04's depth attention (channels-last norm, rotary as a complex product, cached buckets, SDPA)
    against one written out per column: LayerNorm over channels, q/k rotated pair by pair with
    cos/sin, softmax(q·k/√d + bias) v, the T5 buckets of the reference for n <= 8 (|i - j|, +16
    when the key comes after the query)."""
    torch.manual_seed(0)
    heads, dh, c, n = 2, 8, 6, 5
    attn, rpb = dm.DepthAttention(c, heads, dh), dm.RelativePositionBias(heads)
    for p in (attn.norm.gamma, rpb.relative_attention_bias.weight):
        torch.nn.init.normal_(p)
    x = torch.randn(2, c, n, 3, 4, dtype=torch.float64)
    attn, rpb = attn.double(), rpb.double()
    got = attn(x, rpb(n, x.device), dm.rotary_factors(n, dh, x.device).to(torch.complex128))

    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    assert torch.equal(rpb.bucket(n, "cpu"), (i - j).abs() + 16 * (j > i))
    assert rpb.bucket(40, "cpu")[20, 0] == 8 + int(np.log(20 / 8) / np.log(4) * 8)   # the log range
    bias = rpb.relative_attention_bias.weight[rpb.bucket(n, "cpu")].permute(2, 0, 1)   # (heads, n, n)
    wq, wk, wv = attn.attn.to_qkv.weight.chunk(3)
    theta = 10000 ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    want = torch.empty_like(x)
    for b in range(2):
        for hh in range(3):
            for ww in range(4):
                col = x[b, :, :, hh, ww].T                                         # (n, c)
                y = (col - col.mean(1, keepdim=True)) / (col.var(1, unbiased=False, keepdim=True)
                                                          + 1e-5).sqrt() * attn.norm.gamma.view(-1)
                outs = []
                for h in range(heads):
                    rows = slice(h * dh, (h + 1) * dh)
                    q, k, v = y @ wq[rows].T, y @ wk[rows].T, y @ wv[rows].T
                    ang = torch.arange(n, dtype=torch.float64)[:, None] * theta
                    rot = lambda t: torch.stack([t[:, 0::2] * ang.cos() - t[:, 1::2] * ang.sin(),
                                                 t[:, 0::2] * ang.sin() + t[:, 1::2] * ang.cos()],
                                                -1).flatten(1)
                    scores = rot(q) @ rot(k).T / dh**0.5 + bias[h]
                    outs.append(scores.softmax(-1) @ v)
                want[b, :, :, hh, ww] = col.T + (torch.cat(outs, 1) @ attn.attn.to_out.weight.T).T
    torch.testing.assert_close(got, want)


def test_rotary_rotates_only_the_first_32_features_and_keeps_relative_positions():
    f = dm.rotary_factors(7, 64, "cpu")
    assert f.shape == (7, 32) and torch.equal(f[:, 16:], torch.ones(7, 16, dtype=f.dtype))  # 32 of 64 rotated
    torch.testing.assert_close(f.abs(), torch.ones(7, 32))
    q, k = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    rq, rk = dm.rotate(q.expand(7, 1, 64), f), dm.rotate(k.expand(7, 1, 64), f)
    dots = (rq[:, None] * rk[None]).sum(-1).squeeze(-1)      # (7, 7): query position p, key position r
    torch.testing.assert_close(dots[1, 3], dots[4, 6])          # depends on r - p only
    torch.testing.assert_close(dots[5, 2], dots[3, 0])


def test_linear_attention_against_the_convolutional_form():
    """The per-slice linear attention, run channels-last with its 1×1 convolutions as matmuls, against
    the reference's form: Conv2d on (B·D, C, H, W), q softmax over features, k over positions."""
    torch.manual_seed(0)
    blk = dm.LinearAttentionBlock(8, 2, 4)
    torch.nn.init.normal_(blk.norm.gamma)
    x = torch.randn(2, 8, 3, 5, 6)
    att = blk.attn
    b, c, d, h, w = x.shape
    var, mean = torch.var_mean(x, 1, unbiased=False, keepdim=True)
    y = ((x - mean) / (var + 1e-5).sqrt() * blk.norm.gamma).transpose(1, 2).reshape(b * d, c, h, w)
    q, k, v = (t.reshape(b * d, 2, 4, h * w) for t in att.to_qkv(y).chunk(3, 1))
    q, k = q.softmax(-2) * 4**-0.5, k.softmax(-1)
    out = torch.einsum("bhde,bhdn->bhen", torch.einsum("bhdn,bhen->bhde", k, v), q)
    want = x + att.to_out(out.reshape(b * d, -1, h, w)).reshape(b, d, c, h, w).transpose(1, 2)
    torch.testing.assert_close(blk(x), want)


def test_guidance_combines_as_eq4(monkeypatch):
    class Stub(torch.nn.Module):  # ε(z, c) = a, ε(z) = b
        conditional = True

        def forward(self, z, t, m, bb, drop=None):
            a, b = torch.full_like(z, 2.0), torch.full_like(z, -1.0)
            return a if drop is None else torch.where(drop.view(-1, 1), b, a)
    z, t, c = torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), (torch.zeros(3, 1), torch.zeros(3, 1))
    for limit in (dm.DOUBLED_ON_CPU, 0):  # one doubled batch, then two passes
        monkeypatch.setattr(dm, "DOUBLED_ON_CPU", limit)
        for w in (0.0, 0.5, 1.0, 2.0):
            torch.testing.assert_close(dm.guided_eps(Stub(), z, t, c, w),
                                       torch.full((3, 1), (1 + w) * 2.0 - w * (-1.0)))


def test_tiny_model_learns(tmp_path):
    d = tiny()
    diff = dm.GaussianDiffusion(100)
    g = torch.Generator().manual_seed(0)
    z0 = torch.rand(4, 8, 4, 8, 8, generator=g) * 2 - 1
    z0 = torch.nn.functional.avg_pool3d(z0, 3, 1, 1).clamp(-1, 1)  # smooth, learnable structure
    ml, b = torch.randn(4, 8, 4, 8, 8, generator=g), torch.randint(0, 3, (4, 24), generator=g)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    losses = []
    for _ in range(250):
        loss = diff.loss(d, z0, (ml, b), 0.25, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"tiny denoiser on 4 latents: L1 {first:.3f} -> {last:.3f} in 250 steps")
    assert last < 0.75 * first


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_resume_equals_uninterrupted(tmp_path, masked_prep):
    vq = load_stage("03_vqgan")
    torch.manual_seed(0)
    m = vq.VQGAN(n_hiddens=8, n_codes=32, num_groups=8)
    save_checkpoint({"step": 0, "model_kwargs": m.kwargs, "model": m.state_dict()}, tmp_path / "vq.pt")
    cmd = lambda out, steps: [sys.executable, str(REPO / "04_diffusion.py"), "--prep", str(masked_prep),
                              "--vqgan", str(tmp_path / "vq.pt"), "--out", str(out), "--dim", "8",
                              "--dim-mults", "1", "2", "--attn-heads", "2", "--attn-dim-head", "8",
                              "--timesteps", "20", "--batch-size", "2",
                              "--log-every", "1", "--save-every", "2", "--ema-start", "1", "--ema-every", "1",
                              "--n-preview", "1", "--device", "cpu", "--workers", "1", "--steps", str(steps)]
    r = subprocess.run(cmd(tmp_path / "a", 4), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "encoded 2 volumes" in r.stdout
    r = subprocess.run(cmd(tmp_path / "b", 2), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    torn = tmp_path / "b" / f".ckpt.pt.{dead.pid}.tmp.pt"  # what a kill -9 during a save leaves
    torn.write_bytes(b"half a checkpoint")
    r = subprocess.run(cmd(tmp_path / "b", 4), capture_output=True, text=True)
    assert r.returncode == 0 and "resumed from" in r.stdout and "at step 2" in r.stdout, r.stderr[-3000:]
    assert "step 3 took" in r.stdout and "1 step more at this pace" in r.stdout
    assert not torn.exists()
    a, b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    assert [row["step"] for row in b] == ["1", "2", "3", "4"]
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5)
    model, diff, ck = dm.load_denoiser(tmp_path / "b" / "ckpt.pt")
    ca = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    for k, v in ck["ema"].items():
        torch.testing.assert_close(v, ca["ema"][k])
    assert ck["step"] == 4 and diff.T == 20 and model.extractor.dim > 0
    assert list((tmp_path / "b" / "previews").glob("step*.png"))
    # the cache is reused while the VQ-GAN checkpoint is unchanged
    r = subprocess.run(cmd(tmp_path / "b", 5), capture_output=True, text=True)
    assert r.returncode == 0 and "latent cache" in r.stdout and "is current" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("mode, dim", [("none", 0), ("content", 4), ("structure", 24), ("both", 28)])
def test_every_ablation_builds_and_runs(mode, dim):
    d = tiny(mode)
    diff = dm.GaussianDiffusion(10)
    # content: (4, 8, 8) latent -> (1, 2, 2)
    assert d.extractor.dim == dim and (d.unet.null_cond is None) == (dim == 0)
    z, ml, b = torch.randn(2, 8, 4, 8, 8), torch.randn(2, 8, 4, 8, 8), torch.randint(0, 3, (2, 24))
    assert torch.isfinite(diff.loss(d, z, (ml, b), 0.25))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    prec = choose_precision("cpu")
    out = dm.sample_latents(diff, d.eval(), (ml, b), (2, 8, 4, 8, 8), 1.0, "ddpm", 0, gens, "cpu", prec)
    assert out.shape == z.shape and out.abs().max() <= 1.0 + 1e-5


def test_a_batch_in_pieces_is_the_same_step():
    """04 runs a batch that does not fit in memory in pieces: the batch's draws are made at once, each
    piece adds its share of the mean, so the step (its loss and gradient) is the whole batch's."""
    prec = choose_precision("cpu")
    data = (torch.randn(5, 8, 4, 8, 8), torch.randn(5, 8, 4, 8, 8), torch.randint(0, 3, (5, 24)))
    results = []
    for micro, accum in ((None, 1), (1, 1), (2, 1), (2, 2)):
        d = tiny()
        diff = dm.GaussianDiffusion(20)
        opt = torch.optim.SGD(d.parameters(), lr=0.1)  # weights after one step = weights - 0.1 · gradient
        pieces = []
        loss = dm.train_step(d, diff, opt, prec, data, 3, accum, 0.25,
                             torch.Generator().manual_seed(7), micro, lambda i, n: pieces.append((i, n)))
        results.append((loss, torch.cat([p.detach().flatten() for p in d.parameters()]), pieces))
    (loss, w, pieces), *split = results
    assert pieces == [(1, 1)]
    for (l2, w2, p2), n in zip(split[:2], (3, 2)):
        assert p2 == [(i, n) for i in range(1, n + 1)]
        torch.testing.assert_close(l2, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w2, w, rtol=0, atol=1e-6)
    assert not torch.allclose(split[2][1], w, atol=1e-6)  # two accumulated batches are another step
    # memory: per-sample activations of a batch of one, and the piece that fits in half the free memory
    d = tiny()
    diff = dm.GaussianDiffusion(20)
    per_sample = dm.activation_bytes(d, diff, data, prec, 0.25)
    assert per_sample > sum(p.numel() * 4 for p in d.parameters())   # the weights it saves, and more
    assert dm.fitting_micro_batch(100, 20, 1000) == 5 and dm.fitting_micro_batch(100, 20, 10**6) == 20
    assert dm.fitting_micro_batch(100, 20, 10) == 1
