"""06 metrics: FID against closed forms, MMD against a double loop, 3-D MS-SSIM against a
NumPy/SciPy re-implementation, and MedicalNet against checkpoints laid out by hand from the
architecture description."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from common import load_stage

ev = load_stage("06_eval")


# --------------------------------------------------------------------------- FID
def with_moments(rng, n, mean, cov_root):
    """n samples whose *sample* mean is `mean` and sample covariance is cov_root @ cov_root.T, exactly."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance = I
    return z @ cov_root.T + mean


def test_fid_closed_forms_and_symmetry():
    rng = np.random.default_rng(0)
    f = 6
    a = rng.standard_normal((300, f)) @ rng.standard_normal((f, f))
    assert abs(ev.fid(a, a)) <= 1e-6
    # commuting covariances Q diag(s²) Qᵀ: FID = ‖Δμ‖² + Σ (s_a − s_b)²
    q = np.linalg.qr(rng.standard_normal((f, f)))[0]
    sa, sb = rng.uniform(0.5, 3, f), rng.uniform(0.5, 3, f)
    ma, mb = rng.standard_normal(f), rng.standard_normal(f)
    a, b = with_moments(rng, 200, ma, q * sa), with_moments(rng, 150, mb, q * sb)
    np.testing.assert_allclose(ev.fid(a, b), np.sum((ma - mb) ** 2) + np.sum((sa - sb) ** 2), rtol=1e-9)
    # general covariances: tr (Σa Σb)^½ = Σ √eig(Σa^½ Σb Σa^½), by eigendecomposition only
    a = rng.standard_normal((120, f)) @ rng.standard_normal((f, f)) + 1
    b = rng.standard_normal((90, f)) @ rng.standard_normal((f, f))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    np.testing.assert_allclose(ev.fid(a, b), want, rtol=1e-9)
    np.testing.assert_allclose(ev.fid(b, a), want, rtol=1e-9)
    assert isinstance(ev.fid(torch.from_numpy(a).float(), b), float)


