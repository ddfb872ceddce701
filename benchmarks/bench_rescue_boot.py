"""Where a rescue-media boot's time goes under QEMU TCG (issue 17's time targets), run by hand as root.

Boots each ISO given (side by side, so every one sees the same host load: under TCG everything is
CPU-bound and scales with the load) in the guest lab's shell mode, and reads the times from inside
the guest — seconds since its kernel started — rather than from the wall clock: the initramfs's own
stamped lines, dmesg, ``systemd-analyze``, when udev's coldplug drained, and how long ``imgbackup``
commands take to start there. Prints a Markdown table on stdout and writes the raw numbers to
``benchmarks/results/rescue-boot-TIMESTAMP.json``.

    .venv/bin/python benchmarks/bench_rescue_boot.py OLD.iso NEW.iso
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # tests/guestlab.py: the one way this project boots a guest

from guestlab import Disk, Guest  # noqa: E402

# Each probe: a name and a shell (bash) command printing one number (seconds) as its last line.
TIMED = "TIMEFORMAT=%R; {{ time {} >/dev/null 2>&1; }} 2>&1"
PROBES = (
    ("shell_ready_s", "cut -d' ' -f1 /proc/uptime"),
    ("udev_settled_s", "udevadm settle --timeout=300; cut -d' ' -f1 /proc/uptime"),
    ("python_start_s", TIMED.format("python3 -c pass")),
    ("imgbackup_devices_s", TIMED.format("imgbackup devices")),
    ("imgbackup_help_s", TIMED.format("imgbackup --help")),
)
STEPS = ("run_init_s", "medium_search_s", "systemd_start_s", "multi_user_s")


def _number(text: str) -> float | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    try:
        return float(lines[-1]) if lines else None
    except ValueError:
        return None


def _boot_steps(g: Guest) -> dict[str, float | None]:
    """Kernel to /init, the initramfs's medium search, systemd's start, multi-user (guest seconds)."""
    dmesg = g.run("dmesg", 120).output
    console = g.console
    found = {
        "run_init_s": re.search(r"\[\s*([\d.]+)\] Run /init", dmesg),
        "medium_search_s": re.search(r"imgbackup: \[([\d.]+) s\] looking for the rescue medium", console),
        "systemd_start_s": re.search(r"\[\s*([\d.]+)\] systemd\[1\]: systemd \d+", dmesg),
    }
    steps = {k: float(m.group(1)) if m else None for k, m in found.items()}
    analyze = g.run("SYSTEMD_COLORS=0 systemd-analyze", 120).output
    kernel = re.search(r"in (.+?) \(kernel\)", analyze)
    multi = re.search(r"graphical.target reached after (.+?) in userspace", analyze)
    steps["multi_user_s"] = _timespan(kernel.group(1)) + _timespan(multi.group(1)) if kernel and multi else None
    return steps


def _timespan(text: str) -> float:
    """systemd's '1min 2.5s', '785ms', '36.8s' in seconds."""
    scale = {"min": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[unit] for n, unit in re.findall(r"([\d.]+)(min|ms|s)\b", text))


def measure(iso: Path, work: Path, results: dict, key: str, ready: threading.Barrier) -> None:
    """One lab boot of ``iso``: every probe and boot step into ``results[key]``. The command probes
    start when every guest is booted and settled (``ready``), so no guest times a start while
    another is still booting beside it."""
    try:
        _measure(iso, work, results, key, ready)
    except BaseException:
        ready.abort()           # the other guests do not wait for this one
        raise


def _measure(iso: Path, work: Path, results: dict, key: str, ready: threading.Barrier) -> None:
    work.mkdir(parents=True, exist_ok=True)
    disk = work / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    start = time.monotonic()
    row: dict = {"iso": str(iso), "load_at_start": os.getloadavg()[0]}
    with Guest(iso, work / "guest", [Disk(disk, serial="BENCH01")], append="imgbackup.action=shell",
               lab_shell=True) as g:
        try:
            row["host_shell_s"] = round(g.wait_shell(600), 1)
            for name, command in PROBES[:2]:
                row[name] = _number(g.run(command, 600).output)
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.wait()
        for name, command in PROBES[2:]:
            row[name] = _number(g.run(command, 600).output)
        row.update(_boot_steps(g))
    row["host_total_s"] = round(time.monotonic() - start, 1)
    row["load_at_end"] = os.getloadavg()[0]
    results[key] = row


def table(results: dict) -> str:
    keys = list(results)
    names = ["load_at_start", *STEPS, *(n for n, _ in PROBES), "host_shell_s", "host_total_s"]
    lines = ["| guest seconds | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in names:
        cells = [results[k].get(name) for k in keys]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("isos", nargs="+", type=Path)
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="rescue-boot-") as tmp:
        ready = threading.Barrier(len(args.isos))
        threads = [threading.Thread(target=measure, args=(iso.resolve(), Path(tmp) / f"b{i}", results,
                                                          f"{i}:{iso.name}", ready))
                   for i, iso in enumerate(args.isos)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(table(results))
    out = HERE / "results" / time.strftime("rescue-boot-%Y%m%dT%H%M%S.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"raw numbers: {out}", file=sys.stderr)
    missing = len(args.isos) - len(results)
    if missing:
        print(f"{missing} boot(s) failed: see the traceback above", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
