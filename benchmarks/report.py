"""Medians over runs, ratios imgbackup vs each peer from the same runs, the issue's targets, a Markdown table."""

from __future__ import annotations

import statistics
from collections import defaultdict

IMGB, IMGB_CBT = "imgbackup", "imgbackup --changed-blocks"
CEILINGS = ("cat (ceiling)", "read used blocks (ceiling)", "true change (zstd -3 of changed blocks)")
MiB = 1 << 20


def summarize(records: list[dict]) -> dict:
    """Medians per (disk, tool, step), ratios on every disk, and the targets on the 4 GiB disk.

    Records of the command-level measurements (``disk`` = "mount" / "list") give their medians as extras.
    """
    extra = {}
    for key, disk, field in (("mount_ratio", "mount", "ratio"), ("list_above_kdf_s", "list", "above_kdf_s"),
                             ("list_above_kdf_wall_s", "list", "above_kdf_wall_s")):
        vals = [r[field] for r in records if r.get("disk") == disk and r.get("ok") and field in r
                and (disk != "list" or "kdf_cpu_s" in r)]   # earlier list records were wall-based
        if vals:
            extra[key] = statistics.median(vals)
            extra[key + "_runs"] = [round(v, 3) for v in vals]
    records = [r for r in records if r.get("disk") not in ("mount", "list")]
    groups: dict = defaultdict(list)
    for r in records:
        groups[(r["disk"], r["tool"], r["step"])].append(r)
    med: dict = defaultdict(lambda: defaultdict(dict))
    for (disk, tool, step), rs in groups.items():
        good = [r for r in rs if r["ok"]]    # a failed step's numbers are not a measurement (no PASS from a 0)
        m = {k: statistics.median(r[k] for r in good) if good else None for k in ("wall_s", "cpu_s", "rss_mib")}
        for k in ("stored", "added"):
            if good and k in good[0]:
                m[k] = statistics.median(r[k] for r in good)
        m["runs"] = len(rs)
        m["failed"] = sum(not r["ok"] for r in rs)
        checks = sorted({r["check"] for r in rs if "check" in r})
        if checks:
            m["check"] = ", ".join(checks)
        med[disk][tool][step] = m
    med = {d: dict(t) for d, t in med.items()}
    return {"medians": med, "ratios": ratios(med), "targets": targets(med, extra), "extra": extra}


def _get(med: dict, disk: str, tool: str, step: str, key: str = "wall_s") -> float | None:
    return med.get(disk, {}).get(tool, {}).get(step, {}).get(key)


def ratios(med: dict) -> dict:
    """peer wall / imgbackup wall per step: above 1 means imgbackup was faster."""
    out: dict = {}
    for disk, tools in med.items():
        for peer in tools:
            if peer.startswith(IMGB) or peer in CEILINGS[1:]:
                continue
            for key, mine_tool, step in (("full", IMGB, "full"), ("second", IMGB, "second"),
                                         ("second_changes", IMGB_CBT, "second"), ("restore", IMGB, "restore")):
                mine, theirs = _get(med, disk, mine_tool, step), _get(med, disk, peer, step)
                if mine and theirs:
                    out.setdefault(disk, {}).setdefault(peer, {})[key] = round(theirs / mine, 2)
    return out


def _target(name: str, value: float | None, goal: float, higher_is_better: bool = True) -> dict:
    if value is None:
        return {"target": name, "value": None, "goal": goal, "result": "N/A"}
    ok = value >= goal if higher_is_better else value <= goal
    return {"target": name, "value": round(value, 2), "goal": goal, "result": "PASS" if ok else "FAIL"}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


READ_USED, TRUE_CHANGE = "read used blocks (ceiling)", "true change (zstd -3 of changed blocks)"


def targets(med: dict, extra: dict | None = None) -> list[dict]:
    """Issue 11's targets, then issue 4's, on the 4 GiB disk (RSS also on the 1 TiB one), PASS/FAIL."""
    return targets11(med, extra or {}) + targets4(med)


def targets11(med: dict, extra: dict) -> list[dict]:
    d = "disk4g"
    g = lambda tool, step, key="wall_s": _get(med, d, tool, step, key)  # noqa: E731
    rss = [s["rss_mib"] for t in (IMGB, IMGB_CBT) for s in med.get(d, {}).get(t, {}).values() if s.get("rss_mib")]
    rss1t = [s["rss_mib"] for s in med.get("sparse1t", {}).get(IMGB, {}).values() if s.get("rss_mib")]
    out = [
        _target("full: imgbackup / cat of the whole disk, wall <= 1.5", _div(g(IMGB, "full"), g("cat (ceiling)", "full")),
                1.5, False),
        _target("full: partclone|zstd / imgbackup wall >= 3x", _div(g("partclone|zstd", "full"), g(IMGB, "full")), 3),
        _target("full: stored imgbackup / partclone|zstd <= 1", _div(g(IMGB, "full", "stored"),
                g("partclone|zstd", "full", "stored")), 1, False),
        _target("second: added imgbackup / true change <= 1.3", _div(g(IMGB, "second", "added"),
                g(TRUE_CHANGE, "second", "added")), 1.3, False),
        _target("second by hash: imgbackup / read of the used blocks, wall <= 1.2",
                _div(g(IMGB, "second"), g(READ_USED, "second")), 1.2, False),
        _target("mount: hashing every file, mounted / original <= 1.5", extra.get("mount_ratio"), 1.5, False),
        _target("list on a small repository, CPU-s above the KDF <= 0.15", extra.get("list_above_kdf_s"), 0.15, False),
        _target("peak RSS on 4 GiB disk (MiB) <= 150", max(rss) if rss else None, 150, False),
        _target("peak RSS on 1 TiB sparse disk (MiB) <= 300", max(rss1t) if rss1t else None, 300, False),
    ]
    for t in out:
        t["issue"] = 11
    return out


