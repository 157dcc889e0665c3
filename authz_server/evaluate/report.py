"""The evaluation's outputs: ``report.md`` with its PNG charts (linked relatively),
``results.json`` in the shape DESIGN.md fixes, and ``details.json`` with everything else
(every mismatch, every attack attempt shown, the raw load figures)."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import charts
from .accuracy import AccuracyResult
from .attacks import AttackResult
from .perf import LABELS, overhead, where_time_goes
from .world import Limits

# What the source papers report for their zero-trust set-up (issue 8).
PAPER = {"response_time_pct": 19.0, "rps_pct": -6.6, "accuracy_pct": 99.9, "accuracy_requests": 15_000}


@dataclass
class Evaluation:
    quick: bool
    started: float
    policies: Path
    limits: Limits
    accuracy: AccuracyResult | None = None
    zero_trust: list[AttackResult] = field(default_factory=list)
    baseline: list[AttackResult] = field(default_factory=list)
    in_process: list[AttackResult] = field(default_factory=list)
    performance: dict[str, Any] | None = None
    policy_growth: list[dict[str, Any]] | None = None
    session_growth: list[dict[str, Any]] | None = None
    broken: list[tuple[str, str]] = field(default_factory=list)
    finished: float = 0.0

    def attack_rows(self) -> list[dict[str, Any]]:
        baseline = {r.name: r for r in self.baseline}
        rows = []
        for result in self.zero_trust:
            if not result.applicable:
                continue
            base = baseline.get(result.name)
            rows.append({"name": result.name, "attempts": result.attempts, "blocked": result.blocked,
                         "detected": result.detected, "baseline_blocked": base.blocked if base else 0,
                         "baseline_attempts": base.attempts if base else result.attempts})
        return rows


def results_json(evaluation: Evaluation) -> dict[str, Any]:
    performance: dict[str, Any] = {}
    if evaluation.performance:
        setups = evaluation.performance["setups"]
        performance["setups"] = {key: _setup_summary(key, value) for key, value in setups.items()}
        performance["overhead_vs_baseline"] = overhead(setups)
        performance["breakdown"] = where_time_goes(setups, evaluation.performance["breakdown"])
        performance["in_process_us"] = evaluation.performance["breakdown"]
        performance["load"] = evaluation.performance["settings"]
    performance["growth"] = {"policy": evaluation.policy_growth or [], "sessions": evaluation.session_growth or []}
    performance["paper_comparison"] = paper_comparison(evaluation)
    accuracy = evaluation.accuracy
    return {
        "attacks": [{k: row[k] for k in ("name", "attempts", "blocked", "detected", "baseline_blocked")}
                    for row in evaluation.attack_rows()],
        "accuracy": {"requests": accuracy.requests if accuracy else 0,
                     "mismatches": len(accuracy.mismatches) if accuracy else 0},
        "performance": performance,
    }


def _setup_summary(key: str, result: dict[str, Any]) -> dict[str, Any]:
    extra = result.get("extra", {})
    return {"label": LABELS.get(key, key), "rps": round(result["rps"], 1), "p50_ms": result["p50_ms"],
            "one_connection": extra.get("one_connection"),
            "p95_ms": result["p95_ms"], "p99_ms": result["p99_ms"], "mean_ms": round(result["mean_ms"], 3),
            "requests": result["requests"], "failures": result["non_2xx"] + result["errors"],
            "cpu_us_per_req": {**{k: round(v, 1) for k, v in (extra.get("cpu_us_per_req") or {}).items()},
                               **({"authz": round(result["authz_cpu_us_per_req"], 1)}
                                  if result.get("authz_cpu_us_per_req") else {})},
            "authz_rss_mb": extra.get("authz_rss_mb")}


def paper_comparison(evaluation: Evaluation) -> dict[str, Any]:
    ours: dict[str, Any] = {}
    if evaluation.performance:
        change = overhead(evaluation.performance["setups"]).get("zt_session", {})
        ours["response_time_pct"] = change.get("one_connection_mean_change_pct")
        ours["response_time_saturated_pct"] = change.get("mean_latency_change_pct")
        ours["rps_pct"] = change.get("rps_change_pct")
    if evaluation.accuracy:
        ours["accuracy_pct"] = evaluation.accuracy.accuracy * 100
        ours["accuracy_requests"] = evaluation.accuracy.requests
    return {"papers": PAPER, "ours": ours}


def details_json(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "quick": evaluation.quick, "policies": str(evaluation.policies), "limits": asdict(evaluation.limits),
        "broken": [{"phase": p, "error": e} for p, e in evaluation.broken],
        "accuracy": evaluation.accuracy.to_json() if evaluation.accuracy else None,
        "attacks": {"zero_trust": [asdict(r) for r in evaluation.zero_trust],
                    "baseline": [asdict(r) for r in evaluation.baseline],
                    "in_process": [asdict(r) for r in evaluation.in_process]},
        "performance": evaluation.performance,
    }


def write(out: Path, evaluation: Evaluation) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    figures = _charts(out, evaluation)
    results = results_json(evaluation)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details_json(evaluation), indent=2, default=str) + "\n")
    report = out / "report.md"
    report.write_text(_markdown(evaluation, results, figures))
    return report


def _charts(out: Path, evaluation: Evaluation) -> dict[str, str]:
    made: dict[str, str] = {}

    def chart(name: str, draw: Callable[[Path], None]) -> None:
        draw(out / name)
        made[name.removesuffix(".png")] = name

    rows = evaluation.attack_rows()
    if rows:
        chart("attacks.png", lambda p: charts.attacks(rows, p))
    if evaluation.accuracy:
        chart("accuracy.png", lambda p: charts.accuracy(evaluation.accuracy.by_kind, p))  # type: ignore[union-attr]
    if evaluation.performance:
        setups = evaluation.performance["setups"]
        chart("throughput.png", lambda p: charts.throughput(setups, LABELS, p))
        chart("latency.png", lambda p: charts.latency(setups, LABELS, p))
        chart("cpu.png", lambda p: charts.cpu(setups, LABELS, p))
        split = where_time_goes(setups, evaluation.performance["breakdown"])
        if split:
            chart("breakdown.png", lambda p: charts.breakdown(split["session_path_us"], p))
    if evaluation.policy_growth:
        chart("policy_growth.png", lambda p: charts.policy_growth(evaluation.policy_growth or [], p))
    if evaluation.session_growth:
        chart("session_growth.png", lambda p: charts.session_growth(evaluation.session_growth or [], p))
    return made


# -- markdown -------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:+.{digits}f} %"


def _commit() -> str:
    try:
        answer = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
        return answer.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _markdown(evaluation: Evaluation, results: dict[str, Any], figures: dict[str, str]) -> str:
    lines: list[str] = ["# Zero trust, measured: authz-server evaluation", ""]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(evaluation.started))
    took = (evaluation.finished or time.time()) - evaluation.started
    lines += [f"Run {when} ({'quick' if evaluation.quick else 'full'} mode, {took:.0f} s), commit {_commit()}, "
              f"{platform.node() or 'this machine'} with {_cpus(evaluation)} CPUs, policies `{evaluation.policies}`. "
              "Reproduce: `authz-server evaluate --out DIR" + (" --quick" if evaluation.quick else "") + "` "
              "(`make evaluate`). Machine-readable: [results.json](results.json) (the shape DESIGN.md fixes), "
              "[details.json](details.json) (every mismatch and attempt).", ""]
    if evaluation.broken:
        lines += ["> **Incomplete run.** These parts broke and are missing below:", ">"]
        lines += [f"> - {phase}: {error}" for phase, error in evaluation.broken]
        lines.append("")
    lines += _glance(evaluation, results)
    lines += _papers(evaluation)
    lines += _attacks_section(evaluation, figures)
    lines += _accuracy_section(evaluation, figures)
    lines += _performance_section(evaluation, results, figures)
    lines += _growth_section(evaluation, figures)
    lines += _method_section(evaluation)
    return "\n".join(lines) + "\n"


def _cpus(evaluation: Evaluation) -> str:
    import os

    return str(os.cpu_count() or "?")


def _glance(evaluation: Evaluation, results: dict[str, Any]) -> list[str]:
    lines = ["## At a glance", ""]
    rows = evaluation.attack_rows()
    if rows:
        attempts = sum(r["attempts"] for r in rows)
        blocked = sum(r["blocked"] for r in rows)
        detected = sum(r["detected"] for r in rows)
        base = sum(r["baseline_blocked"] for r in rows)
        missed = [r["name"] for r in rows if r["blocked"] < r["attempts"] or r["detected"] < r["blocked"]]
        lines.append(f"- **Attacks:** {len(rows)} scenarios, {attempts} attempts: zero trust blocked {blocked} and the "
                     f"audit evidence identified {detected}; the baseline (Envoy routing only) blocked {base}. "
                     + (f"Not fully blocked and identified: {', '.join(missed)}." if missed
                        else "Every attack blocked and identified."))
    if evaluation.accuracy:
        acc = evaluation.accuracy
        lines.append(f"- **Accuracy:** {acc.requests:,} requests, {len(acc.mismatches)} disagreements with the oracle "
                     f"({acc.accuracy * 100:.2f} % agreement)" + (" — quick mode, fewer than the full 15,000"
                                                                  if acc.quick else "") + ".")
    perf = results["performance"]
    change = perf.get("overhead_vs_baseline", {})
    if change.get("zt_session"):
        s, j = change["zt_session"], change.get("zt_jwt", {})
        lines.append(f"- **Cost:** zero trust with session ids {_pct(s['rps_change_pct'])} requests/s at saturation "
                     f"and {_pct(s['one_connection_mean_change_pct'])} response time for a request alone, against "
                     f"Envoy alone; validating the JWT on every request {_pct(j.get('rps_change_pct'))} requests/s.")
    split = perf.get("breakdown", {}).get("session_path_us")
    if split:
        total = sum(r["cpu_us"] for r in split)
        top = max(split, key=lambda r: r["cpu_us"])
        lines.append(f"- **Where the time goes:** {total:.0f} µs of CPU per request on the session path; the largest "
                     f"part is {top['part']} ({top['cpu_us']:.0f} µs, {top['cpu_us'] / total * 100:.0f} %).")
    return lines + [""]


def _papers(evaluation: Evaluation) -> list[str]:
    comparison = paper_comparison(evaluation)
    ours = comparison["ours"]
    rows = [
        ["response time, zero trust vs none", f"+{PAPER['response_time_pct']:.0f} %",
         _pct(ours.get("response_time_pct")) + " (mean, one request at a time, session ids); "
         + _pct(ours.get("response_time_saturated_pct")) + " (mean at saturation, 32 connections)"],
        ["requests/s, zero trust vs none", f"{PAPER['rps_pct']:.1f} %", _pct(ours.get("rps_pct")) + " (session ids)"],
        ["authorization accuracy", f"{PAPER['accuracy_pct']} % on {PAPER['accuracy_requests']:,} requests",
         f"{ours['accuracy_pct']:.2f} % on {ours['accuracy_requests']:,} requests" if "accuracy_pct" in ours
         else "—"],
    ]
    lines = ["## Side by side with the source papers", ""]
    lines += _table(["measure", "source papers (their zero-trust set-up)", "this run"], rows, "lll")
    lines += ["The papers measured a different stack on different hardware; what transfers is the order of "
              "magnitude. Here the baseline is a single Envoy worker proxying to an upstream that answers at "
              "once, so any per-request work shows in full; with a real service behind Envoy (milliseconds per "
              "request) the same absolute cost is a far smaller share.", ""]
    return lines


def _attacks_section(evaluation: Evaluation, figures: dict[str, str]) -> list[str]:
    if not evaluation.zero_trust:
        return []
    target = evaluation.zero_trust[0].target
    baseline = {r.name: r for r in evaluation.baseline}
    lines = ["## What it stops: the attack suite", "",
             f"Target: **{target}**; baseline: **{evaluation.baseline[0].target if evaluation.baseline else '—'}**. "
             "Blocked = the service never answered the attempt (for path tricks: never served the forbidden "
             "resource). Detected = the decision's audit record (read back from the `file:` sink) carries a code "
             "that names the attack; a TLS handshake refused by Envoy never reaches authz-server, so Envoy's "
             "`ssl.fail_verify_*` counters are its evidence.", ""]
    if "attacks" in figures:
        lines += [f"![attacks]({figures['attacks']})", ""]
    rows = []
    for r in evaluation.zero_trust:
        if not r.applicable:
            continue
        b = baseline.get(r.name)
        rows.append([r.title, r.expected, r.attempts, f"{r.blocked}/{r.attempts}", f"{r.detected}/{r.attempts}",
                     f"{b.blocked}/{b.attempts}" if b else "—", r.detected_by or "—",
                     ", ".join(f"`{c}`" for c in r.codes)])
    lines += _table(["attack", "expected (zero trust)", "attempts", "blocked", "detected", "baseline blocked",
                     "evidence", "audit codes"], rows, "llrrrrll")
    if evaluation.in_process:
        rows = [[r.title, f"{r.blocked}/{r.attempts}" if r.applicable else "n/a",
                 f"{r.detected}/{r.attempts}" if r.applicable else "n/a",
                 "; ".join(r.notes) if not r.applicable else ""]
                for r in evaluation.in_process]
        lines += ["Cross-check, the same scenarios against the decision pipeline in-process (no Envoy, no TLS: "
                  "workload certificates are taken as verified, so an unfederated workload reaches the check):", ""]
        lines += _table(["attack", "blocked", "detected", "note"], rows, "lrrl")
    lines += ["### Attempts, one by one", ""]
    for r in evaluation.zero_trust:
        if not r.applicable:
            continue
        lines += [f"**{r.title}** (`{r.name}`). " + " ".join(r.notes), ""]
        lines += [f"- {e}" for e in r.examples] + [""]
    tricks = next((r for r in evaluation.zero_trust if r.name == "path_tricks" and r.observed), None)
    if tricks is not None:
        routed = {o["sent"]: o for o in (baseline.get("path_tricks").observed if baseline.get("path_tricks") else [])}
        rows = []
        agree = 0
        for seen in tricks.observed:
            base = routed.get(seen["sent"], {})
            envoy = base.get("service_received")
            policy = seen.get("policy_saw")
            same = envoy is not None and policy is not None and envoy.split("?")[0] == policy.split("?")[0]
            agree += same
            rows.append([f"`{seen['sent']}`", f"`{envoy}`" if envoy else "—", f"`{policy}`" if policy else "—",
                         "yes" if same else "no", f"{seen['status']} {seen.get('code') or ''}".strip()])
        lines += ["### Path tricks: the policy sees the path Envoy routes on", "",
                  f"What Envoy routed each trick to (the service's view in the baseline, same Envoy settings) and the "
                  f"path in the zero-trust audit record: {agree} of {len(rows)} agree.", ""]
        lines += _table(["sent", "Envoy routed to", "policy saw", "same", "zero trust answer"], rows, "lllll")
    return lines


def _accuracy_section(evaluation: Evaluation, figures: dict[str, str]) -> list[str]:
    acc = evaluation.accuracy
    if acc is None:
        return []
    lines = ["## How sure: accuracy against an independent oracle", "",
             f"{acc.requests:,} generated requests (seed {acc.seed}" + (", quick mode: the full run sends 15,000"
                                                                       if acc.quick else "") +
             ") decided by authz-server's own pipeline (shipped policies, identity service with its session store "
             "and the dev provider's keys, signals with a rate limit, a failed sign-in budget and a threat list) and "
             "by `authz_server/evaluate/oracle.py`, a plain-Python statement of the intended access matrix written "
             "from the policy's documented intent. A mismatch is a different allow/deny, or a different denial "
             f"status (401/403/429). **{len(acc.mismatches)} mismatches, {acc.accuracy * 100:.2f} % agreement**; "
             f"answers: {', '.join(f'{k}: {v:,}' for k, v in acc.by_status.items())}.", ""]
    if "accuracy" in figures:
        lines += [f"![accuracy]({figures['accuracy']})", ""]
    rows = [[kind, c.get("requests", 0), c.get("expected_allowed", 0), c.get("mismatches", 0)]
            for kind, c in acc.by_kind.items()]
    lines += _table(["identity method / class", "requests", "allowed (oracle)", "mismatches"], rows)
    rows = [[key, c.get("requests", 0), c.get("expected_allowed", 0), c.get("mismatches", 0)]
            for key, c in acc.by_sensitivity.items()]
    lines += _table(["service / route sensitivity", "requests", "allowed (oracle)", "mismatches"], rows)
    if acc.mismatches:
        groups: dict[tuple[str, str, int, int], int] = {}
        for m in acc.mismatches:
            key = (m.kind, m.why, m.expected_status, m.got_status)
            groups[key] = groups.get(key, 0) + 1
        lines += ["### Mismatches", "", "Grouped by what the oracle said and what the pipeline answered:", ""]
        lines += _table(["class", "oracle", "expected", "pipeline", "count"],
                        [[k[0], k[1], k[2], 200 if k[3] == 200 else k[3], n] for k, n in groups.items()], "llrrr")
        lines += ["Every one (the first 100 here, all of them in details.json):", ""]
        for m in acc.mismatches[:100]:
            got = "allowed (200)" if m.got_status == 200 else f"denied {m.got_status} {m.got_code}".strip()
            want = "allow" if m.expected_allowed else f"deny {m.expected_status}"
            lines.append(f"- {m.request}: oracle **{want}** ({m.why}); pipeline **{got}**")
        lines.append("")
    return lines


def _performance_section(evaluation: Evaluation, results: dict[str, Any], figures: dict[str, str]) -> list[str]:
    perf = results["performance"]
    setups = perf.get("setups")
    if not setups:
        return []
    load = perf.get("load", {})
    lines = ["## What it costs: through real Envoy", "",
             f"wrk `-t{load.get('threads')} -c{load.get('connections')}`, {load.get('duration'):g} s per set-up after "
             f"{load.get('warmup'):g} s of warm-up, `GET /account` (frontend, medium: a verified user), one Envoy "
             "worker in front, an Envoy answering 200 behind; everything shares this machine's CPUs. CPU per request "
             "is read from /proc around the measured run.", ""]
    rows = []
    for key, s in setups.items():
        cpu = s["cpu_us_per_req"]
        alone = s.get("one_connection") or {}
        rows.append([s["label"], f"{s['rps']:,.0f}", f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['p99_ms']:.2f}",
                     f"{alone.get('p50_ms', 0):.2f}", f"{cpu.get('front_envoy', 0):.0f}",
                     f"{cpu['authz']:.0f}" if "authz" in cpu else "—",
                     f"{s['authz_rss_mb']:.0f}" if s.get("authz_rss_mb") else "—", s["failures"]])
    lines += _table(["set-up", "req/s", "p50 ms", "p95 ms", "p99 ms", "p50 ms, one connection",
                     "front Envoy CPU µs/req", "ext_authz server CPU µs/req", "authz-server RSS MB", "failures"], rows)
    for name in ("throughput", "latency", "cpu"):
        if name in figures:
            lines += [f"![{name}]({figures[name]})", ""]
    change = perf.get("overhead_vs_baseline", {})
    if change:
        rows = [[LABELS[k], _pct(v["rps_change_pct"]), _pct(v["mean_latency_change_pct"]), _pct(v["p50_change_pct"]),
                 _pct(v["p99_change_pct"]), _pct(v["one_connection_mean_change_pct"])] for k, v in change.items()]
        lines += ["Against the baseline (Envoy alone), same run:", ""]
        lines += _table(["set-up", "req/s", "mean latency", "p50", "p99", "mean latency, one connection"], rows)
    split = perf.get("breakdown", {})
    if split:
        lines += ["### Where the time goes", "",
                  "CPU per request on the zero-trust session path, split with the set-ups above (front Envoy CPU "
                  "alone and with the yardstick, the yardstick's own CPU, the session set-up with and without its "
                  "audit log) and the in-process timings (identity, cached decision).", ""]
        if "breakdown" in figures:
            lines += [f"![breakdown]({figures['breakdown']})", ""]
        lines += _table(["part", "CPU µs per request"],
                        [[r["part"], f"{r['cpu_us']:.0f}"] for r in split["session_path_us"]])
        pieces = perf.get("in_process_us", {})
        lines += [f"Validating the JWT on every request instead adds {split.get('jwt_extra_us', 0):.0f} µs per request "
                  f"(in-process, one RS256 validation costs {split.get('jwt_validate_in_process_us', 0):.0f} µs). An "
                  f"uncached decision evaluates the Rego policy: {split.get('policy_eval_uncached_us', 0):.0f} µs "
                  f"in-process; the decision cache answers repeats in "
                  f"{pieces.get('decision_us', 0):.0f} µs (identity included). Latency p50 under load (ms): "
                  + ", ".join(f"{LABELS[k]} {v:.2f}" for k, v in split.get("p50_ms", {}).items()
                              if v is not None) + ".",
                  ""]
    return lines


def _growth_section(evaluation: Evaluation, figures: dict[str, str]) -> list[str]:
    lines: list[str] = []
    if evaluation.policy_growth:
        lines += ["## Growth: bigger policies", "",
                  "In-process, decision cache off, so every decision evaluates the policy; µs per decision for a "
                  "request matching the first rule, the last rule, and none.", ""]
        if "policy_growth" in figures:
            lines += [f"![policy growth]({figures['policy_growth']})", ""]
        lines += _table(["policy", "rules", "first µs", "last µs", "no match µs", "load + compile ms"],
                        [[r["variant"], r["rules"], r["first_us"], r["last_us"], r["none_us"], r["load_ms"]]
                         for r in evaluation.policy_growth], "lrrrrr")
    if evaluation.session_growth:
        lines += ["## Growth: more sessions", "",
                  "The memory session store filled with N live sessions (each size in a process of its own); a "
                  "lookup of a random live session by the store, and the identity service's whole path from a "
                  "request's `x-session-id`." + (" Quick mode stops at 10⁵." if evaluation.quick else ""), ""]
        if "session_growth" in figures:
            lines += [f"![session growth]({figures['session_growth']})", ""]
        lines += _table(["sessions", "memory MB", "bytes per session", "store lookup µs", "identity µs", "fill s"],
                        [[f"{r['sessions']:,}", r["rss_mb"], r["bytes_per_session"], r["lookup_us"], r["resolve_us"],
                          r["fill_s"]] for r in evaluation.session_growth])
    return lines


def _method_section(evaluation: Evaluation) -> list[str]:
    limits = evaluation.limits
    return ["## How this was measured", "",
            "- Attacks: a real Envoy front proxy (`mesh/front.py`, path safety from `mesh/extauthz.py`) with a door "
            "per service — mTLS requiring a client certificate from example.org's or partner.org's CA for workloads, "
            "plain HTTP for users at frontend — and a real `authz-server serve` child (gRPC ext_authz); workload "
            "identity is the SPIFFE ID in the client's X.509-SVID (issued by the project's dev SPIFFE CA), users "
            "sign in at the dev OIDC provider. The attack world's limits: "
            f"{limits.rate:g} requests/s per identity (burst {limits.burst:g}), {limits.failure_burst:g} failed "
            f"sign-ins per source (refilling {limits.failure_rate:g}/s). Scenarios: "
            "`authz_server/evaluate/attacks.py`.",
            "- Accuracy: requests are built as the CheckRequest a sidecar rendered from the policy data sends "
            "(service and sensitivity of the matched route, the caller's SPIFFE ID and certificate) and decided "
            "in-process on simulated time; paths arrive already normalised, as Envoy hands them over. The anomaly "
            "detector is off there: it learns from the whole run's order, which no statement of intent follows.",
            f"- Performance: {'quick runs, figures move more' if evaluation.quick else 'full runs'}; compare the "
            "ratios within this run, not the absolute figures across machines. The zero-trust set-ups log every "
            "decision to a file (as the mesh does); signals are off there (a load generator is one identity, a rate "
            "limit would refuse it).",
            "- Module by module: docs/evaluation.md.", ""]
