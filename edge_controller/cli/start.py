"""``edge-controller start``: load the target, serve devices until Ctrl-C."""

from __future__ import annotations

import argparse
import errno
import logging
import resource
import signal
import sys
import threading
from typing import TYPE_CHECKING

from edge_controller.config import ACCEPTANCE_MODELS

if TYPE_CHECKING:
    from edge_controller.config import ControllerConfig
    from edge_controller.controller import EdgeController
    from edge_controller.transport import Transport

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "start", help="serve devices: verify their drafts with the target model",
        description="Load the target model and serve device agents until Ctrl-C.",
    )
    p.add_argument("--config", default=None, help="controller TOML (default: built-in defaults; "
                   "see configs/controller.toml)")
    p.add_argument("--bind", help="ZeroMQ endpoint to bind, e.g. tcp://0.0.0.0:5555 "
                   "(overrides server.bind)")
    p.add_argument("--target-gguf", help="target GGUF file (overrides target.model)")
    p.add_argument("--draft-len", type=int, help="first / fixed draft length "
                   "(overrides control.draft_len)")
    p.add_argument("--policy", help="draft control policy (overrides control.policy): fixed, "
                   "heterogeneous, homogeneous, threshold, agnostic, equal-best-L, fixed-L, "
                   "per-user-L, online, online-naive, online-discounted, online-contextual, "
                   "confidence (caps and per-device stopping thresholds; "
                   "docs/system-model.md)")
    p.add_argument("--acceptance", choices=ACCEPTANCE_MODELS,
                   help="acceptance model the plans assume: one rate per device, or the "
                   "measured per-position curve (overrides control.acceptance)")
    p.add_argument("--scheduler", choices=("sync", "continuous", "proactive"),
                   help="sync: rounds wait for every device's draft (or the deadline); "
                   "continuous: verify whatever drafts are in whenever the verifier is free; "
                   "proactive: continuous, and devices draft on while their draft is "
                   "verified (overrides server.scheduler; docs/scheduling.md)")
    p.add_argument("--batch-tokens", type=int, metavar="N",
                   help="continuous: at most N tokens per forward (overrides "
                   "server.batch_tokens)")
    p.add_argument("--predraft-len", type=int, metavar="N",
                   help="proactive: a device drafts at most N tokens past its upload "
                   "(overrides server.predraft_len)")
    p.add_argument("--keys", metavar="DIR", help="CURVE keys and device allowlist made with "
                   "`edge-controller keys` (overrides security.keys_dir); required unless "
                   "--insecure")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="plain TCP: no encryption, no authentication; loopback only (tests)")
    p.add_argument("--insecure-anywhere", action="store_true", default=None,
                   help="with --insecure: allow a bind address other hosts can reach")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on "
                   "METRICS_BIND:PORT (overrides server.metrics_port)")
    p.add_argument("--metrics-bind", metavar="ADDR", help="address of the metrics endpoint "
                   "(default 127.0.0.1; it is unauthenticated)")
    p.add_argument("--timeline", help="append a JSON line per round and per plan to this file")


