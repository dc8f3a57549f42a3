"""``edge-controller status``: the live per-device table, read from the metrics endpoint."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections import defaultdict

COLUMNS = [  # (metric suffix, header, format)
    ("draft_len", "L", "{:>3.0f}"),
    ("bandwidth_share", "share", "{:>6.3f}"),
    ("stop_confidence", "h", "{:>4.1f}"),
    ("acceptance", "accept", "{:>6.2f}"),
    ("draft_s_per_token", "draft ms/tok", "{:>12.1f}"),
    ("delay_s", "delay ms", "{:>8.1f}"),
    ("rtt_s", "rtt ms", "{:>6.1f}"),
    ("goodput_tok_s", "goodput tok/s", "{:>13.2f}"),
]
SCALE = {"draft_s_per_token": 1e3, "delay_s": 1e3, "rtt_s": 1e3}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="print the live per-device table of a running controller",
                       description="Read a running controller's Prometheus metrics (start it "
                       "with --metrics-port) and print one row per device.")
    p.add_argument("--metrics", default="http://127.0.0.1:9100/metrics",
                   help="the controller's metrics URL (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(args.metrics, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        print(f"edge-controller: cannot read {args.metrics}: {exc} (is the controller running "
              "with --metrics-port?)", file=sys.stderr)
        return 1
    print(render(text))
    return 0


def render(text: str) -> str:
    """The table of a Prometheus text exposition of ControllerMetrics."""
    from prometheus_client.parser import text_string_to_metric_families

    devices: dict[str, dict[str, float]] = defaultdict(dict)
    arms: dict[str, dict[int, float]] = defaultdict(dict)  # online policies' plays
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("multispin_")
            if name == "device_online_plays":
                arms[sample.labels["device"]][int(sample.labels["draft_len"])] = sample.value
            elif "device" in sample.labels:
                devices[sample.labels["device"]][name.removeprefix("device_")] = sample.value
            else:
                totals[name] = sample.value
    header = f"{'device':<20} " + " ".join(h for _, h, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for device in sorted(devices):
        values = devices[device]
        cells = [fmt.format(values.get(key, float("nan")) * SCALE.get(key, 1))
                 for key, _, fmt in COLUMNS]
        lines.append(f"{device:<20} " + " ".join(cells))
    lines.append(f"{len(devices)} devices, {totals.get('round_seconds_count', 0):.0f} rounds, "
                 f"plan predicts {totals.get('plan_goodput_tok_s', 0):.2f} tok/s")
    if arms:
        lines.append("online: rounds per draft length (L x rounds)")
        lines += [f"  {device:<20} " + " ".join(f"{arm}x{n:.0f}" for arm, n in
                                                 sorted(arms[device].items()))
                  for device in sorted(arms)]
    return "\n".join(lines)
