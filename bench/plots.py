"""The benchmarks' plots (matplotlib, drawn off-screen into PNG files)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot
import matplotlib.pyplot as plt

__all__ = ["failover_plot", "webhook_plots"]


def failover_plot(result: dict[str, Any], path: Path) -> Path:
    """Box + strip plot of every failover sample, log scale, targets as red marks."""
    scenarios = result["scenarios"]
    hung_bound = (result["timings_s"]["evict_after"] + result["timings_s"]["heartbeat"]) * 1000
    target_ms = {
        ("crash", "elected_ms"): 100,
        ("crash", "executed_ms"): 250,
        ("graceful", "elected_ms"): 50,
        ("hung", "elected_ms"): hung_bound,
        ("partition", "elected_ms"): hung_bound,
    }
    labels, data, targets = [], [], []
    for scenario, got in scenarios.items():
        for metric in ("elected_ms", "executed_ms"):
            values = [r[metric] for r in got["rounds_detail"] if metric in r]
            if values:
                labels.append(f"{scenario}\n{metric.removesuffix('_ms')}")
                data.append(values)
                targets.append(target_ms.get((scenario, metric)))
    for name, base in result["redis_baseline"].items():
        if isinstance(base, dict) and base.get("samples_ms"):
            labels.append(f"{name}\ntakeover")
            data.append(base["samples_ms"])
            targets.append(None)

    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(labels)), 5.5))
    positions = range(1, len(data) + 1)
    ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
    rng = random.Random(1)
    for x, values in zip(positions, data, strict=True):
        jitter = [x + rng.uniform(-0.15, 0.15) for _ in values]
        ax.scatter(jitter, values, s=12, alpha=0.6, color="tab:blue", zorder=3)
    for x, limit in zip(positions, targets, strict=True):
        if limit is not None:
            ax.hlines(limit, x - 0.35, x + 0.35, colors="red", linewidth=2, zorder=4)
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms from kill/stop/term (log scale)")
    t = result["timings_s"]
    ax.set_title(
        f"pgleader failover, 3 instances (heartbeat {t['heartbeat']:g} s, lease {t['lease']:g} s,"
        f" evict_after {t['evict_after']:g} s); red: target"
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def webhook_plots(result: dict[str, Any], latency_path: Path, throughput_path: Path) -> list[Path]:
    """Answer latency percentiles vs offered rate per target, and achieved/executed rates."""
    steps = result["steps"]
    series: dict[str, list[dict[str, Any]]] = {}
    for step in steps:
        series.setdefault(step["target"], []).append(step)
    bare = result.get("baselines", {}).get("bare_http", {}).get("steps", [])
    if bare:
        series["bare aiohttp (baseline)"] = bare

    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.8), squeeze=False)
    for ax, (name, got) in zip(axes[0], series.items(), strict=True):
        got = sorted(got, key=lambda s: s["rate"])
        rates = [s["rate"] for s in got]
        for pct, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^-"), ("max", "x:")):
            ax.plot(rates, [s["latency_ms"][pct] for s in got], style, label=pct)
        flush = [(s["rate"], s["disk_flush_ms"]["max"]) for s in got if s.get("disk_flush_ms")]
        if flush:  # the disk's worst WAL-like flush meanwhile: what a tail may be made of
            ax.plot(*zip(*flush, strict=True), "d-.", color="grey", label="disk flush max")
        ax.axhline(25, color="red", linewidth=1, label="25 ms (p99 target at 200/s)")
        ax.axhline(100, color="orange", linewidth=1, label="100 ms (search criterion)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered signals/s")
        ax.set_ylabel("answer latency from scheduled send, ms")
        ax.set_title(name)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("webhook answer latency (open loop, coordinated-omission free)")
    fig.tight_layout()
    latency_path.parent.mkdir(exist_ok=True)
    fig.savefig(latency_path, dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, got in series.items():
        got = sorted(got, key=lambda s: s["rate"])
        rates = [s["rate"] for s in got]
        ax1.plot(rates, [s["achieved_rate"] for s in got], "o-", label=f"{name}: answered 2xx/s")
        if "executed_rate" in got[0]:
            ax1.plot(rates, [s["executed_rate"] for s in got], "x--", label=f"{name}: executed/s")
        if "cpu_s_per_1000" in got[0]:
            ax2.plot(rates, [s["cpu_s_per_1000"]["total"] for s in got], "o-", label=name)
    ax1.plot([min(r["rate"] for r in steps), max(r["rate"] for r in steps)],
             [min(r["rate"] for r in steps), max(r["rate"] for r in steps)],
             color="grey", linewidth=0.8, label="offered")  # fmt: skip
    db = result.get("baselines", {}).get("db_loop", {}).get("rows_per_s")
    if db:
        ax1.axhline(db, color="purple", linewidth=1, label="plain psycopg loop rows/s")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("offered signals/s")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("per second")
    ax1.set_title("throughput")
    ax2.set_ylabel("CPU s per 1000 signals (instances + postgres)")
    ax2.set_title("cost")
    fig.tight_layout()
    fig.savefig(throughput_path, dpi=110)
    plt.close(fig)
    return [latency_path, throughput_path]
