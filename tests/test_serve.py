"""``device-agent serve`` through the unmodified ``openai`` client: a real controller (real
CURVE link, real transformers verifier), a real llama.cpp drafter, the agent's real HTTP
server on loopback. Greedy answers must be the target's own output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest

from device_agent.drafter import Drafter
from device_agent.serve.chat import ChatTemplate
from device_agent.serve.config import load_agent_config
from device_agent.serve.runner import RunningService, running
from models.target import reference_greedy
from tests.conftest import BIN

pytestmark = pytest.mark.slow

PROMPT = "The three most important inventions of the last century are"
LONG = "Write a long story about a dragon who learns to fly. Chapter 1:"  # no early end
MESSAGES = [{"role": "user", "content": "Name three rivers of Europe."}]


@pytest.fixture(scope="module")
def drafter(default_models):
    return Drafter(default_models.drafts["q4_0"])


@pytest.fixture
def serve(run_controller, lab_keys, drafter):
    """``with serve(**agent_config) as (controller, service)``: both running."""

    @contextmanager
    def start(controller_overrides=None, board=None, insecure=False, **overrides) -> Iterator:
        with run_controller(insecure=insecure, **(controller_overrides or {})) as controller:
            link = {"controller__insecure": True} if insecure else {
                "controller__key": lab_keys.controller_key,
                "controller__keys_dir": str(lab_keys.device_dir("board"))}
            config = load_agent_config(None, controller__endpoint=controller.endpoint,
                                       http__bind="127.0.0.1:0", **link, **overrides)
            curve = None if insecure else lab_keys.client("board")
            try:
                with running(config, drafter, curve, board) as service:
                    wait_for(lambda: service.service.health.registered, "registration")
                    yield controller, service
            finally:
                if board is not None:
                    board.stop()

    return start


def http(url: str, body: dict | None = None, timeout: float = 30.0, key: str = "",
         tls: ssl.SSLContext | None = None) -> tuple[int, str]:
    """(status, body text) of a GET (or a POST of ``body``) with the standard library."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=tls) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(0.05)


def client(service: RunningService, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url + "/v1", api_key=kwargs.pop("api_key", "none"),
                         max_retries=0, **kwargs)


