"""Field trials: real controller and device agents over shaped links, one policy at a time.

For each scheduler and policy of the trial file, on the same workload: the controller
starts in the lab's hub namespace (pinned to the verifier's CPUs) with that scheduler and
policy; every device agent starts in its own namespace (pinned to the drafters' CPUs),
generates ``requests`` times and reports its results; the controller's timeline records
every forward and every plan. Measured goodput per device = its tokens / the wall time of
its requests; the prediction is what the controller's last plan said. Before the
policies, each drafter's speed alone is measured, so the interference of the verifier and
the other drafters can be reported. With ``baselines``, the same requests are also served
by the controller decoding for devices without drafters (``server-decode``, continuous)
and by the target alone, one request after another (``target-alone``).
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

from edge_controller.launch import (
    BIN,
    AgentSpec,
    ControllerProcess,
    LabKeys,
    controller_process,
    run_agents,
)
from edge_controller.trial.netns import LinkShape, NetworkLab, check_requirements
from edge_controller.trial.spec import ChaosEvent, TrialDevice, TrialSpec

log = logging.getLogger(__name__)

CONTROLLER_PORT = 5555  # inside the hub namespace: nothing else listens there


def run_trial(spec: TrialSpec, out: Path, on_policy=None) -> dict:
    """Run every policy of ``spec``; write ``out/<policy>/`` logs and return the report dict."""
    check_requirements()
    out.mkdir(parents=True, exist_ok=True)
    shapes = {d.name: LinkShape(d.delay_ms, d.jitter_ms, d.loss_pct, d.rate_mbit)
              for d in spec.devices}
    report: dict = {"trial": spec.name, "description": spec.description,
                    "bandwidth_hz": spec.bandwidth_hz, "policies": {}}
    with NetworkLab(shapes, wire_cpus=spec.drafter_cpus) as lab, LabKeys() as keys:
        alone = {d.name: _draft_speed_alone(lab, spec, d) for d in spec.devices}
        for scheduler in spec.schedulers:
            for policy in spec.policies:
                name = entry_name(policy, scheduler)
                log.info("trial %s: %s", spec.name, name)
                report["policies"][name] = run_policy(lab, keys, spec, policy, out / name,
                                                      scheduler)
                if on_policy is not None:
                    on_policy(name)
        if spec.baselines:
            log.info("trial %s: server-decode", spec.name)
            report["policies"][SERVER_DECODE] = run_policy(
                lab, keys, spec, "fixed", out / SERVER_DECODE, "continuous", server_decode=True)
            log.info("trial %s: target-alone", spec.name)
            report["policies"][TARGET_ALONE] = target_alone(
                lab, spec, out / TARGET_ALONE, out / SERVER_DECODE / "agents.json")
            if on_policy is not None:
                on_policy(SERVER_DECODE)
                on_policy(TARGET_ALONE)
    report["interference"] = _interference(spec, alone, report["policies"])
    if spec.temperature == 0:
        _check_lossless(spec, report["policies"], out)
    return report


SERVER_DECODE = "server-decode"
TARGET_ALONE = "target-alone"
BASELINES = (SERVER_DECODE, TARGET_ALONE)


def entry_name(policy: str, scheduler: str) -> str:
    """A report entry: the policy under sync rounds (as ever), POLICY@SCHEDULER otherwise."""
    return policy if scheduler == "sync" else f"{policy}@{scheduler}"


def run_policy(lab: NetworkLab, keys: LabKeys, spec: TrialSpec, policy: str,
               out: Path, scheduler: str = "sync", server_decode: bool = False) -> dict:
    """One entry: the controller with ``scheduler`` and ``policy``; every device drafting
    as the trial says, or (``server_decode``) without a drafter."""
    out.mkdir(parents=True, exist_ok=True)
    timeline = out / "timeline.jsonl"
    timeline.unlink(missing_ok=True)
    config = out / "controller.toml"
    config.write_text(  # JSON strings are valid TOML basic strings: paths quoted safely
        f"[server]\nround_deadline_s = {spec.round_deadline_s}\n"
        f"scheduler = {json.dumps(scheduler)}\nbatch_tokens = {spec.batch_tokens}\n"
        f"predraft_len = {spec.predraft_len}\n"
        f"timeline = {json.dumps(str(timeline))}\n"
        f"[control]\npolicy = {json.dumps(policy)}\nbandwidth_hz = {spec.bandwidth_hz}\n"
        f"acceptance = {json.dumps(spec.acceptance)}\ndraft_len = {spec.draft_len}\n"
    )
    specs = [_agent(spec, d, i, server_decode) for i, d in enumerate(spec.devices)]
    faults: list[dict] = []
    with lab_controller(lab, keys, out / "controller.log", config,
                        spec.verifier_cpus) as controller:
        started = time.time()
        with inject_faults(lab, controller, spec.chaos, started, faults):
            results = lab_agents(lab, keys, specs, spec.drafter_cpus)
    (out / "agents.json").write_text(json.dumps(results))
    events = [json.loads(line) for line in timeline.read_text().splitlines()]
    users = [_user_summary(d, runs, events, server_decode)
             for d, runs in zip(spec.devices, results, strict=True)]
    steady = steady_state(events, [d.name for d in spec.devices], spec.bandwidth_hz, policy,
                          scheduler, spec.predraft_len, spec.batch_tokens)
    summary = {
        "scheduler": scheduler,
        "goodput_tok_s": steady.get("measured_tok_s", sum(u["goodput_tok_s"] for u in users)),
        "run_goodput_tok_s": run_goodput(events),
        "predicted_goodput_tok_s": steady.get("predicted_tok_s"),
        "simulated_goodput_tok_s": steady.get("simulated_tok_s"),
        "window_s": steady.get("window_s"),
        "rounds": sum(1 for e in events if e.get("devices")),
        "verifier_busy": busy_fraction(events),
        "verifier_idle_s": idle_by_device(events),
        "users": users,
    }
    if spec.chaos:
        device_commits = commits(events, started)
        summary["chaos"] = {"started_wall": started, "faults": faults,
                            "recovery": recovery(device_commits, faults),
                            "phases": phase_goodput(device_commits, faults)}
    return summary


@contextmanager
def inject_faults(lab: NetworkLab, controller: ControllerProcess, chaos: Sequence[ChaosEvent],
                  started: float, record: list[dict]) -> Iterator[None]:
    """Inject ``chaos`` at its times (seconds after ``started``, wall clock) while the
    block runs, each fault on its own timer (they may overlap); each goes into ``record``
    with when it began and ended. Faults still on when the block ends are undone, and a
    restart in progress is waited for."""
    stop = threading.Event()
    restarting = threading.Lock()  # one restart at a time
    links = LinkFaults(lab)
    failed: list[BaseException] = []

    def at(t: float) -> bool:  # False once stopped
        return not stop.wait(max(started + t - time.time(), 0.0))

    def inject(fault: ChaosEvent) -> None:
        try:
            if not at(fault.at_s):
                return
            began = time.time() - started
            log.info("chaos at %.1f s: %s", began, fault.label)
            entry = {"kind": fault.kind, "label": fault.label, "device": fault.device,
                     "at_s": round(began, 3)}
            record.append(entry)
            if fault.kind == "restart_controller":
                with restarting:
                    controller.restart(crash=True)
                entry["ended_s"] = round(time.time() - started, 3)
                # The lab's processes die with the *thread* that spawned them (Linux's
                # parent-death signal), so this one lives as long as the new controller.
                stop.wait()
                return
            dropped = lab.counters(fault.device)["up_dropped"]
            links.start(fault)
            at(fault.at_s + fault.seconds)  # undone early when stopped
            links.end(fault)
            entry["ended_s"] = round(time.time() - started, 3)
            # What the wire dropped on the link meanwhile (a link down: nothing reaches it).
            entry["uplink_dropped"] = lab.counters(fault.device)["up_dropped"] - dropped
        except BaseException as exc:  # raised in the trial, not lost with the thread
            failed.append(exc)

    timers = [threading.Thread(target=inject, args=(f,), name=f"chaos-{i}", daemon=True)
              for i, f in enumerate(chaos)]
    for timer in timers:
        timer.start()
    try:
        yield
    finally:
        stop.set()
        for timer in timers:
            timer.join()
    if failed:
        raise RuntimeError(f"chaos: {failed[0]}") from failed[0]


class LinkFaults:
    """The link faults in force, per device: its link is down while any link_down on it
    is, loses the largest percent of the loss bursts on it, or else its own loss, and has
    the delay of its latest delay step in force, or else its own."""

    def __init__(self, lab: NetworkLab):
        self.lab = lab
        self._lock = threading.Lock()
        self._down: dict[str, int] = {}
        self._bursts: dict[str, list[float]] = {}
        self._delays: dict[str, list[float]] = {}
        self._own_loss = {name: dev.shape.loss_pct for name, dev in lab.devices.items()}
        self._own_delay = {name: dev.shape.delay_ms for name, dev in lab.devices.items()}

    def start(self, fault: ChaosEvent) -> None:
        self._apply(fault, +1)

    def end(self, fault: ChaosEvent) -> None:
        self._apply(fault, -1)

    def _apply(self, fault: ChaosEvent, step: int) -> None:
        device = fault.device
        with self._lock:
            if fault.kind == "link_down":
                before = self._down.get(device, 0)
                self._down[device] = before + step
                if (before == 0) != (before + step == 0):  # the first down, the last up
                    self.lab.set_up(device, before + step == 0)
                return
            if fault.kind == "delay_step":
                steps = self._delays.setdefault(device, [])
                if step > 0:
                    steps.append(fault.delay_ms)
                else:
                    steps.remove(fault.delay_ms)
                self.lab.set_link(device, delay_ms=steps[-1] if steps
                                  else self._own_delay[device])
                return
            bursts = self._bursts.setdefault(device, [])
            if step > 0:
                bursts.append(fault.percent)
            else:
                bursts.remove(fault.percent)
            self.lab.set_link(device, loss_pct=max(bursts, default=self._own_loss[device]))


def commits(events: list[dict], started: float) -> dict[str, list[tuple[float, int]]]:
    """Each device's committed tokens per round, at seconds after ``started`` (wall clock),
    across the controller's restarts (each ``serving`` event starts its own clock)."""
    out: dict[str, list[tuple[float, int]]] = {}
    base = None
    for event in events:
        if "serving" in event:
            base = event["wall"] - event["t"] - started
        elif "devices" in event and base is not None:
            for d in event["devices"]:
                out.setdefault(d["device"], []).append((base + event["t"], d["committed"]))
    return out


