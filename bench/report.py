"""Benchmark output: results.json (everything), results.md (tables) and PNG plots of the ratios to non-DP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["batch"], r["dtype"])


def markdown(info: dict[str, Any], results: list[dict[str, Any]], searches: list[dict[str, Any]]) -> str:
    """Tables per (model, batch, dtype): median step time, IQR, samples/s, peak memory, ratios to non-DP."""
    lines = [
        f"# Benchmark: {info.get('device_name', info.get('device'))}",
        "",
        f"- command: `{info.get('command')}`",
        f"- time: {info.get('timestamp')}; torch {info.get('torch')}, triton {info.get('triton')}, "
        f"opacus {info.get('opacus')}, dpkernels {info.get('dpkernels')}"
        + (f", fastDP {info.get('fastdp')}" if info.get("fastdp") else ""),
        f"- {info.get('steps')} timed steps after {info.get('warmup')} warm-up; step = zero_grad + forward + loss + "
        f"backward + {info.get('optimizer')}; {info.get('privacy')}",
        f"- dtype: {info.get('dtype_meaning')}",
        f"- memory: {info.get('memory_measure')}",
        "- ratios (x) are against `nondp` of the same model, batch and dtype in this run; IQR = q75 - q25",
    ]
    if info.get("isolation"):
        lines.append(f"- isolation: {info['isolation']}")
    for run in info.get("runs", []):
        lines.append(f"- merged with the earlier run of {run.get('timestamp')}: `{run.get('command')}`")
    lines.append("")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    for (model, batch, dtype), rows in groups.items():
        lines += [
            f"## {model}, B={batch}, {dtype}",
            "",
            "| mode | status | step ms (median) | IQR ms | samples/s | peak MiB | time x | mem x |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            st = r.get("step_time") or {}
            med = st.get("median_s")
            iqr = st.get("iqr_s")
            mem = r.get("peak_mem_bytes")
            lines.append(
                f"| {r['mode']} | {r['status']} | {_fmt(med * 1e3 if med is not None else None, '.2f')} "
                f"| {_fmt(iqr * 1e3 if iqr is not None else None, '.2f')} | {_fmt(r.get('samples_per_s'), '.1f')} "
                f"| {_fmt(mem / MIB if mem is not None else None, '.1f')} | {_fmt(r.get('time_ratio'), '.2f')} "
                f"| {_fmt(r.get('mem_ratio'), '.2f')} |"
            )
        lines.append("")
    failed = [r for r in results if r["status"] not in ("ok", "skipped")]
    if failed:
        lines += ["## Failures (recorded, not fixed)", ""]
        for r in failed:
            err = str(r.get("error", "")).replace("\n", " ").replace("|", "/")[:300]
            lines.append(f"- {r['mode']} on {r['model']} B={r['batch']} {r['dtype']} ({r.get('phase', '?')}): {err}")
        lines.append("")
    skipped = sorted({r["mode"] for r in results if r["status"] == "skipped"})
    if skipped:
        why = next(r for r in results if r["status"] == "skipped")["error"]
        lines += [f"Skipped: {', '.join(skipped)} ({why})", ""]
    changes = {(r["mode"], r["model"]): r["changes"] for r in results if r.get("changes")}
    if changes:
        lines += ["## Model changes a mode needed", ""]
        lines += [f"- {mode} on {model}: {'; '.join(ch)}" for (mode, model), ch in changes.items()]
        lines.append("")
    served = {r["mode"]: r["info"]["served_by"] for r in results if r.get("info", {}).get("served_by")}
    if served:
        lines += ["## dpkernels: backend that served each op", ""]
        lines += [f"- {mode}: " + ", ".join(f"{op}={b}" for op, b in sorted(s.items())) for mode, s in served.items()]
        lines.append("")
    if searches:
        lines += [
            "## Largest batch that fits",
            "",
            "| model | dtype | mode | max batch | first failing |",
            "|---|---|---|---:|---:|",
        ]
        for s in searches:
            lines.append(
                f"| {s['model']} | {s['dtype']} | {s['mode']} | {_fmt(s.get('max_batch'), 'd')} "
                f"| {s.get('upper') if s.get('upper') is not None else s.get('error', '-')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    """Grouped bars of ``metric`` (time_ratio or mem_ratio), one panel per dtype: a group per (model, batch),
    a bar per DP mode. A mode that did not run is marked by its status instead of a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    modes = [m for m in dict.fromkeys(r["mode"] for r in results) if m != "nondp"]
    by = {(_key(r), r["mode"]): r for r in results}
    width = 0.8 / max(1, len(modes))
    n_groups = max(len({(r["model"], r["batch"]) for r in results if r["dtype"] == d}) for d in dtypes)
    fig, axes = plt.subplots(
        len(dtypes), 1, figsize=(max(6.0, 1.5 + 0.16 * n_groups * max(1, len(modes))), 3.2 * len(dtypes)),
        squeeze=False,
        layout="constrained",
    )  # fmt: skip
    cmap = plt.get_cmap("tab20")
    for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
        keys = list(dict.fromkeys(_key(r) for r in results if r["dtype"] == dtype))
        for j, mode in enumerate(modes):
            xs, ys = [], []
            for i, k in enumerate(keys):
                r = by.get((k, mode))
                x = i - 0.4 + width * (j + 0.5)
                if r is not None and r.get(metric) is not None:
                    xs.append(x)
                    ys.append(r[metric])
                elif r is not None:
                    ax.text(x, 0.03, r["status"], rotation=90, ha="center", va="bottom", fontsize=6,
                            color=cmap(j % 20), transform=ax.get_xaxis_transform())  # fmt: skip
            ax.bar(xs, ys, width=width, label=mode, color=cmap(j % 20))
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{m}\nB={b}" for m, b, _ in keys], fontsize=7)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (x non-DP)", fontsize=8)
        ax.set_title(dtype, fontsize=8, loc="left")
    axes[0, 0].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend placed right of the axes
    plt.close(fig)
    return path


def write(
    out: Path, info: dict[str, Any], results: list[dict[str, Any]], searches: list[dict[str, Any]], plots: bool = True
) -> list[Path]:
    """results.json, results.md and (unless plots=False) time_ratio.png, memory_ratio.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    with open(paths[0], "w") as f:
        json.dump({"meta": info, "results": results, "max_batch": searches}, f, indent=1)
    paths[1].write_text(markdown(info, results, searches))
    if plots:
        dev = info.get("device_name", info.get("device"))
        paths.append(plot(results, "time_ratio", out / "time_ratio.png", f"Step time / non-DP step time - {dev}"))
        paths.append(plot(results, "mem_ratio", out / "memory_ratio.png", f"Peak memory / non-DP peak - {dev}"))
    return paths


def main(argv: list[str] | None = None) -> int:
    """python -m bench.report DIR: rewrite DIR's results.md and plots from its results.json."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report DIR (a directory holding results.json)", file=sys.stderr)
        return 2
    data = json.loads((Path(args[0]) / "results.json").read_text())
    for p in write(Path(args[0]), data["meta"], data["results"], data.get("max_batch", [])):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