# --------------------------------------------------------------------------- MMD
def mmd_double_loop(a, b):
    """HA-GAN's statistic written out: distances sqrt(‖x−y‖² + 1e-5) over the pooled set,
    α = 1 / (lower median of the full matrix, diagonal included)², unbiased MMD² of exp(−α d²)."""
    x = [list(map(float, r)) for r in a] + [list(map(float, r)) for r in b]
    n, na = len(x), len(a)
    d = [[math.sqrt(sum((p - q) ** 2 for p, q in zip(x[i], x[j])) + 1e-5) for j in range(n)]
         for i in range(n)]
    flat = sorted(v for row in d for v in row)
    alpha = 1 / flat[(len(flat) - 1) // 2] ** 2
    k = [[math.exp(-alpha * d[i][j] ** 2) for j in range(n)] for i in range(n)]
    a_ = range(na)
    b_ = range(na, n)
    kaa = sum(k[i][j] for i in a_ for j in a_ if i != j) / (len(a_) * (len(a_) - 1))
    kbb = sum(k[i][j] for i in b_ for j in b_ if i != j) / (len(b_) * (len(b_) - 1))
    kab = sum(k[i][j] for i in a_ for j in b_) / (len(a_) * len(b_))
    return kaa + kbb - 2 * kab


def test_mmd_matches_double_loop_and_separates_distributions():
    rng = np.random.default_rng(1)
    for na, nb in ((7, 9), (6, 6)):
        a, b = rng.standard_normal((na, 3)), rng.standard_normal((nb, 3)) * 1.5 + 0.3
        np.testing.assert_allclose(ev.mmd(a, b), mmd_double_loop(a, b), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ev.mmd(torch.from_numpy(a), b), ev.mmd(a, b), rtol=1e-12)
    a, b = rng.standard_normal((120, 8)), rng.standard_normal((120, 8))
    assert abs(ev.mmd(a, b)) < 0.02
    assert ev.mmd(a, b + 1.0) > 0.1


# --------------------------------------------------------------------------- MS-SSIM 3-D
def ref_blur(v, g):
    """Valid Gaussian smoothing of a (D, H, W) array, axis by axis; axes shorter than g untouched."""
    r = len(g) // 2
    for axis in range(3):
        s = v.shape[axis]
        if s >= len(g):
            v = np.take(ndimage.correlate1d(v, g, axis=axis, mode="constant"), range(r, s - r), axis=axis)
    return v


def ref_pool(v):
    """2×2×2 mean with one zero of padding on each side of odd axes, zeros counted."""
    for axis in range(3):
        if v.shape[axis] % 2:
            pad = [(0, 0)] * 3
            pad[axis] = (1, 1)
            v = np.pad(v, pad)
        n = v.shape[axis] // 2
        v = np.moveaxis(np.take(v, range(2 * n), axis=axis), axis, 0)
        v = np.moveaxis(v.reshape(n, 2, *v.shape[1:]).mean(1), 0, axis)
    return v


def ms_ssim_reference(x, y, data_range):
    """pytorch-msssim's MS-SSIM, one (D, H, W) channel at a time in float64."""
    r = np.arange(11) - 5.0
    g = np.exp(-r**2 / (2 * 1.5**2))
    g /= g.sum()
    w = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = np.zeros(x.shape[:2])
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            u, v = x[n, c], y[n, c]
            terms = []
            for scale in range(5):
                m1, m2 = ref_blur(u, g), ref_blur(v, g)
                s11, s22, s12 = (ref_blur(u * u, g) - m1 * m1, ref_blur(v * v, g) - m2 * m2,
                                 ref_blur(u * v, g) - m1 * m2)
                cs = (2 * s12 + c2) / (s11 + s22 + c2)
                ssim = ((2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1) * cs).mean()
                if scale < 4:
                    terms.append(max(cs.mean(), 0.0) ** w[scale])
                    u, v = ref_pool(u), ref_pool(v)
            out[n, c] = np.prod(terms) * max(ssim, 0.0) ** w[4]
    return out.mean(1)


def smooth_volume(rng, shape, sigma=2.0):
    v = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (v - v.min()) / (v.max() - v.min())  # in [0, 1]


def test_ms_ssim_3d_matches_reference_on_odd_shapes():
    rng = np.random.default_rng(2)
    # odd sizes exercise the pooling padding; depth 21 -> 11 exercises the "axis == window" edge
    x = np.stack([np.stack([smooth_volume(rng, (21, 45, 37)) for _ in range(2)]) for _ in range(2)])
    y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1)
    got = ev.ms_ssim_3d(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0)
    assert got.shape == (2,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ms_ssim_reference(x, y, 1.0), rtol=1e-9)
    x, y = x[:1, :1, :16, :32, :32] * 2 - 1, y[:1, :1, :16, :32, :32] * 2 - 1  # even sizes, data range 2
    np.testing.assert_allclose(ev.ms_ssim_3d(torch.from_numpy(x), torch.from_numpy(y), 2.0).numpy(),
                               ms_ssim_reference(x, y, 2.0), rtol=1e-9)


def test_ms_ssim_3d_identity_symmetry_and_noise():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(smooth_volume(rng, (32, 40, 40))).float()[None, None]  # (1, 1, 32, 40, 40)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    # depth 32 -> 4 at the 4th scale: shorter than the window, not smoothed along it
    vals = torch.stack([ev.ms_ssim_3d(x, x + s * noise, 1.0) for s in (0.0, 0.05, 0.1, 0.2, 0.4)])  # (5, 1)
    torch.testing.assert_close(vals[0], torch.ones(1), atol=1e-5, rtol=0)
    assert (vals[1:] < vals[:-1]).all(), vals
    torch.testing.assert_close(ev.ms_ssim_3d(x + 0.1 * noise, x, 1.0), vals[2])


