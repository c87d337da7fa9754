"""Smoke test of the benchmark harness (bench/): every mode runs and reports on a tiny CPU model.

No speed is asserted anywhere: these tests check that the harness measures and writes what it
claims (JSON, markdown, plots), records failures as results, and that its pure parts (ratios,
max-batch search, models) compute the right thing.
"""

import dataclasses
import json
import os
import sys

import pytest
import torch
from torch import nn

from bench import modes as M
from bench.models import CONFIGS, build, describe
from bench.report import markdown
from bench.run import add_ratios, main, merge, run_worker, search_max_batch, worker_env
from bench.worker import run_case

FASTDP = "/work/fastdp"
HAVE_FASTDP = os.path.exists(os.path.join(FASTDP, "fastDP", "__init__.py"))
PNG = b"\x89PNG\r\n\x1a\n"


def _spec(mode, model="mlp-tiny", **kw):
    return {"model": model, "batch": 3, "dtype": "fp32", "mode": mode, "device": "cpu", "steps": 2, "warmup": 1, **kw}


def test_every_mode_runs_and_reports(tmp_path, capsys):
    """The CLI on mlp-tiny (Linear only: every library supports it), every mode, 2 steps, all in this process."""
    argv = ["--models", "mlp-tiny", "--batch-sizes", "3", "--dtype", "fp32", "--modes", "all", "--device", "cpu"]
    argv += ["--steps", "2", "--warmup", "1", "--out", str(tmp_path), "--inline"]
    if HAVE_FASTDP:
        argv += ["--fastdp-path", FASTDP]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    res = {r["mode"]: r for r in data["results"]}
    dpk = [f"{m}:reference" for m in M.DPK_MODES]
    assert list(res)[: 1 + len(dpk)] == ["nondp", *dpk]  # baseline first, then each strategy on the CPU backend
    for mode in ["nondp", *dpk, *M.OPACUS_MODES] + (list(M.FASTDP_MODES) if HAVE_FASTDP else []):
        r = res[mode]
        assert r["status"] == "ok", (mode, r.get("error"), r.get("traceback"))
        assert len(r["step_times_s"]) == 2 and r["step_time"]["median_s"] > 0
        assert r["samples_per_s"] == pytest.approx(3 / r["step_time"]["median_s"])
        assert r["step_time"]["iqr_s"] == pytest.approx(r["step_time"]["q75_s"] - r["step_time"]["q25_s"])
        # every trainable parameter got a (DP) gradient in the last step
        assert r["params_with_grad"] == r["params_trainable"] > 0
        assert r["time_ratio"] == pytest.approx(r["step_time"]["median_s"] / res["nondp"]["step_time"]["median_s"])
    for mode in dpk:  # which backend actually served the ops is recorded
        assert set(res[mode]["info"]["served_by"].values()) == {"reference"}
    if not HAVE_FASTDP:
        assert "skipped: fastDP needs --fastdp-path" in printed
        assert all(res[m]["status"] == "skipped" for m in M.FASTDP_MODES)
    meta = data["meta"]
    assert meta["command"].startswith("python -m bench ") and meta["torch"] == torch.__version__
    assert meta["device_name"].startswith("CPU") and meta["opacus"] and meta["triton"] and meta["timestamp"]
    md = (tmp_path / "results.md").read_text()
    for mode in res:
        assert f"| {mode} |" in md
    for name in ("time_ratio.png", "memory_ratio.png"):
        blob = (tmp_path / name).read_bytes()
        assert blob[:8] == PNG and len(blob) > 5000