def phase_goodput(device_commits: dict[str, list[tuple[float, int]]],
                  faults: list[dict]) -> list[dict]:
    """Committed tokens per second, all devices together, between the faults' starts
    (the drift trial's before and after), while every device was generating: from the
    latest first commit to the first fault, then from each fault's start to the next
    one's, the last to the earliest last commit (a run's tail, where some devices are
    done, would mix fewer devices into one phase). Faults that start within a second of
    each other (one step on every link) start one phase."""
    lists = [device for device in device_commits.values() if device]
    if not lists:
        return []
    first, last = max(d[0][0] for d in lists), min(d[-1][0] for d in lists)
    starts: list[float] = []
    for at in sorted(f["at_s"] for f in faults if first < f["at_s"] < last):
        if not starts or at - starts[-1] >= 1.0:
            starts.append(at)
    bounds = [first, *starts, last] if first < last else []
    phases = []
    for start, end in itertools.pairwise(bounds):
        tokens = sum(n for device in device_commits.values() for t, n in device
                     if start < t <= end)
        phases.append({"start_s": round(start, 3), "end_s": round(end, 3),
                       "goodput_tok_s": tokens / (end - start)})
    return phases


def recovery(device_commits: dict[str, list[tuple[float, int]]],
             faults: list[dict]) -> list[dict]:
    """Per fault and device: the longest stretch without a commit that overlaps the fault
    (the dip), and how long after the fault ended the device committed again."""
    rows = []
    for fault in faults:
        start, end = fault["at_s"], fault.get("ended_s", fault["at_s"])
        for device, series in device_commits.items():
            times = [t for t, _ in series]
            before = [t for t in times if t <= start]
            after = [t for t in times if t >= end]
            if not before or not after:
                continue  # not generating across this fault
            inside = [before[-1], *[t for t in times if start < t < end], after[0]]
            rows.append({"fault": fault["label"], "device": device,
                         "longest_gap_s": round(max(b - a for a, b in pairwise(inside)), 3),
                         "recovered_after_s": round(after[0] - end, 3)})
    return rows


