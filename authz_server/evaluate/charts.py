"""PNG charts for the report (matplotlib, Agg backend: no display needed). Each function takes
the plain results and a path, and writes one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

BLUE, ORANGE, GREEN, GREY, RED, PURPLE = "#3b6ea8", "#e08a2c", "#4c9a5b", "#9a9a9a", "#c0504d", "#7d5ba6"


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attacks(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Share of attempts blocked (baseline vs zero trust) and detected, per attack."""
    names = [r["name"] for r in rows]
    share = lambda part, whole: 100.0 * part / whole if whole else 0.0  # noqa: E731
    baseline = [share(r["baseline_blocked"], r.get("baseline_attempts", r["attempts"])) for r in rows]
    blocked = [share(r["blocked"], r["attempts"]) for r in rows]
    detected = [share(r["detected"], r["attempts"]) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.6))
    y = range(len(rows))
    height = 0.27
    ax.barh([i - height for i in y], baseline, height, label="blocked, baseline (routed only)", color=GREY)
    ax.barh(list(y), blocked, height, label="blocked, zero trust", color=BLUE)
    ax.barh([i + height for i in y], detected, height, label="identified in the audit evidence", color=GREEN)
    for i, value in enumerate(baseline):
        ax.text(value + 0.5, i - height, f"{value:.0f} %", va="center", fontsize=7, color="#555555")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("% of attempts")
    ax.set_title("Attacks: blocked and detected")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def throughput(setups: dict[str, dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    keys = list(setups)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(keys) + 1.4))
    values = [setups[k]["rps"] for k in keys]
    colors = [GREY if k == "baseline" else ORANGE if k.startswith("native") else PURPLE if k == "bare_grpc" else BLUE
              for k in keys]
    ax.barh(range(len(keys)), values, color=colors)
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_yticks(range(len(keys)), [labels.get(k, k) for k in keys])
    ax.invert_yaxis()
    ax.set_xlabel("requests per second (wrk through Envoy)")
    ax.set_title("Throughput")
    ax.set_xlim(0, max(values) * 1.18 if values else 1)
    _save(fig, path)


def latency(setups: dict[str, dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    keys = list(setups)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(keys) + 1.4))
    height = 0.27
    for offset, (field, name, color) in zip((-height, 0, height), (("p50_ms", "p50", BLUE), ("p95_ms", "p95", ORANGE),
                                                                   ("p99_ms", "p99", RED))):
        ax.barh([i + offset for i in range(len(keys))], [setups[k][field] for k in keys], height, label=name,
                color=color)
    ax.set_yticks(range(len(keys)), [labels.get(k, k) for k in keys])
    ax.invert_yaxis()
    ax.set_xlabel("latency, ms")
    ax.set_title("Latency percentiles")
    ax.legend(fontsize=8)
    _save(fig, path)


def cpu(setups: dict[str, dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    keys = list(setups)
    front = [(setups[k].get("extra", {}).get("cpu_us_per_req") or {}).get("front_envoy", 0.0) for k in keys]
    upstream = [(setups[k].get("extra", {}).get("cpu_us_per_req") or {}).get("upstream_envoy", 0.0) for k in keys]
    authz = [setups[k].get("authz_cpu_us_per_req") or 0.0 for k in keys]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(keys) + 1.4))
    y = range(len(keys))
    ax.barh(list(y), front, color=BLUE, label="front Envoy")
    ax.barh(list(y), authz, left=front, color=ORANGE, label="ext_authz server (authz-server or yardstick)")
    ax.barh(list(y), upstream, left=[a + b for a, b in zip(front, authz)], color=GREY, label="upstream (an Envoy)")
    ax.set_yticks(list(y), [labels.get(k, k) for k in keys])
    ax.invert_yaxis()
    ax.set_xlabel("CPU µs per request")
    ax.set_title("CPU per request")
    ax.legend(fontsize=8)
    _save(fig, path)


def breakdown(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 2.9))
    left = 0.0
    palette = [BLUE, "#6f9bd1", PURPLE, GREEN, "#8cc084", ORANGE, RED]
    for row, color in zip(rows, palette):
        ax.barh([0], [row["cpu_us"]], left=left, color=color, label=f"{row['part']} ({row['cpu_us']:.0f} µs)")
        left += row["cpu_us"]
    ax.set_yticks([])
    ax.set_xlabel("CPU µs per request, zero trust with a session id")
    ax.set_title("Where the time goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=1, frameon=False)
    fig.set_size_inches(9, 3.9)
    _save(fig, path)


def policy_growth(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, color in zip(sorted({r["variant"] for r in rows}), (BLUE, ORANGE)):
        points = sorted((r["rules"], r["last_us"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in points], [p[1] / 1000 for p in points], marker="o", color=color, label=variant)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rules in the policy")
    ax.set_ylabel("uncached decision, ms (request matching the last rule)")
    ax.set_title("Cost as the policy grows")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)


def session_growth(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [r["sessions"] for r in rows]
    ax.plot(sizes, [r["rss_mb"] for r in rows], marker="o", color=BLUE, label="memory, MB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("live sessions in the memory store")
    ax.set_ylabel("memory, MB", color=BLUE)
    other = ax.twinx()
    other.plot(sizes, [r["lookup_us"] for r in rows], marker="s", color=ORANGE, label="store lookup, µs")
    other.plot(sizes, [r["resolve_us"] for r in rows], marker="^", color=GREEN, label="identity from x-session-id, µs")
    other.set_ylabel("µs per lookup")
    other.set_ylim(0, max(r["resolve_us"] for r in rows) * 1.6 if rows else 1)
    lines = ax.get_lines() + other.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    ax.set_title("Cost as sessions grow")
    _save(fig, path)


def accuracy(by_kind: dict[str, dict[str, int]], path: Path) -> None:
    kinds = sorted(by_kind, key=lambda k: -by_kind[k].get("requests", 0))
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(kinds) + 1.4))
    y = range(len(kinds))
    ax.barh(list(y), [by_kind[k].get("requests", 0) for k in kinds], color=GREY, label="requests")
    ax.barh(list(y), [by_kind[k].get("expected_allowed", 0) for k in kinds], color=BLUE, label="of which allowed")
    ax.barh(list(y), [by_kind[k].get("mismatches", 0) for k in kinds], color=RED, label="mismatches")
    ax.set_yticks(list(y), kinds)
    ax.invert_yaxis()
    ax.set_xlabel("requests")
    ax.set_title("Accuracy traffic by identity method / attack class")
    ax.legend(fontsize=8)
    _save(fig, path)