def expected(target, drafter: Drafter, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
    """The target alone's greedy text for ``prompt_ids`` (cut at its end of sequence) and
    its token count; a near tie in it would excuse a difference, so none may be there."""
    ids, margins = reference_greedy(target, prompt_ids, max_tokens)
    assert min(margins) > 1e-3, "pick a prompt without a near tie in its reference"
    return drafter.detokenize(ids).decode("utf-8", errors="replace"), len(ids)


def test_completions_and_chat_answer_with_the_targets_output(serve, drafter, target):
    with serve() as (_, service):
        api = client(service)
        (model,) = [m.id for m in api.models.list()]
        assert model == service.service.health.target

        prompt_ids = drafter.tokenize(PROMPT)
        want, n = expected(target, drafter, prompt_ids, 24)
        whole = api.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
        assert whole.choices[0].text == want
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), n)
        assert whole.choices[0].finish_reason == ("length" if n == 24 else "stop")
        chunks = list(api.completions.create(model=model, prompt=PROMPT, max_tokens=24,
                                             temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want
        assert len([c for c in chunks if c.choices[0].text]) > 1, "one chunk per round"
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

        chat_ids = ChatTemplate(drafter).prompt_ids(MESSAGES)
        tokenizer = target[1]
        assert chat_ids == list(tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"])
        want, n = expected(target, drafter, chat_ids, 32)
        answer = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=32,
                                             temperature=0)
        assert answer.choices[0].message.content == want
        assert answer.choices[0].message.role == "assistant"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(chat_ids), n)
        stream = list(api.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=32, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert stream[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
        assert stream[-1].usage.completion_tokens == n and not stream[-1].choices

        sampled = api.completions.create(model=model, prompt=PROMPT, max_tokens=16,
                                         temperature=0.8, top_p=0.9, seed=7)
        assert sampled.usage.completion_tokens >= 1

        status, health = http(service.url + "/health")
        health = json.loads(health)
        assert status == 200 and health["registered"] and health["rounds"] > 0
        assert health["draft"] == drafter.model_id
        _, metrics = http(service.url + "/metrics")
        assert 'multispin_agent_requests_total{outcome="done"} 5.0' in metrics
        assert "multispin_agent_acceptance " in metrics
        assert "multispin_agent_queue_depth 0.0" in metrics


def test_a_stop_string_ends_the_answer_and_the_request(serve, drafter, target, tmp_path):
    with serve(board=synthetic_board(tmp_path)) as (controller, service):
        api = client(service)
        want, _ = expected(target, drafter, drafter.tokenize(PROMPT), 40)
        stop = want.split()[3]  # a word a few tokens in
        answer = api.completions.create(model=service.service.health.target, prompt=PROMPT,
                                        max_tokens=400, temperature=0, stop=[stop, "@@@"])
        assert answer.choices[0].text == want[: want.index(stop)]
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage.completion_tokens < 40
        # Cancelled at the controller: its KV slot is free long before 400 tokens.
        wait_for(lambda: controller.verifier.slots_in_use == 0, "free slot", 5.0)
        # The board's tegrastats went with the telemetry, and onto both /metrics.
        gpu = {"device": "board", "figure": "gpu_percent"}
        wait_for(lambda: controller.metrics.registry.get_sample_value(
            "multispin_device_board", gpu) == 12.0, "board telemetry at the controller")
        assert 'multispin_agent_board{figure="power_total_mw"} 4813.0' in \
            http(service.url + "/metrics")[1]


def synthetic_board(tmp_path):
    """A BoardMonitor on a stand-in tegrastats printing a SYNTHETIC Orin Nano line."""
    from device_agent.board import BoardMonitor
    from tests.test_board import SYNTHETIC_ORIN_NANO

    script = tmp_path / "tegrastats.py"
    script.write_text(f"import time\nprint({SYNTHETIC_ORIN_NANO!r}, flush=True)\ntime.sleep(60)\n")
    return BoardMonitor(command=[sys.executable, str(script)], nvpmodel="/nonexistent").start()


def test_a_client_that_hangs_up_frees_the_controllers_slot(serve):
    with serve() as (controller, service):
        api = client(service)
        model = service.service.health.target
        stream = api.completions.create(model=model, prompt=LONG, max_tokens=800,
                                        temperature=0, stream=True)
        next(iter(stream))
        assert controller.verifier.slots_in_use == 1
        stream.close()
        wait_for(lambda: controller.verifier.slots_in_use == 0, "slot freed after hang-up", 10.0)
        wait_for(lambda: not service.service.health.in_flight, "agent free", 10.0)
        # A non-streamed request whose client goes away is cancelled too.
        body = json.dumps({"model": model, "prompt": LONG, "max_tokens": 800,
                           "temperature": 0}).encode()
        host, port = service.server.server_address[:2]
        with socket.create_connection((host, port)) as hung:
            hung.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: controller.verifier.slots_in_use == 1, "the request at work")
        wait_for(lambda: controller.verifier.slots_in_use == 0, "slot freed after timeout", 10.0)
        after = api.completions.create(model=model, prompt=LONG, max_tokens=4, temperature=0)
        assert after.usage.completion_tokens == 4
        _, metrics = http(service.url + "/metrics")
        assert 'multispin_agent_requests_total{outcome="cancelled"} 2.0' in metrics


def test_unsupported_parameters_get_400_and_a_full_queue_429(serve):
    with serve(http__queue_size=1) as (_, service):
        api = client(service)
        model = service.service.health.target
        refused = {"n": 2, "logprobs": 2, "presence_penalty": 0.5, "logit_bias": {"5": 1},
                   "echo": True, "suffix": "end", "best_of": 3}
        for name, value in refused.items():
            with pytest.raises(openai.BadRequestError, match=name) as err:
                api.completions.create(model=model, prompt=LONG, **{name: value})
            assert err.value.body["code"] == "unsupported_parameter"
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        for kwargs in ({"tools": tools}, {"response_format": {"type": "json_object"}},
                       {"extra_body": {"frobnicate": 1}}):
            with pytest.raises(openai.BadRequestError):
                api.chat.completions.create(model=model, messages=MESSAGES, **kwargs)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            api.completions.create(model="gpt-4o", prompt=LONG)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            api.completions.create(model=model, prompt=LONG, temperature=3)

        # One request in flight, one waiting: the third gets 429.
        running_ = api.completions.create(model=model, prompt=LONG, max_tokens=800,
                                          temperature=0, stream=True)
        next(iter(running_))
        waiting = threading.Thread(target=lambda: api.completions.create(
            model=model, prompt=LONG, max_tokens=2, temperature=0), daemon=True)
        waiting.start()
        wait_for(lambda: service.service.queue_depth() == 1, "a waiting request")
        with pytest.raises(openai.RateLimitError, match="already waiting"):
            api.completions.create(model=model, prompt=LONG, max_tokens=2)
        running_.close()
        waiting.join(30)
        assert not waiting.is_alive()


def test_an_unreachable_controller_gives_503_after_the_resume_timeout(drafter, unused_endpoint):
    config = load_agent_config(None, controller__endpoint=unused_endpoint,
                               controller__insecure=True, controller__timeout_s=1.0,
                               controller__resume_timeout_s=3.0, http__bind="127.0.0.1:0")
    with running(config, drafter) as service:
        api = client(service)
        answered = {}

        def ask(name: str) -> None:
            with pytest.raises(openai.InternalServerError) as err:
                api.completions.create(model="any", prompt=PROMPT, max_tokens=4)
            answered[name] = (time.monotonic(), err.value)

        started = time.monotonic()
        first = threading.Thread(target=ask, args=("first",))
        first.start()
        wait_for(lambda: service.service.health.in_flight, "the first request at work")
        ask("waiting")
        first.join(30)
        for _, err in answered.values():
            assert err.status_code == 503 and err.body["code"] == "controller_unavailable"
        assert 1.0 + 3.0 <= answered["first"][0] - started < 30
        # The request that waited meanwhile is answered with the first, not a timeout later.
        assert abs(answered["waiting"][0] - answered["first"][0]) < 1.5
        status, health = http(service.url + "/health")
        assert status == 503 and not json.loads(health)["registered"]


def test_stopping_answers_the_request_in_flight_with_503(serve):
    """Insecure too: without keys the agent names itself (as generate does)."""
    with serve(insecure=True) as (controller, service):
        assert service.service.health.device_id.startswith(socket.gethostname())
        api = client(service)
        model = service.service.health.target
        answer = {}

        def ask() -> None:
            with pytest.raises(openai.InternalServerError) as err:
                api.completions.create(model=model, prompt=LONG, max_tokens=800, temperature=0)
            answer["error"] = err.value

        asking = threading.Thread(target=ask)
        asking.start()
        wait_for(lambda: service.service.health.rounds > 0, "rounds")
        assert service.service.stop()  # the worker ends: the request is cancelled
        asking.join(30)
        assert answer["error"].status_code == 503 and "shutting down" in str(answer["error"])
        wait_for(lambda: controller.verifier.slots_in_use == 0, "the slot freed")
        wait_for(lambda: len(controller.sessions) == 0, "goodbye")


@pytest.fixture
def unused_endpoint() -> str:
    from edge_controller.launch import free_endpoint

    return free_endpoint()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_api_key_and_tls(tmp_path, drafter, unused_endpoint):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    api_key = tmp_path / "api.key"
    api_key.write_text("k" * 32 + "\n")
    config = load_agent_config(None, controller__endpoint=unused_endpoint,
                               controller__insecure=True, http__bind="127.0.0.1:0",
                               http__api_key_file=str(api_key), http__tls_cert=str(cert),
                               http__tls_key=str(key))
    with running(config, drafter) as service:
        assert service.url.startswith("https://")
        tls = ssl.create_default_context(cafile=str(cert))
        verified = openai.DefaultHttpxClient(verify=tls)
        with pytest.raises(openai.AuthenticationError):
            client(service, api_key="wrong" * 8, http_client=verified).models.list()
        assert client(service, api_key="k" * 32, http_client=verified).models.list().data == []
        assert http(service.url + "/metrics", tls=tls)[0] == 401
        status, metrics = http(service.url + "/metrics", tls=tls, key="k" * 32)
        assert status == 200 and "multispin_agent_registered" in metrics
        with pytest.raises(OSError):  # plain HTTP to the TLS port
            http(service.url.replace("https", "http") + "/health", timeout=5)


def test_serve_refuses_to_bind_beyond_loopback_without_key_and_tls():
    out = subprocess.run([BIN / "device-agent", "serve", "--controller", "tcp://127.0.0.1:9",
                          "--insecure", "--http", "0.0.0.0:8080"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "--api-key-file" in out.stderr and "SSH tunnel" in out.stderr


def test_serve_process_answers_and_stops_cleanly_on_sigterm(tmp_path, run_controller, lab_keys):
    """The real command, as systemd runs it: up, answering, then SIGTERM -> exit 0."""
    with run_controller() as controller:
        port = int(free_port())
        proc = subprocess.Popen(
            [BIN / "device-agent", "serve", "--controller", controller.endpoint,
             "--keys", str(lab_keys.device_dir("board")),
             f"--controller-key={lab_keys.controller_key}", "--http", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _healthy(url), "a healthy service", 120)
            status, answer = http(url + "/v1/completions", {
                "model": controller.target.name, "prompt": PROMPT, "max_tokens": 8,
                "temperature": 0}, timeout=60)
            answer = json.loads(answer)
            assert answer["usage"]["completion_tokens"] == 8
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        log = proc.stdout.read()
        assert "serving" in log and "stopping" in log
        wait_for(lambda: controller.sessions.named("board") is None, "goodbye", 10)


def free_port() -> str:
    from edge_controller.launch import free_endpoint

    return free_endpoint().rpartition(":")[2]


def _healthy(url: str) -> bool:
    try:
        return http(url + "/health", timeout=1)[0] == 200
    except OSError:
        return False


def test_http_hardening(drafter, unused_endpoint, monkeypatch):
    """No controller needed: what the HTTP layer refuses, in OpenAI's error shape."""
    from device_agent.serve import http as serve_http

    monkeypatch.setattr(serve_http, "READ_DEADLINE_S", 1.0)
    monkeypatch.setattr(serve_http, "MAX_CONNECTIONS", 3)
    config = load_agent_config(None, controller__endpoint=unused_endpoint,
                               controller__insecure=True, http__bind="127.0.0.1:0")
    with running(config, drafter) as service:
        host, port = service.server.server_address[:2]

        def raw(data: bytes, wait_s: float = 5.0) -> bytes:
            """The whole answer (every refusal closes the connection)."""
            with socket.create_connection((host, port), timeout=wait_s) as sock:
                sock.sendall(data)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                return answer

        rebound = raw(b"GET /health HTTP/1.1\r\nHost: attacker.example:8080\r\n\r\n")
        assert rebound.startswith(b"HTTP/1.1 403") and b'"bad_host"' in rebound
        cross = raw(b"GET /v1/models HTTP/1.1\r\nHost: localhost:8080\r\n"
                    b"Origin: http://attacker.example\r\n\r\n")
        assert cross.startswith(b"HTTP/1.1 403") and b'"bad_origin"' in cross
        form = raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                   b"text/plain\r\nContent-Length: 2\r\n\r\n{}")
        assert form.startswith(b"HTTP/1.1 415")
        smuggled = raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                       b"application/json\r\nContent-Length: 2\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n{}")
        assert smuggled.startswith(b"HTTP/1.1 400")
        nested = b"[" * 100_000 + b"]" * 100_000
        deep = raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                   b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(nested), nested))
        assert deep.startswith(b"HTTP/1.1 400") and b"not valid JSON" in deep
        put = raw(b"PUT /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert put.startswith(b"HTTP/1.1 405") and b'"error"' in put

        # A client that trickles its request is cut off at the read deadline...
        with socket.create_connection((host, port), timeout=5) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            started = time.monotonic()
            assert slow.recv(100) == b"" and time.monotonic() - started < 3
        # ...and connections beyond the limit get 503 at once, not silence.
        idle = [socket.create_connection((host, port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").startswith(
                b"HTTP/1.1 503")
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert http(service.url + "/v1/models")[0] == 200  # the service is fine after all