@contextmanager
def lab_controller(lab: NetworkLab, keys: LabKeys, log_path: Path, config: Path,
                   cpus: Sequence[int]) -> Iterator[ControllerProcess]:
    """``edge-controller start --keys ... --config CONFIG`` in the lab's hub namespace, on
    ``cpus``, listening on CONTROLLER_PORT, until the block ends."""
    def hub(argv, **kw):
        return lab.spawn(None, argv, cpus=cpus, **kw)

    with controller_process(log_path, keys, "--config", str(config),
                            endpoint=f"tcp://0.0.0.0:{CONTROLLER_PORT}", spawn=hub) as controller:
        yield controller


def lab_agents(lab: NetworkLab, keys: LabKeys, specs: Sequence[AgentSpec],
               cpus: Sequence[int]) -> list[list[dict]]:
    """Run the agents at once, each in its device's namespace on ``cpus`` with its keys,
    dialling the hub."""
    def spawn(agent: AgentSpec):
        return lambda argv, **kw: lab.spawn(agent.device_id, argv, cpus=cpus, **kw)

    return run_agents(lambda a: lab.endpoint(a.device_id, CONTROLLER_PORT), specs, keys,
                      spawn=spawn)


def replay_decisions(events: list[dict]) -> list[tuple[int, dict, dict]]:
    """(event index, every device's decision in force, the plan event) after each plan."""
    decisions: dict[str, dict] = {}
    out = []
    for i, event in enumerate(events):
        if "plan" in event:
            decisions = {**decisions, **event["plan"]}
            out.append((i, dict(decisions), event))
    return out


