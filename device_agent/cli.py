"""``device-agent`` command line."""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_controller.keys import CurveClient

EXIT_FAILED = 1  # the controller refused us (an error reply, our key), or keys init failed
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # no answer from the controller (at start, or after resuming)
EXIT_PROTOCOL = 4  # the controller broke the protocol (a garbage frame, an impossible verdict)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="device-agent",
        description="Device agent of multispin-edge: drafts tokens with a small model "
        "(llama.cpp, or ONNX Runtime) and has the edge controller verify them with the "
        "target model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate text for one prompt",
                         description="Generate text for one prompt with the controller's help.",
                         epilog="exit codes: 0 done; 1 refused by the controller (key not "
                         "listed, an error reply); 2 bad usage; 3 no answer from the "
                         "controller (at registration, or nothing committed for --timeout + "
                         "--resume-timeout); 4 the controller broke the protocol; 130 "
                         "interrupted (the request is cancelled). A request "
                         "that fails part-way prints what it committed (with --json, marked "
                         "partial)")
    gen.add_argument("--controller", required=True, metavar="tcp://HOST:PORT")
    add_link_arguments(gen)
    gen.add_argument("--draft", default="q4_0",
                     help="draft model: a name from configs/models.toml (q8_0, q5_0, q4_0, "
                     "onnx, ...), a GGUF file (llama.cpp), an ONNX model directory (ONNX "
                     "Runtime), or none (no drafter: the controller decodes) (default: q4_0)")
    gen.add_argument("--tokenizer", default="q4_0", metavar="NAME_OR_GGUF",
                     help="with --draft none: the GGUF whose vocabulary (no weights) "
                     "tokenizes; it must match the target's (default q4_0)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--requests", type=int, default=1,
                     help="generate for the prompt this many times in one session (trials)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="target-side top-k; 0 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--draft-top-k", type=int, default=32,
                     help="size of the sparse draft distribution uploaded when sampling")
    gen.add_argument("--device-id", help="with keys: the name this device's key is listed "
                     "under (checked; default: whatever it is); with --insecure: the name to "
                     "register (default: host-random)")
    gen.add_argument("--threads", type=int, default=1, help="drafting threads")
    add_provider_argument(gen)
    gen.add_argument("--draft-pace", type=float, default=0.0, metavar="S",
                     help="emulate a slower board: at least S seconds per drafted token")
    gen.add_argument("--spectral-efficiency", type=float, default=0.0, metavar="BIT_S_HZ",
                     help="this device's uplink spectral efficiency (its radio, or an emulated "
                     "one), reported to the controller's draft control; 0 = unknown")
    gen.add_argument("--probe-uplink", type=int, default=0, metavar="N",
                     help="measure uplink capacity at registration with N padded pings")
    gen.add_argument("--timeout", type=float, default=10.0, metavar="S",
                     help="how long without any answer from the controller before the link "
                     "counts as lost (the agent pings while it waits; default 10)")
    gen.add_argument("--resume-timeout", type=float, default=60.0, metavar="S",
                     help="after a lost link, how long to keep reconnecting and resuming the "
                     "request: it gives up once nothing was committed for --timeout + this, "
                     "with exit 3, and with --json the partial result (default 60)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per request (prompt_tokens, tokens, text, "
                     "stats), one per line")
    served = sub.add_parser(
        "serve", help="run as a service: an OpenAI-compatible API for this board's programs",
        description="Stay registered with the controller and serve POST /v1/completions and "
        "/v1/chat/completions (OpenAI's API; every answer is the target model's own output), "
        "GET /v1/models, /health and /metrics. Flags override the config file's keys "
        "(configs/agent.example.toml). docs/serve.md",
        epilog="exit codes: 0 stopped (SIGTERM, Ctrl-C); 2 bad configuration")
    served.add_argument("--config", type=Path, metavar="FILE", help="agent TOML file")
    for flag, key, kind, help_ in SERVE_FLAGS:
        if kind is bool:
            served.add_argument(flag, dest=key, action="store_const", const=True,
                               default=argparse.SUPPRESS, help=help_)
        else:
            served.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS,
                               metavar=key.split("__")[1].upper(), help=help_)
    keys = sub.add_parser("keys", help="this device's CURVE keypair",
                          description="Make this device's keypair; list the printed public key "
                          "on the controller with `edge-controller keys add NAME PUBKEY`.")
    keys_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = keys_actions.add_parser("init", help="make the keypair; print the public key")
    init.add_argument("--dir", required=True, type=Path, metavar="DIR")
    init.add_argument("--force", action="store_true",
                      help="replace an existing keypair (the old one is kept as .old)")
    bench = sub.add_parser("bench", help="measure this board's drafting speed, alone",
                           description="Draft greedily with the draft model, no controller, "
                           "and print tokens/s (the speed telemetry reports in a session).")
    bench.add_argument("--draft", default="q4_0",
                       help="registry name, GGUF file or ONNX model directory")
    bench.add_argument("--tokens", type=int, default=64, help="tokens to draft (default 64)")
    bench.add_argument("--threads", type=int, default=1)
    add_provider_argument(bench)
    bench.add_argument("--draft-pace", type=float, default=0.0, metavar="S")
    bench.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    quiet = logging.INFO if args.command == "serve" else logging.WARNING  # a service logs
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"generate": generate, "bench": bench_draft, "keys": keys_init, "serve": serve}
    return commands[args.command](args)