def test_fastdp_without_path_prints_the_skip_line(tmp_path, capsys):
    argv = ["--models", "mlp-tiny", "--modes", "nondp,fastdp", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    assert main(argv + ["--out", str(tmp_path), "--inline", "--no-plots"]) == 0
    assert "skipped: fastDP needs --fastdp-path" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {r["mode"]: r["status"] for r in res} == {"nondp": "ok", "fastdp-bk": "skipped", "fastdp-mixopt": "skipped"}


def test_worker_process_measures_its_own_memory():
    """The default path: one fresh process per case; on the CPU its anonymous-memory growth since the imports."""
    spec = _spec("nondp", model="resnet18-gn-tiny", batch=1)
    r = run_worker(spec, timeout=300, env=worker_env(spec["mode"], "cpu"))
    assert r["status"] == "ok", r.get("error")
    assert "anonymous RSS" in r["mem_kind"] and r["rss_anon_baseline_bytes"] > 0
    assert r["peak_mem_bytes"] <= r["peak_rss_bytes"] - r["rss_file_bytes"] - r["rss_anon_baseline_bytes"]
    # float32 weights and their gradients stay resident through the timed steps: the growth holds both
    assert r["peak_mem_bytes"] >= 2 * 4 * r["model_info"]["parameters"]


@pytest.mark.parametrize("dtype", ["bf16", "bf16w"])
@pytest.mark.parametrize("mode", ["dpk-bk:reference", "dpk-two-pass:reference"])
def test_dpkernels_modes_run_in_bfloat16(mode, dtype):
    """The dpkernels modes give the per-sample losses to optimizer.backward: a scalar mean loss whose output
    gradients are bfloat16 (autocast, or a bfloat16 model) is refused by dpkernels."""
    r = run_case(_spec(mode, dtype=dtype, inline=True))
    assert r["status"] == "ok", r.get("error")
    assert r["params_with_grad"] == r["params_trainable"] > 0 and r["final_loss"] > 0


@pytest.mark.parametrize("name", ["mlp-tiny", "bert-tiny"])
def test_per_sample_losses_average_to_the_workload_loss(name):
    w = build(name, 3)
    out = w.model(w.x)
    per = M.per_sample_loss(w, out)
    assert per.shape == (3,)
    # float32 means of the same per-position losses in two orders: a few ulps apart
    torch.testing.assert_close(per.mean(), w.loss(out), rtol=1e-6, atol=0)
    # each l_i is sample i's alone: the same on a batch of that sample only
    one = M.per_sample_loss(dataclasses.replace(w, y=w.y[1:2]), out[1:2])
    torch.testing.assert_close(one, per[1:2], rtol=0, atol=0)


def test_a_failing_mode_is_a_result_not_a_crash():
    r = run_case(_spec("dpk-bk:nosuchbackend"))
    assert r["status"] == "error" and r["phase"] == "setup" and "nosuchbackend" in r["error"]
    assert "Traceback" in r["traceback"]


def test_a_dead_or_hung_worker_is_recorded(monkeypatch):
    """A worker process that exits without writing its result, or outlives the timeout, becomes an error row."""
    spec = _spec("nondp")
    r = run_worker(spec, timeout=0.5)  # killed while still importing torch
    assert (r["status"], r["phase"], r["mode"]) == ("error", "timeout", "nondp")
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a process that dies at once, writing nothing
    r = run_worker(spec, timeout=60)
    assert r["status"] == "error" and r["phase"] == "process" and "exited with code 1" in r["error"]


@pytest.mark.parametrize("start", [1, 3, 64])
@pytest.mark.parametrize("limit", [1, 50, 4096])
@pytest.mark.parametrize("true_max", [0, 1, 37, 50, 5000])
def test_search_max_batch_finds_the_largest_fit(start, limit, true_max):
    seen = []

    def fits(b):
        seen.append(b)
        return b <= true_max

    out = search_max_batch(fits, start, limit)
    assert out["max_batch"] == min(true_max, limit)
    assert [b for b, _ in out["probes"]] == seen and all(ok == (b <= true_max) for b, ok in out["probes"])
    assert out["upper"] is None if true_max >= limit else out["upper"] == out["max_batch"] + 1
    assert len(seen) <= 2 * 13 + 2  # doubling then bisection: logarithmic in the limit


def test_search_max_batch_tolerance_stops_early():
    out = search_max_batch(lambda b: b <= 1000, 1, 4096, tol=0.05)
    assert out["max_batch"] <= 1000 < out["upper"] and out["upper"] - out["max_batch"] <= 0.05 * out["max_batch"]
    with pytest.raises(ValueError, match="start and limit"):
        search_max_batch(lambda b: True, 0, 10)


def test_ratios_are_against_nondp_of_the_same_case():
    def row(mode, t, mem, status="ok", model="m", dtype="fp32"):
        return {"model": model, "batch": 4, "dtype": dtype, "mode": mode, "status": status,
                "step_time": {"median_s": t}, "peak_mem_bytes": mem}  # fmt: skip

    rows = [row("nondp", 2.0, 100), row("dpk-bk:reference", 3.0, 150), row("opacus-hooks", 0, 0, status="error"),
            row("nondp", 1.0, 10, dtype="bf16"), row("dpk-bk:reference", 1.5, 30, dtype="bf16"),
            row("dpk-bk:reference", 1.0, 1, model="other")]  # fmt: skip
    rows[2]["error"] = "RuntimeError: boom"
    add_ratios(rows)
    assert (rows[1]["time_ratio"], rows[1]["mem_ratio"]) == (1.5, 1.5)
    assert (rows[4]["time_ratio"], rows[4]["mem_ratio"]) == (1.5, 3.0)
    assert rows[2]["time_ratio"] is None and rows[5]["time_ratio"] is None  # failed / no baseline
    md = markdown({"device": "cpu"}, rows, [])
    assert "| dpk-bk:reference | ok | 3000.00 |" in md and "1.50 | 1.50 |" in md
    assert "Failures" in md and "RuntimeError: boom" in md


def test_append_merges_runs(tmp_path):
    def row(mode, batch, t):
        return {"model": "m", "batch": batch, "dtype": "fp32", "mode": mode, "status": "ok", "time_ratio": t}

    path = tmp_path / "results.json"
    old = {"meta": {"timestamp": "t0", "command": "python -m bench a"}, "results": [row("nondp", 4, 1.0),
           row("dpk-bk:reference", 4, 2.0), row("nondp", 8, 1.0)], "max_batch": [{"model": "m", "dtype": "fp32",
           "mode": "nondp", "max_batch": 64}]}  # fmt: skip
    path.write_text(json.dumps(old))
    new = [row("nondp", 4, 1.0), row("dpk-bk:reference", 4, 1.25)]
    results, searches, info = merge(path, new, [], {"timestamp": "t1", "command": "python -m bench b"})
    got = {(r["mode"], r["batch"]): (r["time_ratio"], r["run"]) for r in results}
    assert got == {("nondp", 8): (1.0, "t0"), ("nondp", 4): (1.0, "t1"), ("dpk-bk:reference", 4): (1.25, "t1")}
    assert searches == old["max_batch"] and info["runs"] == [{"timestamp": "t0", "command": "python -m bench a"}]


def test_mode_expansion():
    run, skipped = M.expand(["all"], "cpu", None)
    assert run == ["nondp", "dpk-bk:reference", "dpk-two-pass:reference", "dpk-layer-wise:reference",
                   "opacus-hooks", "opacus-ghost"]  # fmt: skip
    assert skipped == ["fastdp-bk", "fastdp-mixopt"]
    run, skipped = M.expand(["opacus-ghost", "dpk-bk:triton", "fastdp-bk", "nondp"], "cpu", "/x")
    assert run == ["nondp", "opacus-ghost", "dpk-bk:triton", "fastdp-bk"] and skipped == []
    with pytest.raises(ValueError, match="unknown mode"):
        M.expand(["dp-sgd"], "cpu", None)


@pytest.mark.parametrize("name", [n for n in CONFIGS if "tiny" in n])
def test_tiny_models_build_and_run(name):
    w = build(name, 2)
    out = w.model(w.x)
    cfg = CONFIGS[name]
    per_position = cfg.kind in ("gpt", "hf-gpt2", "mlp", "lstm")
    assert out.shape == ((2, cfg.seq, cfg.classes) if per_position else (2, cfg.classes))
    w.loss(out).backward()
    info = describe(w.model)
    assert info["parameters"] == sum(p.numel() for p in w.model.parameters()) > 0
    assert set(info["layers"]) <= {"Linear", "Embedding", "LayerNorm", "Conv2d", "GroupNorm", "Conv1D", "LSTM"}
    assert all(p.grad is not None for p in w.model.parameters())


def test_broadcast_position_ids_compute_the_same_model():
    a, b = build("gpt2-tiny", 3), build("gpt2-tiny-bcast", 3)
    torch.testing.assert_close(a.model(a.x), b.model(b.x), rtol=0, atol=0)  # same weights, same ids: bit-equal


def test_vit_patch_linear_is_the_strided_conv():
    w = build("vit-tiny", 2)
    vit = w.model
    p = vit.patch
    conv = nn.Conv2d(3, vit.patch_embed.out_features, p, stride=p)
    conv.weight.data = vit.patch_embed.weight.data.view(-1, 3, p, p)
    conv.bias.data = vit.patch_embed.bias.data
    img = w.x
    patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(2, -1, 3 * p * p)
    # fp32 sums of 48 products in different orders: a few ulps
    torch.testing.assert_close(vit.patch_embed(patches), conv(img).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_stock_hf_gpt2_runs_for_dpkernels_and_peer_failures_are_recorded(tmp_path):
    """The stock transformers GPT-2 (tied head, (1, T) position ids): dpkernels trains it; Opacus's hooks mode
    crashes on the broadcast position ids and its ghost mode refuses the tie. Both are results, not harness errors."""
    argv = ["--models", "hf-gpt2-tiny", "--batch-sizes", "3", "--dtype", "fp32", "--device", "cpu", "--no-plots"]
    argv += ["--modes", "nondp,dpk-bk,opacus-hooks,opacus-ghost", "--steps", "2", "--warmup", "1"]
    argv += ["--out", str(tmp_path), "--inline"]
    assert main(argv) == 0
    res = {r["mode"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert res["nondp"]["status"] == "ok"
    assert res["dpk-bk:reference"]["status"] == "ok"
    assert res["dpk-bk:reference"]["params_with_grad"] == res["dpk-bk:reference"]["params_trainable"] > 0
    assert res["opacus-hooks"]["status"] == "error" and "stack expects" in res["opacus-hooks"]["error"]
    assert res["opacus-ghost"]["status"] == "error" and "tying" in res["opacus-ghost"]["error"]


def test_gpu_session_script_dry_run(tmp_path):
    """bench/gpu_session.sh runs on a lent GPU only; here its dry run checks that it parses, refuses an
    unknown stage, and runs each stage's command with what the device README asks for."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"
    env = dict(os.environ, DRY="1", OUT=str(tmp_path / "out"))
    run = subprocess.run(["bash", str(script), "tests", "ops", "models"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any("pytest" in x and "tests/ops" in x and "-m gpu\\ or\\ not\\ slow" in x for x in lines)
    assert any("bench.ops --device cuda" in x for x in lines)
    assert any("-m bench --models gpt2-small" in x and "--device cuda" in x for x in lines)
    bad = subprocess.run(["bash", str(script), "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


# ----------------------------------------------------------------------------- bench.overhead


def test_step_counter_counts_kernels_syncs_and_leaves_views_out():
    from bench.counters import StepCounter

    x = torch.randn(4, 3)
    with StepCounter() as c:
        y = x.t().t().view(12).unsqueeze(0).expand(2, 12)  # views only: no kernel
        z = (y * 2).sum()  # two kernels
        bool(z > 0)  # a kernel (gt) and a host read
    assert sum(c.kernels.values()) == 3 and c.kernels["aten.mul.Tensor"] == 1
    assert c.syncs == {"aten._local_scalar_dense.default": 1} and "aten.view.default" in c.other
    with StepCounter() as c:
        torch.ops.aten._unsafe_view(x, [12])  # metadata only, though its schema is not a view's
    assert not c.kernels and c.other == {"aten._unsafe_view.default": 1}


def test_memory_timeline_sees_every_allocation_exactly():
    from bench.counters import MemoryTimeline

    with MemoryTimeline() as tl:
        keep = torch.zeros(1000)  # 4,000 bytes live before the window
        with torch.profiler.record_function("window"):
            a = torch.ones(25_000)  # 100,000 bytes
            b = a + a  # 100,000 more: the peak
            del a, b
    assert tl.peak("window") == {"peak_bytes": 204_000, "start_bytes": 4_000, "end_bytes": 4_000}
    del keep


def test_memory_timeline_names_what_is_live_at_the_peak():
    from bench.counters import MemoryTimeline

    def window() -> None:  # Python frames are seen from the profile's start on
        with torch.profiler.record_function("window"):
            a = torch.ones(2**18)  # 1 MiB (allocated by aten::empty inside aten::ones)
            b = a * 2  # 1 MiB more: the peak
            del a, b
            c = torch.ones(2**10)  # after the peak: not listed
            del c

    with MemoryTimeline(stacks=True) as tl:
        keep = torch.zeros(2**17)  # 0.5 MiB, made before the window
        window()
    top = tl.holders("window", top=3)
    got = sorted((h["mib"], h["when"], h["site"].split(" < ")[0]) for h in top)
    assert got == [(0.5, "before", "aten::empty"), (1.0, "in", "aten::empty"), (1.0, "in", "aten::mul")]
    frame = f"test_bench_smoke.py({window.__code__.co_firstlineno}): window"
    assert all(frame in h["site"] for h in top if h["when"] == "in")
    del keep


def test_triton_launches_are_counted_under_the_interpreter():
    from bench.counters import count_triton_launches
    from dpkernels import ops

    x, g = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    with ops.use_backend("triton"), count_triton_launches() as launches:
        ops.linear_norms(x, g, bias=True, method="ghost")
    assert sum(launches.values()) >= 1


def test_overhead_quick_run_reports_every_figure_against_nondp(tmp_path, capsys):
    from bench.overhead import main as overhead

    assert overhead(["--quick", "--inline", "--out", str(tmp_path), "--steps", "1"]) == 0
    data = json.loads((tmp_path / "overhead.json").read_text())
    res = {r["mode"]: r for r in data["results"]}
    assert list(res) == ["nondp", "dpk-bk:reference"]
    base, dp = res["nondp"], res["dpk-bk:reference"]
    assert base["status"] == dp["status"] == "ok", dp.get("traceback")
    assert base["syncs"] == 0 and dp["syncs"] <= 1  # at most one host read per DP step
    assert 0 < base["kernels_total"] < dp["kernels_total"] and dp["kernels_total_ratio"] > 1
    assert base["flops"] > 0 and dp["flops_ratio"] >= 1
    # the peak holds at least the weights and their gradients (both live at the end of backward)
    assert min(dp["peak_bytes"], base["peak_bytes"]) >= 2 * base["param_bytes"] > 0
    assert dp["dpk_python_s"] >= 0 and dp["dp_layers"] > 0
    assert "| gpt2-tiny | 2 | dpk-bk:reference |" in capsys.readouterr().out
    assert (tmp_path / "overhead.png").read_bytes()[:8] == PNG