_SIMULATED_ROUNDS = 2000  # of the last plan, to score it in the simulator


def steady_state(events: list[dict], devices: list[str], bandwidth_hz: float,
                 policy: str, scheduler: str = "sync", predraft_len: int = 16,
                 batch_tokens: int = 256) -> dict:
    """Goodput while every device was generating, measured and as the model predicts it
    (the model of ``scheduler``'s serving: the controller plans with it).

    The window runs from the first round by which every device had been in a round to the
    first device's last round. Measured: committed tokens of the rounds in it / its length
    (prefills and gaps between requests included). Predicted: the plans in force, weighted
    by time, where every device took part in the plan with every estimate measured (over
    the part of the window such a plan was in force).
    Simulated: the simulator run on the last such plan with the estimates it was made from.
    """
    from edge_controller.control import evaluate
    from edge_controller.draft_control import problem_from_snapshot
    from edge_controller.simulator import simulate_plan

    rounds = [e for e in events if "devices" in e]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for event in rounds:
        for d in event["devices"]:
            first.setdefault(d["device"], event["t"])
            last[d["device"]] = event["t"]
    if set(first) != set(devices):
        return {}
    start, end = max(first.values()), min(last.values())
    window = [e for e in rounds if start < e["t"] <= end]
    if end <= start or not window:
        return {}
    result = {"window_s": end - start, "measured_tok_s": sum(
        d["committed"] for e in window for d in e["devices"]) / (end - start)}
    plans = [(event["t"], decisions, event) for _, decisions, event in replay_decisions(events)
             if event["t"] <= end and set(event["estimates"]) == set(devices)
             and set(decisions) >= set(devices) and all(
                 value is not None for e in event["estimates"].values() for value in e.values())]
    if not plans:
        return result
    weighted = covered = 0.0  # over the part of the window a full plan was in force
    for (t, _, event), t_next in zip(plans, [p[0] for p in plans[1:]] + [end], strict=True):
        span = max(min(t_next, end) - max(t, start), 0)
        weighted += event["predicted_goodput_tok_s"] * span
        covered += span
    _, decisions, event = plans[-1]
    result["predicted_tok_s"] = (weighted / covered if covered
                                 else event["predicted_goodput_tok_s"])
    system, users = problem_from_snapshot(event["estimates"], event["verify_time"], bandwidth_hz,
                                          max_delay_s=event.get("max_delay_s", float("inf")))
    ids = sorted(devices)
    plan = evaluate(policy, system, users, [decisions[i]["draft_len"] for i in ids],
                    [decisions[i]["bandwidth_share"] for i in ids])
    if plan.round_time_s < float("inf"):
        seconds = _SIMULATED_ROUNDS * plan.round_time_s
        result["simulated_tok_s"] = simulate_plan(
            system, users, plan, seconds, scheduler=scheduler, predraft_len=predraft_len,
            batch_tokens=batch_tokens).goodput_tok_s
    return result