# device-agent serve: flag, config key (section__key), type, help. Given flags override
# the config file.
SERVE_FLAGS = [
    ("--controller", "controller__endpoint", str, "tcp://HOST:PORT of the edge controller"),
    ("--controller-key", "controller__key", str, "the controller's public key (Z85) or its "
     "controller.key file"),
    ("--keys", "controller__keys_dir", str, "this device's keys (device-agent keys init)"),
    ("--insecure", "controller__insecure", bool, "plain TCP, for a controller started with "
     "--insecure (tests only)"),
    ("--device-id", "controller__device_id", str, "the name this device's key is listed under "
     "(checked)"),
    ("--timeout", "controller__timeout_s", float, "no answer this long: the link counts as "
     "lost (default 10)"),
    ("--resume-timeout", "controller__resume_timeout_s", float, "after a lost link, reconnect "
     "and resume until nothing was committed for --timeout + this; then 503 (default 60)"),
    ("--draft", "draft__model", str, "draft model: registry name, GGUF file or ONNX model "
     "directory (default q4_0), or none: no drafter, the controller decodes"),
    ("--tokenizer", "draft__tokenizer", str, "with --draft none: the GGUF whose vocabulary "
     "tokenizes (default q4_0)"),
    ("--threads", "draft__threads", int, "drafting threads (default 1)"),
    ("--execution-provider", "draft__provider", str, "an ONNX draft's ONNX Runtime "
     "execution provider (default cpu; the others untested here)"),
    ("--draft-pace", "draft__pace_s", float, "emulate a slower board: s per drafted token"),
    ("--http", "http__bind", str, "HOST:PORT of the API (default 127.0.0.1:8080); beyond "
     "loopback it needs --api-key-file, --tls-cert and --tls-key"),
    ("--api-key-file", "http__api_key_file", str, "file holding the API key clients send "
     "(Authorization: Bearer KEY)"),
    ("--tls-cert", "http__tls_cert", str, "PEM certificate chain: serve HTTPS"),
    ("--tls-key", "http__tls_key", str, "PEM private key of --tls-cert"),
    ("--queue-size", "http__queue_size", int, "requests that may wait (default 8); more get 429"),
    ("--spectral-efficiency", "telemetry__spectral_efficiency", float, "this device's uplink "
     "spectral efficiency (bit/s/Hz), reported to draft control; 0 = unknown"),
]