# --------------------------------------------------------------------------- MedicalNet
SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B"}  # Tencent/MedicalNet README, "parameter settings"
BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def released_layout(depth, num_batches_tracked=True):
    """Key -> shape of a released resnet_<depth>.pth, written out from the architecture description
    (not from our model): BasicBlock 3³/3³ below 50, Bottleneck 1³/3³/1³ (×4) from 50, a 1³ conv + BN
    shortcut where type B and the first block of a layer changes stride or width, plus the conv_seg head."""
    keys = {}
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1

    def bn(name, c):
        keys.update({f"{name}.{s}": (c,) for s in ("weight", "bias", "running_mean", "running_var")})
        if num_batches_tracked:
            keys[f"{name}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, 1, 7, 7, 7)
    bn("bn1", 64)
    cin = 64
    for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), BLOCKS[depth], (1, 2, 1, 1)), 1):
        for j in range(n):
            p = f"layer{i}.{j}"
            convs = ([(cin, planes, 1), (planes, planes, 3), (planes, 4 * planes, 1)] if bottleneck
                     else [(cin, planes, 3), (planes, planes, 3)])
            for c, (ci, co, k) in enumerate(convs, 1):
                keys[f"{p}.conv{c}.weight"] = (co, ci, k, k, k)
                bn(f"{p}.bn{c}", co)
            if j == 0 and SHORTCUT[depth] == "B" and (stride != 1 or cin != planes * expansion):
                keys[f"{p}.downsample.0.weight"] = (planes * expansion, cin, 1, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            cin = planes * expansion
    keys.update({"conv_seg.0.weight": (cin, 32, 2, 2, 2), "conv_seg.0.bias": (32,),
                 "conv_seg.3.weight": (32, 32, 3, 3, 3), "conv_seg.6.weight": (2, 32, 1, 1, 1)})
    bn("conv_seg.1", 32)
    bn("conv_seg.4", 32)
    return keys


def fake_checkpoint(path, depth, **kw):
    """A checkpoint in the released format, {'state_dict': {'module.' + key: tensor}}, every tensor a
    distinct constant (cheap, and small enough that a forward pass stays finite)."""
    sd = {}
    for i, (k, shape) in enumerate(released_layout(depth, **kw).items()):
        v = 0.5 + 0.5 * (i + 1) / 1000
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(i)
        elif k.endswith("running_var"):
            sd[k] = torch.full(shape, 1 + v)
        elif len(shape) == 5:
            sd[k] = torch.full(shape, v / math.prod(shape[1:]))
        else:
            sd[k] = torch.full(shape, v - 0.7)
    torch.save({"state_dict": {"module." + k: t for k, t in sd.items()}}, path)
    return sd


@pytest.mark.parametrize("depth, dim", [(10, 512), (18, 512), (34, 512), (50, 2048)])
def test_medicalnet_loads_released_layout_strictly(tmp_path, depth, dim):
    path = tmp_path / f"resnet_{depth}.pth"
    sd = fake_checkpoint(path, depth, num_batches_tracked=depth != 18)  # old files may lack it
    model, note = ev.load_medicalnet(depth, path)
    assert str(path) in note and "random" not in note
    mine = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("conv_seg."):
            assert torch.equal(mine[k], v), k
    f = ev.features(model, torch.rand(1, 1, 16, 32, 32) * 2 - 1)
    assert f.shape == (1, dim) and f.dtype == np.float64 and np.isfinite(f).all()


def test_medicalnet_mismatches_raise(tmp_path):
    path = tmp_path / "resnet_10_broken.pth"
    fake_checkpoint(path, 10)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["module.layer3.0.bn2.running_mean"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"resnet_10_broken\.pth.*layer3\.0\.bn2\.running_mean"):
        ev.load_medicalnet(10, path)
    fake_checkpoint(path, 10)  # a ResNet-10 file (shortcut B) cannot pass for an 18 (A), nor the reverse
    with pytest.raises(ValueError, match=r"resnet_10_broken\.pth.*unexpected"):
        ev.load_medicalnet(18, path)
    with pytest.raises(FileNotFoundError, match="drive.google.com"):
        ev.load_medicalnet(50, "auto")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ev.features(ev.load_medicalnet(10)[0], torch.full((1, 1, 16, 16, 16), 300.0))


def test_medicalnet_random_init_is_flagged_and_reproducible():
    state = torch.get_rng_state()
    (m1, note), (m2, _) = ev.load_medicalnet(10), ev.load_medicalnet(10)
    assert "not comparable to the paper" in note
    assert torch.equal(torch.get_rng_state(), state)  # a local generator
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k
    w = m1.layer2[0].conv1.weight
    assert abs(w.std().item() - math.sqrt(2 / (128 * 27))) < 0.01  # Kaiming normal, fan_out
    # output stride 8: conv1 and maxpool halve, layer2 halves, layers 3-4 dilate instead
    seen = {}
    m1.layer4.register_forward_hook(lambda mod, inp, out: seen.update(shape=tuple(out.shape)))
    v = torch.rand(3, 1, 16, 32, 48) * 2 - 1
    f = ev.features(m1, v, batch_size=1)
    assert seen["shape"] == (1, 512, 2, 4, 6)
    np.testing.assert_allclose(ev.features(m1, v, batch_size=3), f, rtol=1e-5, atol=1e-6)  # eval-mode BN
    # shortcut A as the release writes it: avg_pool3d(kernel 1, stride), then zero channels
    x = torch.randn(2, 4, 5, 6, 7)
    ref = torch.cat([F.avg_pool3d(x, 1, stride=2), torch.zeros(2, 4, 3, 3, 4)], 1)
    assert torch.equal(ev.ZeroPadShortcut(8, 2)(x), ref)


def test_medicalnet_auto_download_failure_says_what_to_do(monkeypatch, tmp_path):
    """Offline, `--med3d-weights auto` fails with the download instructions, not a bare network error."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e:
        ev.load_medicalnet(10, "auto")
    msg = str(e.value)
    assert "huggingface.co/TencentMedicalNet/MedicalNet-Resnet10" in msg and "drive.google.com" in msg
    assert not (tmp_path / "checkpoints" / "resnet_10.pth").exists()


# --------------------------------------------------------------------------- organ contrast
def test_organ_contrast_on_hand_made_volumes():
    """A 4×4×4 organ of value 0.8 in a background of 0.3: inside minus the shell around it is exactly
    0.5; a mask placed elsewhere sees no contrast; missing and empty masks give NaN."""
    vol = np.full((12, 20, 20), 0.3, np.float32)
    vol[4:8, 5:9, 5:9] = 0.8
    organ = np.zeros(vol.shape, np.uint8)
    organ[4:8, 5:9, 5:9] = 1
    organ[5, 6, 6] = 2  # a tumour label is organ too (labels > 0)
    elsewhere = np.zeros(vol.shape, np.uint8)
    elsewhere[4:8, 12:16, 12:16] = 1
    c = ev.organ_contrast([vol, vol, vol, vol], [organ, elsewhere, None, np.zeros_like(organ)], shell=2)
    assert c[0] == pytest.approx(0.5, abs=1e-6) and c[1] == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(c[2]) and np.isnan(c[3])
    # a half-way shell: only the face neighbours (6-connected) at distance 1 are 0.3
    half = vol.copy()
    ring1 = ndimage.binary_dilation(organ > 0, iterations=1) & ~(organ > 0)
    half[ring1] = 0.55
    assert ev.organ_contrast([half], [organ], shell=1)[0] == pytest.approx(0.25, abs=1e-6)
    # summary in HU, with the shuffled-mask control (each volume scored with the next one's mask)
    s = ev.contrast_summary([vol, vol], [organ, elsewhere], (-200, 300))
    assert s["own_hu"] == pytest.approx((0.5 + 0.0) / 2 * 500, abs=1e-3)
    assert s["shuffled_hu"] == pytest.approx((0.0 + 0.5) / 2 * 500, abs=1e-3) and s["n"] == 2