def run_goodput(events: list[dict]) -> float | None:
    """All committed tokens over the whole run: from the first forward's start to the last
    one's end (requests of every device, start-up and tails included)."""
    forwards = [e for e in events if e.get("devices")]
    if not forwards:
        return None
    span = max(e["started"] + e["verify_s"] for e in forwards) - min(
        e["started"] for e in forwards)
    tokens = sum(d["committed"] for e in forwards for d in e["devices"])
    return tokens / span if span > 0 else None


def busy_fraction(events: list[dict]) -> float | None:
    """The verifier's busy fraction: time in forwards (verification and prompt chunks)
    over the time from the first forward's start to the last one's end."""
    forwards = [(e["started"], e.get("verify_s", e.get("prefill_s", 0.0))) for e in events
                if "started" in e]
    if not forwards:
        return None
    span = max(s + d for s, d in forwards) - min(s for s, _ in forwards)
    return sum(d for _, d in forwards) / span if span > 0 else None


def idle_by_device(events: list[dict]) -> dict[str, float]:
    """Where the verifier's idle time goes: each gap between forwards, charged to the draft
    that ended it (the last to arrive of the next forward's), or to a prompt chunk."""
    forwards = sorted((e for e in events if "started" in e), key=lambda e: e["started"])
    idle: dict[str, float] = {}
    for before, after in pairwise(forwards):
        gap = after["started"] - before["started"] - before.get(
            "verify_s", before.get("prefill_s", 0.0))
        if gap > 0:
            who = (min(after["devices"], key=lambda d: d["waited_s"])["device"]
                   if after.get("devices") else "prompt chunk")
            idle[who] = idle.get(who, 0.0) + gap
    return {who: round(s, 3) for who, s in sorted(idle.items(), key=lambda kv: -kv[1])}