def run(args: argparse.Namespace) -> int:
    from edge_controller.config import ConfigError, load_config

    overrides = {
        key: value for key, value in (
            ("server__bind", args.bind), ("target__gguf", args.target_gguf),
            ("server__scheduler", args.scheduler), ("server__batch_tokens", args.batch_tokens),
            ("server__predraft_len", args.predraft_len),
            ("control__draft_len", args.draft_len), ("control__policy", args.policy),
            ("control__acceptance", args.acceptance),
            ("server__metrics_port", args.metrics_port), ("server__timeline", args.timeline),
            ("server__metrics_bind", args.metrics_bind), ("security__keys_dir", args.keys),
            ("security__insecure", args.insecure),
            ("security__insecure_anywhere", args.insecure_anywhere),
        ) if value is not None
    }
    from edge_controller.keys import KeyFileError
    from edge_controller.transport import Transport, TransportError, is_loopback

    try:
        config = load_config(args.config, **overrides)
        transport = Transport.from_config(config)
    except (ConfigError, KeyFileError, TransportError) as exc:
        print(f"edge-controller: {exc}", file=sys.stderr)
        return 2
    if config.server.metrics_port and not is_loopback(f"tcp://{config.server.metrics_bind}:0"):
        log.warning("metrics on %s:%d are unauthenticated: anyone who reaches them reads every "
                    "device's name and figures", config.server.metrics_bind,
                    config.server.metrics_port)
    import zmq

    from edge_controller.verifier.slots import CapacityError
    from models.target import TargetLoadError

    raise_file_limit()
    try:
        # Stopped while loading: nothing to close down, so SIGTERM stops at once, as SIGINT.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        controller = build_controller(config, transport)
        controller.serve(stop_on_signals())
    except KeyboardInterrupt:  # before serving: nothing to close down
        log.info("stopped before serving")
    except zmq.ZMQError as exc:
        hint = (" (another controller on that port? choose another --bind)"
                if exc.errno == errno.EADDRINUSE else "")
        print(f"edge-controller: cannot bind {config.server.bind}: {exc.strerror}{hint}",
              file=sys.stderr)
        return 1
    except (CapacityError, TargetLoadError, NotImplementedError, OSError) as exc:
        # The KV budget does not fit, no such GPU, an unsupported model, a port or file.
        print(f"edge-controller: cannot serve: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a corrupt model file, a broken registry, a device torch refuses
        log.debug("start-up failed", exc_info=True)
        print(f"edge-controller: cannot serve: {type(exc).__name__}: {exc} (-v shows where)",
              file=sys.stderr)
        return 1
    return 0


def raise_file_limit() -> None:
    """Every connection, authenticated or not, holds a file descriptor until its handshake
    times out: take the hard limit, not the usual soft 1024 (docs/limits.md)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        log.warning("open-file limit %d: a flood of connections can exhaust it; raise it "
                    "(LimitNOFILE= in the systemd unit, ulimit -n)", soft)


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set: the controller then closes down gracefully
    (finishes its round, tells the devices) instead of dying mid-round."""
    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        log.info("%s: closing down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def build_controller(
    config: ControllerConfig, transport: Transport | None = None
) -> EdgeController:
    """Load the configured target and return a ready (not yet serving) controller. Leaves
    torch at one intra-op thread in the calling thread (the verifier's thread gets the
    default count: VerifierWorker)."""
    from pathlib import Path

    from edge_controller.controller import EdgeController, TargetInfo

    if config.target.replay:
        return replay_controller(config, transport)

    import torch

    from edge_controller.verifier.engine import Verifier
    from edge_controller.verifier.worker import torch_to_the_verifier
    from models import ensure
    from models.target import load_target

    if config.target.gguf:
        gguf, name = Path(config.target.gguf), Path(config.target.gguf).stem
    else:
        materialized = ensure()
        gguf, name = materialized.target_gguf, config.target.model
        if name == "default":  # devices (and serve's /v1/models) see the model's own name
            name = materialized.target.name
    threads = torch_to_the_verifier()  # before loading: VerifierWorker's docstring says why
    model, tokenizer = load_target(gguf, dtype=config.target.dtype, device=config.target.device)
    verifier = Verifier(
        model, max_sessions=config.limits.max_sessions, max_len=config.limits.max_len,
        device=torch.device(config.target.device), dtype=getattr(torch, config.target.dtype),
    )
    return EdgeController(config, verifier, TargetInfo.from_model(name, model, tokenizer),
                          transport=transport, torch_threads=threads)


def replay_controller(config: ControllerConfig, transport: Transport | None = None
                      ) -> EdgeController:
    """A controller whose verifier replays ``target.replay``'s recorded transcripts, each
    forward sleeping what ``control.verify_time_file``'s law says (if set) or the affine
    ``target.replay_verify_time`` (soaks: no model, no torch)."""
    from pathlib import Path

    from edge_controller.control.estimators import AffineFit
    from edge_controller.controller import EdgeController, TargetInfo
    from edge_controller.draft_control import seed_from_law
    from edge_controller.verifier.cost import VerifyCost
    from edge_controller.verifier.replay import ReplayVerifier, affine_law
    from models.traces import TraceSet

    traces = TraceSet.load(Path(config.target.replay))
    if config.control.verify_time_file:
        law = VerifyCost.load(config.control.verify_time_file).predict
        said = f"the law of {config.control.verify_time_file}"
    else:
        a, b = config.target.replay_verify_time
        law, said = affine_law(a, b), f"{a * 1e3:.1f} ms + {b * 1e3:.3f} ms per token"
    fit = AffineFit()  # draft control's T_v: the law the verifier sleeps, no calibration
    seed_from_law(fit, law, context=config.limits.max_len // 4)
    verifier = ReplayVerifier({tuple(t.prompt_ids): t.truth for t in traces.traces},
                              vocab_size=traces.vocab_size,
                              max_sessions=config.limits.max_sessions,
                              max_len=config.limits.max_len, verify_time=law,
                              end_token=min(traces.eos_token_ids))
    log.warning("REPLAY verifier: no model; verdicts from %s, each forward sleeping %s "
                "(soaks only)", config.target.replay, said)
    target = TargetInfo(f"{traces.target} (replay)", traces.fingerprint, traces.vocab_size,
                        frozenset(traces.eos_token_ids))
    return EdgeController(config, verifier, target, verify_time=fit, transport=transport)
