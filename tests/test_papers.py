"""Smoke tests of the paper experiments (bench/papers/): each --quick run writes its outputs with sane numbers.

The full runs (minutes) are what the README's "Reproducing the papers" reports; here each script's
--quick mode runs in this process and its JSON is checked: every point has the runs it claims, the
accountant spent the target epsilon, the metrics are in range, the figure is a PNG. No accuracy
claim of the papers is asserted: a few steps cannot show one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.papers import automatic_clipping as AC
from bench.papers import group_clipping as GC
from bench.papers import perturbed_clipping as PC
from bench.papers import pruning as PR

PNG = b"\x89PNG\r\n\x1a\n"


def _outputs(tmp_path, stem):
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG
    md = (tmp_path / f"{stem}.md").read_text()
    return data, md


def _spent_target(eps: float, target: float) -> bool:
    # Calibration hits the target from below, within dp-accounting's bisection tolerance.
    return target * 0.99 <= eps <= target * (1 + 1e-6)


def test_automatic_clipping_quick(tmp_path, capsys):
    assert AC.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    data, md = _outputs(tmp_path, "automatic_clipping_quick")
    assert "AUTO-S" in capsys.readouterr().out
    cfg = data["config"]
    assert data["R"] == pytest.approx([0.01, 10.0])
    assert set(data["tasks"]) == {"digits", "breast-cancer"}
    for name, rec in data["tasks"].items():
        # 2 values of R for Abadi plus AUTO-S, one lr0, each over 3 seeds
        assert len(rec["points"]) == 3 and all(p["accuracy"]["n"] == cfg["seeds"] == 3 for p in rec["points"])
        assert len(rec["runs"]) == 9
        assert {r["seed"] for r in rec["runs"]} == {0, 1, 2}
        for r in rec["runs"]:
            assert _spent_target(r["epsilon"], cfg["epsilon"]), r
            assert r["steps"] == rec["steps"] > 0
            assert 0.0 <= r["accuracy"] <= 1.0
        assert rec["noise_multiplier"] > 0
        assert f"## {name}" in md
    # digits has 10 classes: even two epochs of DP training are far above chance (0.1); a step that did
    # nothing (no gradient reaching the weights, or noise swamping it) stays near chance.
    auto = data["tasks"]["digits"]["best_automatic"]["accuracy"]["mean"]
    assert auto > 0.3, auto


def test_group_clipping_quick(tmp_path):
    assert GC.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    data, md = _outputs(tmp_path, "group_clipping_quick")
    cfg = data["config"]
    assert data["corpus"]["chars"] == 20_000 and len(data["corpus"]["sha256"]) == 64
    for s in cfg["sizes"]:
        rec = data["sizes"][s]
        size = GC.SIZES[s]
        assert rec["params"] == GC.n_params(GC.build(size, cfg["seq"]))
        n_blocks = size.layers
        # DP layers of a GPT: wte, wpe, per block ln1, attn.qkv, attn.proj, ln2, mlp.fc, mlp.out; ln_f, lm_head
        layers = 2 + 6 * n_blocks + 2
        params = len(list(GC.build(size, cfg["seq"]).parameters()))
        expected_groups = {
            "all-layer": 1,
            "per-block": n_blocks + 2,
            "embeddings-vs-rest": 2,
            "layer-wise": layers,
            "param-wise": params,
        }
        g = rec["groupings"]
        assert set(g) == {"non-DP", *expected_groups}
        for name, k in expected_groups.items():
            e = g[name]
            assert e["groups"] == k, (s, name, e["groups"])
            assert e["bpc"]["n"] == cfg["seeds"] == 3 and e["accuracy"]["n"] == 3
            assert _spent_target(e["epsilon"], cfg["epsilon"]), e["epsilon"]
        for name, e in g.items():
            for r in e["runs"]:
                # a model barely trained predicts near-uniformly over the 96 characters: log2(96) = 6.58 bits
                assert math.isfinite(r["bpc"]) and 0 < r["bpc"] < 10, (name, r)
                assert 0.0 <= r["accuracy"] <= 1.0
            assert e["peak_bytes"] > 0
        # Book-keeping holds every layer's (A, G) until the one all-layer norm is known; with a group per
        # layer each is released after its own backward. The exact tensor peak can only go down.
        assert g["layer-wise"]["peak_bytes"] <= g["all-layer"]["peak_bytes"]
    assert md.count("| param-wise |") == len(cfg["sizes"])


def test_corpus_is_deterministic_and_blocks_are_disjoint():
    text, meta = GC.stdlib_docstrings(5_000)
    again, meta2 = GC.stdlib_docstrings(5_000)
    assert text == again and meta == meta2 and len(text) == 5_000
    ids = GC.encode(text + "\u00e9")  # a character outside the alphabet maps to '?'
    assert ids.min() >= 0 and ids.max() < len(GC.ALPHABET) and ids[-1] == GC.ALPHABET.index("?")
    train, val = GC.blocks(ids[:-1], seq=15)
    n = 5_000 // 16
    assert len(train) + len(val) == n and len(val) == n // GC.HOLDOUT_EVERY
    # blocks of T + 1 = 16 consecutive characters, in order; every 10th held out
    every = ids[: n * 16].view(n, 16)
    held = torch.arange(n) % GC.HOLDOUT_EVERY == GC.HOLDOUT_EVERY - 1
    assert torch.equal(train, every[~held]) and torch.equal(val, every[held])


def test_perturbed_clipping_quick(tmp_path):
    assert PC.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    data, md = _outputs(tmp_path, "perturbed_clipping_quick")
    cfg, m, d = data["config"], data["mean"], data["digits"]
    assert cfg["seeds"] == 3
    # (a): every k over 3 seeds at the calibrated epsilon; the noiseless plain-clipping fixed point of this data
    # is away from the mean (3/4 of the points near (-1, 0), 1/4 near (3, 1): about 0.7 at R = 1)
    assert [p["k"] for p in m["points"]] == cfg["mean_k"] and all(p["distance"]["n"] == 3 for p in m["points"])
    assert 0.5 < m["plain_fixed_point_distance"] < 1.0
    for r in m["runs"]:
        assert _spent_target(r["epsilon"], cfg["epsilon"]), r
        assert math.isfinite(r["distance"])
    # (b): plain and perturbed runs, 3 seeds each, a symmetry trace per run with finite measures
    assert [p["k"] for p in d["points"]] == [0.0, cfg["k"]] and all(p["accuracy"]["n"] == 3 for p in d["points"])
    for r in d["runs"]:
        assert _spent_target(r["epsilon"], cfg["epsilon"]), r
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == d["steps"] > 0
        assert [t["step"] for t in r["trace"]] == [*range(0, d["steps"], cfg["probe_every"]), d["steps"]]
        for t in r["trace"]:
            assert all(math.isfinite(v) for v in t.values()), t
            assert abs(t["bias_plain"]) < 1.0 and t["skew_random"] >= 0.0
    assert "## (b) digits" in md


def test_pruning_quick(tmp_path):
    assert PR.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    data, md = _outputs(tmp_path, "pruning_quick")
    cfg = data["config"]
    E, k = cfg["epochs"], cfg["seeds"]
    assert set(data["ablation"]) == set(PR.VARIANTS)
    for v, rec in data["ablation"].items():
        assert len(rec["runs"]) == k and rec["final"]["n"] == k, v
        for r in rec["runs"]:
            assert len(r["accuracy"]) == len(r["train_loss"]) == E
            assert all(0.0 <= a <= 1.0 for a in r["accuracy"]) and all(math.isfinite(x) for x in r["train_loss"])
        assert f"| {v} |" in md
    # only the DP-SGD runs (dense and pruned) are private, and each spent the target epsilon
    assert len(data["epsilon_spent"]) == k * (1 + len(cfg["structures"]) * (len(cfg["sparsities"]) - 1))
    assert all(_spent_target(e, cfg["epsilon"]) for e in data["epsilon_spent"]), data["epsilon_spent"]
    assert "epsilon" not in data["ablation"]["noise only"]["runs"][0]
    # the switched runs share their first half with the pure runs of the same seed (same seeds, same phases)
    ab = data["ablation"]
    for a, b in (("DP-SGD -> SGD", "DP-SGD"), ("SGD -> DP-SGD", "neither")):
        for ra, rb in zip(ab[a]["runs"], ab[b]["runs"], strict=True):
            assert ra["accuracy"][: E // 2] == rb["accuracy"][: E // 2], (a, b)
    # plain SGD on digits is far above chance (0.1) after two epochs: the runs train
    assert ab["neither"]["final"]["mean"] > 0.5
    curves = data["sparsity_curves"]
    assert set(curves) == {"False", "rows", "post-processing"}
    for name, pts in curves.items():
        assert [p["sparsity"] for p in pts] == cfg["sparsities"], name
        assert all(p["accuracy"]["n"] == k for p in pts)


def test_adaptive_clipping_quick(tmp_path):
    from bench.papers import adaptive_clipping as ADC

    assert ADC.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    data, md = _outputs(tmp_path, "adaptive_clipping_quick")
    d = data["digits"]
    assert [(p["R0"], p["adaptive"]) for p in d["points"]] == [(1.0, False), (0.05, True), (20.0, True)]
    for r in d["runs"]:
        assert _spent_target(r["epsilon"], data["config"]["epsilon"]), r
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == d["steps"] > 0
        if r["adaptive"]:  # the counts' share: the gradient's noise multiplier above the accounted sigma
            assert r["grad_noise_multiplier"] > d["noise_multiplier"]
            assert r["trace"] and all(len(t["R"]) == len(t["quantile"]) == 2 for t in r["trace"])
            assert all(0.0 <= f <= 1.0 for t in r["trace"] for f in t["fraction_below"])
            assert r["final_R"] != [r["R0"], r["R0"]]  # the bounds moved
    assert "Adaptive clipping on digits" in md
