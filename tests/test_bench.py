"""bench.py: the FLOP counter and the timer against closed forms, the whole --small run on the CPU,
and (with CUDA) the training steps under torch's sync debug mode: no host waits inside a step."""
import json
from types import SimpleNamespace

import pytest
import torch

import bench
from common import choose_precision


def test_flop_count_of_a_linear_layer_matches_the_closed_form():
    m, k, n = 16, 32, 8
    layer = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k)
    assert bench.count_flops(lambda: layer(x)) == 2 * m * k * n
    # forward + backward: the input and weight gradients are two more matmuls of the same size
    assert bench.count_flops(lambda: layer(x.requires_grad_()).sum().backward()) == 3 * 2 * m * k * n


def test_flop_count_of_a_conv3d_matches_the_closed_form():
    conv = torch.nn.Conv3d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 6, 7)
    assert bench.count_flops(lambda: conv(x)) == 2 * (2 * 6 * 5 * 6 * 7) * (4 * 27)


def test_flop_count_of_the_cpu_fused_attention_matches_the_closed_form():
    """torch's counter does not know the CPU's fused attention kernel (it would count 0); bench's formula:
    q·kᵀ and the weighted sum, 2·b·h·n_q·n_k·(d + d_v); the backward twice that."""
    q, k, v = (torch.randn(2, 3, n, d, requires_grad=True) for n, d in ((5, 8), (7, 8), (7, 4)))
    fwd = 2 * 2 * 3 * 5 * 7 * (8 + 4)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert bench.count_flops(lambda: sdpa(q, k, v)) == fwd
    assert bench.count_flops(lambda: sdpa(q, k, v).sum().backward()) == 3 * fwd


def test_peers_without_monai_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "monai", None)   # import monai -> ImportError
    with pytest.raises(SystemExit, match="make bench-peers"):
        bench.main(bench.get_args(["--peers", "--device", "cpu"]))


def test_peers_interleave_the_calls(monkeypatch):
    """interleaved() alternates the contenders and takes each one's median, on a scripted clock."""
    clock, order = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def fn(name, cost):
        def call():
            order.append(name)
            clock[0] += cost.pop(0)
        return call
    med = bench.interleaved({"ours": fn("ours", [9, 1, 2, 3]), "MONAI": fn("MONAI", [9, 4, 6, 5])},
                            torch.device("cpu"), warmup=1, repeats=3)
    assert order == ["ours", "MONAI"] * 4 and med == {"ours": 2, "MONAI": 5}


def test_timer_reports_the_median(monkeypatch):
    """time_it on the CPU against a scripted clock (bench's time.perf_counter): each call of fn
    moves it on by a set whole number of seconds, so every figure is exact and load cannot matter."""
    clock = {"now": 1000.0}
    durations = iter([70.0, 80.0, 4.0, 9.0, 1.0, 3.0, 2.0])  # two warm-up calls, then five timed ones

    def work():
        clock["now"] += next(durations)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    med, times = bench.time_it(work, torch.device("cpu"), warmup=2, repeats=5)
    assert times == [4.0, 9.0, 1.0, 3.0, 2.0]  # each timed call, in order; the warm-up left out
    assert med == 3.0  # the median: not the mean (3.8), nor the first, middle or last call
    assert next(durations, None) is None  # fn ran 2 + 5 times, no more


def test_small_benchmark_runs_on_the_cpu_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(bench.get_args(["--small", "--device", "cpu", "--warmup", "0", "--repeats", "2",
                                      "--sample-repeats", "1", "--out", str(out)]))
    names = [r["name"] for r in rows]
    assert names == ["VQ-GAN training step", "diffusion training step", "sampling DDIM-50 + decode",
                     "sampling DDPM-300 + decode"]
    for r in rows:
        assert r["median_s"] > 0 and r["flops"] > 0 and 0 < r["mfu"] < 1.5, r
        assert r["volumes_per_s"] == pytest.approx(r["volumes"] / r["median_s"])
    ddim, ddpm = rows[2], rows[3]
    # the same network and decoder: DDPM-300 does 6x the denoiser work of DDIM-50
    assert ddpm["flops"] > 5 * ddim["flops"]
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == names and saved["info"]["shapes"] == "small (demo)"
    printed = capsys.readouterr().out
    assert "| what | batch | median ms |" in printed and "| diffusion training step |" in printed


def test_diffusion_flops_are_linear_in_the_batch(tmp_path):
    """The README scales the paper's batch-20 diffusion step from a count at batch 2: that needs FLOPs
    exactly proportional to the batch (no cross-sample work)."""
    flops = {}
    for b in (2, 6):
        rows = bench.main(bench.get_args(["--small", "--device", "cpu", "--flops-only", "--only",
                                          "diffusion", "--diffusion-batch", str(b),
                                          "--out", str(tmp_path / f"b{b}.json")]))
        assert rows[0]["shape"].startswith(f"{b}×")
        flops[b] = rows[0]["flops"]
    assert flops[6] == 3 * flops[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_steps_do_not_wait_for_the_device():
    """03's and 04's steps at the demo's shapes under sync debug mode 'error': any host sync raises."""
    dev = torch.device("cuda")
    prec = choose_precision(dev, "bf16")
    for build in (bench.vqgan_step, bench.diffusion_step):
        step, *_ = build(True, dev, prec, False)
        step()  # first call: lazy initialisation is allowed to sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