def targets4(med: dict) -> list[dict]:
    """Issue 4's targets (kept for comparison with earlier runs)."""
    d = "disk4g"
    g = lambda tool, step, key="wall_s": _get(med, d, tool, step, key)  # noqa: E731
    peers = [t for t in med.get(d, {}) if not t.startswith(IMGB) and t not in CEILINGS]
    restores = [g(p, "restore") for p in peers if g(p, "restore")]
    out = [
        _target("full: borg / imgbackup wall >= 4x", _div(g("borg", "full"), g(IMGB, "full")), 4),
        _target("full: partclone|zstd / imgbackup wall >= 3x", _div(g("partclone|zstd", "full"), g(IMGB, "full")), 3),
        _target("full: stored imgbackup / partclone|zstd <= 1", _div(g(IMGB, "full", "stored"),
                g("partclone|zstd", "full", "stored")), 1, False),
        _target("second by hash: borg / imgbackup wall >= 5x", _div(g("borg", "second"), g(IMGB, "second")), 5),
        _target("second with change list: borg / imgbackup wall >= 15x",
                _div(g("borg", "second"), g(IMGB_CBT, "second")), 15),
        _target("second: added imgbackup / restic <= 1", _div(g(IMGB, "second", "added"),
                g("restic --stdin", "second", "added")), 1, False),
        _target("restore: borg / imgbackup wall >= 3x", _div(g("borg", "restore"), g(IMGB, "restore")), 3),
        _target("restore: restic / imgbackup wall >= 3x", _div(g("restic --stdin", "restore"), g(IMGB, "restore")), 3),
        _target("restore: fastest peer / imgbackup wall >= 1", _div(min(restores) if restores else None,
                g(IMGB, "restore")), 1),
    ]
    for t in out:
        t["issue"] = 4
    return out


def _md(text: str) -> str:
    """A table cell: the pipe in 'partclone|zstd' would end the cell."""
    return text.replace("|", "\\|")


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v / MiB:,.0f}"


def _s(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def markdown(summary: dict, meta: dict) -> str:
    """One table per disk (medians), the ratios, then the targets with PASS/FAIL."""
    lines = [f"Benchmark {meta['started']}: {meta['runs']} run(s), medians, cold cache, {meta['cpus']} CPUs, "
             f"kernel {meta['kernel']}", ""]
    for disk, tools in summary["medians"].items():
        lines += [f"### {disk}", "",
                  "| tool | full s | full CPU s | full RSS MiB | stored MiB | 2nd s | 2nd CPU s | added MiB "
                  "| restore s | restore CPU s | restore RSS MiB | restore check |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for tool, st in tools.items():
            f, s, r = st.get("full", {}), st.get("second", {}), st.get("restore", {})
            fails = sum(x.get("failed", 0) for x in st.values())
            flag = f" (**{fails} failed**)" if fails else ""
            lines.append(
                f"| {_md(tool)}{flag} | {_s(f.get('wall_s'))} | {_s(f.get('cpu_s'))} "
                f"| {_s(f.get('rss_mib'))} | {_mib(f.get('stored'))} | {_s(s.get('wall_s'))} | {_s(s.get('cpu_s'))} "
                f"| {_mib(s.get('added'))} | {_s(r.get('wall_s'))} | {_s(r.get('cpu_s'))} | {_s(r.get('rss_mib'))} "
                f"| {r.get('check', '')} |")
        rat = summary["ratios"].get(disk, {})
        if rat:
            lines += ["", "peer wall / imgbackup wall (above 1: imgbackup faster):", "",
                      "| peer | full | second | second (imgbackup with change list) | restore |",
                      "|---|---:|---:|---:|---:|"]
            for peer, x in rat.items():
                lines.append(f"| {_md(peer)} | {x.get('full', '')} | {x.get('second', '')} | {x.get('second_changes', '')} "
                             f"| {x.get('restore', '')} |")
        lines.append("")
    extra = summary.get("extra", {})
    if extra:
        lines += ["Command-level (medians): "
                  + "; ".join(f"{k} {v}" for k, v in extra.items() if not k.endswith("_runs"))
                  + " — runs: " + "; ".join(f"{k} {v}" for k, v in extra.items() if k.endswith("_runs")), ""]
    for issue in (11, 4):
        lines += [f"### Targets (issue {issue})", "", "| target | measured | result |", "|---|---:|---|"]
        for t in summary["targets"]:
            if t.get("issue", 4) == issue:
                lines.append(f"| {_md(t['target'])} | {'' if t['value'] is None else t['value']} | {t['result']} |")
        lines.append("")
    return "\n".join(lines)