def time_per_token(device: str, runs: list[dict], events: list[dict]) -> list[float]:
    """Seconds per token as the device received them: for each verdict but the first of
    each request, the time since the verdict before over the tokens it carried (each of
    its tokens counted once)."""
    rounds = [(e["t"], d["committed"]) for e in events if e.get("devices")
              for d in e["devices"] if d["device"] == device]
    per_request = [r["stats"]["rounds"] for r in runs]
    if sum(per_request) != len(rounds):  # a resumed request's rounds: no clean split
        per_request = [len(rounds)]
    out, i = [], 0
    for count in per_request:
        request = rounds[i:i + count]
        i += count
        for (before, _), (at, committed) in pairwise(request):
            if committed:
                out += [(at - before) / committed] * committed
    return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def target_alone(lab: NetworkLab, spec: TrialSpec, out: Path, agents_json: Path) -> dict:
    """The target alone, on the verifier's CPUs, serving the same requests (the devices'
    own prompt tokens, from ``agents_json``) one after another: what a user without this
    system runs. Goodput = all tokens / all the time."""
    out.mkdir(parents=True, exist_ok=True)
    runs = json.loads(agents_json.read_text())
    requests = [[run["prompt_tokens"], spec.max_new_tokens] for device in runs for run in device]
    job = out / "requests.json"
    job.write_text(json.dumps({"requests": requests, "temperature": spec.temperature}))
    proc = lab.spawn(None, [str(BIN / "python"), "-m", "edge_controller.trial.alone",
                            str(job)], cpus=spec.verifier_cpus, stdout=subprocess.PIPE,
                     text=True)
    stdout, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"target alone failed ({proc.returncode})")
    (out / "alone.json").write_text(stdout)
    measured = json.loads(stdout)["requests"]
    users, k = [], 0
    for device, device_runs in zip(spec.devices, runs, strict=True):
        mine = measured[k:k + len(device_runs)]
        k += len(device_runs)
        tokens = sum(m["tokens"] for m in mine)
        seconds = sum(m["seconds"] for m in mine)
        # As for the devices: the time between tokens, the first of each request (its
        # prompt) left out.
        per_token = [b - a for m in mine for a, b in pairwise(m["token_times"])]
        users.append({"name": device.name, "draft": "-", "tokens": tokens,
                      "goodput_tok_s": tokens / seconds, "acceptance_rate": 0.0,
                      "mean_draft_len": 0.0, "mean_share": 0.0, "draft_tokens_per_s": 0.0,
                      "time_per_token_p50_s": _percentile(per_token, 0.5),
                      "time_per_token_p95_s": _percentile(per_token, 0.95)})
    total = sum(m["seconds"] for m in measured)
    goodput = sum(m["tokens"] for m in measured) / total
    # Busy: the target computes all the time it serves (generate's own overheads are
    # counted as work here, as they would be on the edge box).
    return {"scheduler": "-", "goodput_tok_s": goodput, "run_goodput_tok_s": goodput,
            "predicted_goodput_tok_s": None, "simulated_goodput_tok_s": None,
            "window_s": total, "rounds": 0, "verifier_busy": 1.0, "users": users}


def _agent(spec: TrialSpec, device: TrialDevice, index: int,
           server_decode: bool = False) -> AgentSpec:
    # A long --timeout: a busy 2-core host must not look like a lost link. Lost links and
    # restarts are still noticed at once (heartbeats, closed connections) and resumed.
    extra = ("--draft-pace", str(device.draft_pace_s),
             "--spectral-efficiency", str(device.spectral_efficiency),
             "--temperature", str(spec.temperature), "--seed", str(index),
             "--draft-top-k", str(spec.draft_top_k), "--timeout", "300",
             "--resume-timeout", "120")
    return AgentSpec(device.name, "none" if server_decode else device.draft, device.prompt,
                     spec.max_new_tokens, extra, spec.requests)