def keys_init(args: argparse.Namespace) -> int:
    from edge_controller.keys import DEVICE, KeyFileError, init_keypair

    try:
        keypair = init_keypair(args.dir, DEVICE, force=args.force)
    except KeyFileError as exc:
        print(f"device-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(keypair.public_text)
    print(f"device keypair in {args.dir}; on the controller run: edge-controller keys add NAME "
          f"{keypair.public_text} --dir DIR", file=sys.stderr)
    return 0


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    """--keys, --controller-key, --insecure: how this device's link is secured."""
    parser.add_argument("--keys", metavar="DIR", help="this device's keys (device-agent keys "
                        "init); its public key must be listed on the controller")
    parser.add_argument("--controller-key", metavar="KEY", help="the controller's public key "
                        "(Z85, as `edge-controller keys init` printed it, or its controller.key "
                        "file)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain TCP, for a controller started with --insecure (tests only)")


def link_security(args: argparse.Namespace) -> tuple[CurveClient | None, str | None]:
    """(CurveClient or None for --insecure, error text or None) from the link flags."""
    return curve_client(args.insecure, args.keys, args.controller_key)


def curve_client(insecure: bool, keys: str | None,
                 controller_key: str | None) -> tuple[CurveClient | None, str | None]:
    """(CurveClient or None when ``insecure``, error text or None)."""
    from edge_controller.keys import KeyFileError, device_client

    if insecure:
        if keys or controller_key:
            return None, "--insecure goes without --keys and --controller-key"
        return None, None
    if not (keys and controller_key):
        return None, ("the link to the controller is encrypted and authenticated: pass --keys "
                      "DIR (make it with `device-agent keys init --dir DIR` and list its public "
                      "key on the controller) and --controller-key KEY; or --insecure for a "
                      "controller started with --insecure")
    try:
        return device_client(Path(keys), controller_key), None
    except KeyFileError as exc:
        return None, str(exc)


def bench_draft(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        print("device-agent: --tokens must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    if args.draft == NO_DRAFTER:
        print("device-agent: --draft none has nothing to benchmark", file=sys.stderr)
        return EXIT_USAGE
    drafter = load_drafter(args)
    if drafter is None:
        return EXIT_USAGE
    drafter.begin(drafter.tokenize("The history of the bicycle begins"))
    drafter.draft(4)  # warm-up
    result = drafter.draft(args.tokens)
    rate = len(result.tokens) / result.seconds
    if args.json:
        print(json.dumps({"draft": args.draft, "tokens": len(result.tokens),
                          "seconds": result.seconds, "draft_tokens_per_s": rate}))
    else:
        print(f"{args.draft}: {rate:.1f} draft tokens/s ({len(result.tokens)} tokens)")
    return 0


def add_provider_argument(parser: argparse.ArgumentParser) -> None:
    from device_agent.onnx_drafter import PROVIDERS

    parser.add_argument("--execution-provider", default="cpu", choices=list(PROVIDERS),
                        help="with an ONNX draft: ONNX Runtime's execution provider (default "
                        "cpu, the only one tested here; the others need their hardware)")


def resolve_draft(name_or_path: str) -> Path:
    """A GGUF file or ONNX model directory as given, or the named draft from the model
    registry (built if needed)."""
    from device_agent.onnx_drafter import is_onnx_model

    path = Path(name_or_path)
    if path.suffix == ".gguf" or len(path.parts) > 1 or is_onnx_model(path):
        if not (path.is_file() and path.suffix == ".gguf") and not is_onnx_model(path):
            raise FileNotFoundError(f"draft {path} is neither a GGUF file nor an ONNX model "
                                    "directory")
        return path
    import models

    materialized = models.ensure(include=(name_or_path,))
    if name_or_path not in materialized.drafts:
        known = ", ".join(sorted(materialized.drafts))
        raise KeyError(f"unknown draft {name_or_path!r} (known: {known}, a .gguf file or an "
                       "ONNX model directory)")
    return materialized.drafts[name_or_path]


NO_DRAFTER = "none"  # --draft none: --tokenizer's vocabulary only; the controller decodes


def open_drafter(name: str, threads: int = 1, pace_s: float = 0.0, tokenizer: str = "q4_0",
                 provider: str = "cpu"):
    """The drafter ``name`` (registry name, GGUF file or ONNX model directory: the engine
    is chosen by what the artifact is), or with ``none`` the vocabulary of ``tokenizer``
    (a registry name or GGUF path) alone: the controller then decodes (server_decode)."""
    from device_agent.onnx_drafter import OnnxDrafter, is_onnx_model

    if name == NO_DRAFTER:
        from device_agent.drafter import TokenizerOnly

        vocabulary = resolve_draft(tokenizer)
        if is_onnx_model(vocabulary):
            raise ValueError("--draft none reads its vocabulary from a GGUF (--tokenizer q4_0 "
                             "or a .gguf file): an ONNX model's tokenizer needs the model "
                             "loaded, so draft with it instead (--draft DIR)")
        return TokenizerOnly(vocabulary)
    path = resolve_draft(name)
    if is_onnx_model(path):
        return OnnxDrafter(path, n_threads=threads, pace_s_per_token=pace_s, provider=provider)
    from device_agent.drafter import Drafter

    return Drafter(path, n_threads=threads, pace_s_per_token=pace_s)


def load_drafter(args: argparse.Namespace, tokenizer: str = "q4_0"):
    """The drafter named by --draft, or None after printing why it cannot be loaded."""
    try:
        return open_drafter(args.draft, args.threads, args.draft_pace, tokenizer,
                            args.execution_provider)
    except (FileNotFoundError, KeyError, ValueError, ImportError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) else exc  # KeyError quotes its str
        print(f"device-agent: {reason}", file=sys.stderr)
        return None


def generate(args: argparse.Namespace) -> int:
    from device_agent.agent import (
        ControllerBrokeProtocol,
        ControllerError,
        DeviceAgent,
        GaveUp,
        SamplingOptions,
        TelemetryOptions,
        device_name,
        partial_result,
    )
    from device_agent.link import ControllerLink, KeyRefused, LinkLost, LinkRefused
    from edge_controller.protocol import ProtocolError

    if (min(args.max_new_tokens, args.requests) < 1 or args.temperature < 0
            or args.timeout <= 0 or args.resume_timeout < 0):
        print("device-agent: need --max-new-tokens >= 1, --requests >= 1, --temperature >= 0, "
              "--timeout > 0 and --resume-timeout >= 0", file=sys.stderr)
        return EXIT_USAGE
    curve, problem = link_security(args)
    if problem:
        print(f"device-agent: {problem}", file=sys.stderr)
        return EXIT_USAGE
    device_id = device_name(args.device_id, secure=curve is not None)
    drafter = load_drafter(args, args.tokenizer)
    if drafter is None:
        return EXIT_USAGE
    prompt_ids = drafter.tokenize(args.prompt)
    sampling = SamplingOptions(args.temperature, args.top_p, args.top_k, args.seed,
                               args.draft_top_k)
    stream = _TextStream(drafter) if not args.json else None
    with ControllerLink(args.controller, curve=curve, timeout_s=args.timeout) as link:
        telemetry = TelemetryOptions(args.spectral_efficiency, probe_bursts=args.probe_uplink)
        agent = DeviceAgent(drafter, link, device_id, telemetry,
                            resume_timeout_s=args.resume_timeout)
        try:
            agent.register()
            for _ in range(args.requests):
                result = agent.generate(prompt_ids, args.max_new_tokens, sampling,
                                        on_tokens=stream.write if stream else None)
                if args.json:
                    print(json.dumps(result.to_json()), flush=True)
        except (KeyRefused, ControllerError, LinkRefused, GaveUp, LinkLost, ProtocolError,
                ControllerBrokeProtocol) as exc:
            code = _report_failure(exc, device_id)
            partial = partial_result(exc)
            if partial is not None and (partial.tokens or args.json):
                if args.json:
                    print(json.dumps(partial.to_json()), flush=True)
                print(f"device-agent: {len(partial.tokens)} tokens of the request were "
                      f"committed{', printed as a partial result' if args.json else ''}",
                      file=sys.stderr)
            return code
        except KeyboardInterrupt:
            print("\ndevice-agent: interrupted (the request in flight was cancelled)",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            agent.close()  # bye: the controller frees our slot now, not after a timeout
    if not args.json:
        s = result.stats
        print(f"\n[{len(result.tokens)} tokens, {s.rounds} rounds, acceptance "
              f"{s.acceptance_rate:.2f}, {s.tokens_per_s:.1f} tok/s]", file=sys.stderr)
        if s.predraft_rounds:
            print(f"[proactive: drafted through {s.predraft_rounds} rounds, the guess paid "
                  f"in {s.predraft_paid}; {s.predraft_used} of {s.predrafted} pre-drafted "
                  f"tokens uploaded, {s.predraft_wasted} dropped]", file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    from device_agent.serve.config import load_agent_config
    from device_agent.serve.runner import serve as run_service
    from edge_controller.config import ConfigError

    overrides = {key: value for key, value in vars(args).items() if "__" in key}
    try:
        config = load_agent_config(args.config, **overrides)
        c = config.controller
        curve, problem = curve_client(c.insecure, c.keys_dir, c.key)
        if problem:
            raise ConfigError(problem)
        d = config.draft
        drafter = open_drafter(d.model, d.threads, d.pace_s, d.tokenizer, d.provider)
        return run_service(config, drafter, curve)
    except (ConfigError, FileNotFoundError, KeyError, ValueError, ImportError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) else exc
        print(f"device-agent serve: {reason}", file=sys.stderr)
        return EXIT_USAGE


def _report_failure(exc: Exception, device_id: str | None) -> int:
    """Say why the agent stops, in one line; the exit code that says it too."""
    from device_agent.agent import ControllerBrokeProtocol, ControllerError, GaveUp
    from device_agent.link import KeyRefused, LinkLost, LinkRefused
    from edge_controller.protocol import ProtocolError

    if isinstance(exc, KeyRefused):
        name = device_id or "NAME"
        said = (f"the controller refused this device's key ({name}/{exc.public_key} not on "
                f"its allowlist): on the controller, run `edge-controller keys add {name} "
                f"{exc.public_key} --dir DIR`")
        code = EXIT_FAILED
    elif isinstance(exc, ControllerError | LinkRefused):
        said, code = str(exc), EXIT_FAILED
    elif isinstance(exc, GaveUp | LinkLost):
        said, code = str(exc), EXIT_UNREACHABLE
    elif isinstance(exc, ProtocolError) and exc.code == "version":
        # A controller of another version: not a broken one.
        said, code = f"the controller speaks another protocol version: {exc}", EXIT_FAILED
    else:
        assert isinstance(exc, ProtocolError | ControllerBrokeProtocol)
        said, code = f"the controller broke the protocol: {exc}", EXIT_PROTOCOL
    print(f"device-agent: {said}", file=sys.stderr)
    return code


class _TextStream:
    """Prints committed tokens as text, holding back incomplete UTF-8 sequences."""

    def __init__(self, drafter):
        self._drafter = drafter
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, tokens: list[int]) -> None:
        sys.stdout.write(self._decoder.decode(self._drafter.detokenize(tokens)))
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