def _user_summary(device: TrialDevice, runs: list[dict], events: list[dict],
                  server_decode: bool = False) -> dict:
    tokens = sum(len(r["tokens"]) for r in runs)
    seconds = sum(len(r["tokens"]) / r["stats"]["tokens_per_s"] for r in runs)
    drafted = sum(r["stats"]["drafted"] for r in runs)
    accepted = sum(r["stats"]["accepted"] for r in runs)
    rounds = [d for e in events if "devices" in e for d in e["devices"]
              if d["device"] == device.name]
    per_token = time_per_token(device.name, runs, events)
    summary = {
        "name": device.name, "draft": "none" if server_decode else device.draft,
        "tokens": tokens,
        "time_per_token_p50_s": _percentile(per_token, 0.5),
        "time_per_token_p95_s": _percentile(per_token, 0.95),
        "goodput_tok_s": tokens / seconds,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_draft_len": sum(d["draft_len"] for d in rounds) / max(len(rounds), 1),
        "mean_share": sum(d["share"] or 0.0 for d in rounds) / max(len(rounds), 1),
        "draft_tokens_per_s": sum(r["stats"]["draft_tokens_per_s"] for r in runs) / len(runs),
    }
    guesses = sum(r["stats"].get("predraft_rounds", 0) for r in runs)
    if guesses:
        predrafted = sum(r["stats"]["predrafted"] for r in runs)
        wasted = sum(r["stats"]["predraft_wasted"] for r in runs)
        summary["predraft"] = {
            "rounds": guesses, "cut": sum(r["stats"]["predraft_cut"] for r in runs),
            "paid": sum(r["stats"]["predraft_paid"] for r in runs),
            "pay_rate": sum(r["stats"]["predraft_paid"] for r in runs) / guesses,
            "drafted": predrafted, "used": sum(r["stats"]["predraft_used"] for r in runs),
            "wasted": wasted, "wasted_share": wasted / predrafted if predrafted else 0.0,
        }
    return summary


def _check_lossless(spec: TrialSpec, policies: dict, out: Path) -> None:
    """Greedy trials: every run of every device against the target alone (each user's
    ``lossless``: true, or what differs); near ties are tolerated as DESIGN.md says."""
    from models import ensure
    from models.target import greedy_mismatch, load_target

    target = load_target(ensure().target_gguf)
    references: dict[str, tuple[str | None, str | None]] = {}
    for policy, summary in policies.items():
        if policy == TARGET_ALONE:  # the reference itself
            continue
        runs = json.loads((out / policy / "agents.json").read_text())
        for user, device_runs in zip(summary["users"], runs, strict=True):
            problems = []
            for run in device_runs:
                key = json.dumps([run["prompt_tokens"], run["tokens"]])
                if key not in references:
                    references[key] = greedy_mismatch(target, run["prompt_tokens"],
                                                      run["tokens"], spec.max_new_tokens)
                problems += [p for p in references[key][:1] if p]
            user["lossless"] = not problems
            if problems:
                user["lossless_problem"] = problems[0]
                log.error("%s / %s: output differs from the target's: %s", policy,
                          user["name"], problems[0])


def _draft_speed_alone(lab: NetworkLab, spec: TrialSpec, device: TrialDevice) -> float:
    """Draft tokens/s of this device's drafter with nothing else running, on its CPUs."""
    proc = lab.spawn(device.name, [str(BIN / "device-agent"), "bench", "--draft", device.draft,
                                   "--draft-pace", str(device.draft_pace_s), "--json"],
                     cpus=spec.drafter_cpus, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{device.name}: draft benchmark failed ({proc.returncode})")
    return json.loads(out)["draft_tokens_per_s"]


def _interference(spec: TrialSpec, alone: dict[str, float], policies: dict) -> dict:
    """Draft speed in the trial relative to alone: what sharing the host cost each drafter."""
    rows = {}
    for d in spec.devices:
        during = {name: u["draft_tokens_per_s"] for name, p in policies.items()
                  if name not in BASELINES for u in p["users"] if u["name"] == d.name}
        mean = sum(during.values()) / len(during)
        rows[d.name] = {"alone_tok_s": alone[d.name], "in_trial_tok_s": mean,
                        "slowdown": alone[d.name] / mean if mean else float("inf"),
                        "by_entry_tok_s": during}
    return rows
