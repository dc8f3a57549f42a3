"""The serve API's parts that need no model: request checks, stop strings, its config."""

from __future__ import annotations

import pytest

from device_agent.serve.api import ApiError, parse_request
from device_agent.serve.config import load_agent_config
from device_agent.serve.text import CompletionText
from edge_controller.config import ConfigError

PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xe2\x82", 6: b"\xac!", 7: b" STOP",
          8: b"x"}


def detokenize(ids: list[int]) -> bytes:
    return b"".join(PIECES[i] for i in ids)


def test_text_is_cut_at_a_stop_string_split_across_tokens():
    text = CompletionText(detokenize, ["world"])
    assert text.feed([1, 2]) == "Hello"
    assert text.feed([3]) == " "  # "wor" may begin "world": held back
    assert text.feed([4, 8]) == ""  # "world" matched: cut before it, the rest ignored
    assert text.stopped and text.tokens == 4 and text.finish() == ""


def test_held_back_text_that_is_no_stop_is_released():
    text = CompletionText(detokenize, ["worse"])
    assert text.feed([1, 2, 3]) == "Hello "  # "wor" held back
    assert text.feed([4]) == "world" and not text.stopped


def test_a_character_split_across_tokens_is_held_until_whole():
    text = CompletionText(detokenize, [])
    assert text.feed([5]) == ""
    assert text.feed([6]) == "€!"
    assert text.finish() == "" and text.tokens == 2


def test_unfinished_bytes_are_flushed_at_the_end():
    text = CompletionText(detokenize, ["STOPPED"])
    assert text.feed([7]) == " "  # "STOP" may begin "STOPPED"
    assert text.feed([5]) == ""
    assert text.finish() == "STOP\ufffd"


def test_a_request_within_the_api_is_parsed():
    request = parse_request({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0,
                             "top_p": 0.5, "seed": 3, "stop": "x", "stream": True,
                             "stream_options": {"include_usage": True}, "user": "u", "n": 1,
                             "logprobs": None, "presence_penalty": 0}, chat=False)
    assert (request.prompt, request.max_tokens, request.temperature, request.top_p,
            request.seed, request.stop, request.stream, request.include_usage) == \
        ("hi", 5, 0.0, 0.5, 3, ["x"], True, True)
    chat = parse_request({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text",
                                                                           "text": "brief"}]},
        {"role": "user", "content": "hi"}]}, chat=True)
    assert chat.messages == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi"}]
    assert chat.max_tokens is None and chat.temperature == 1.0  # OpenAI's defaults
    assert parse_request({"model": "m", "prompt": "x"}, chat=False).max_tokens == 16


@pytest.mark.parametrize("body, chat, said", [
    ({"model": "m", "prompt": "x", "n": 2}, False, "n=2 is not supported"),
    ({"model": "m", "prompt": "x", "logprobs": 1}, False, "logprobs"),
    ({"model": "m", "prompt": ["a", "b"]}, False, "batch of prompts"),
    ({"model": "m", "prompt": "x", "frequency_penalty": 1}, False, "frequency_penalty"),
    ({"model": "m", "prompt": "x", "mirostat": 2}, False, "Unrecognized request argument"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, True, "role 'tool'"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     True, "image_url"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, True,
     "tool_calls"),
    ({"model": "m", "messages": []}, True, "non-empty"),
    ({"model": "m", "prompt": "x", "temperature": -1}, False, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, False, "top_p"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, False, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, False, "max_tokens"),
    ({"model": "m", "prompt": "x", "seed": -1}, False, "seed"),
    ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, False, "at most 4"),
    ({"model": "m", "prompt": "x", "stop": [1]}, False, "stop"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, False, "stream"),
    ({"prompt": "x"}, False, "model is required"),
    ([1, 2], False, "JSON object"),
    ({"model": "m", "prompt": ""}, False, "empty"),
])
def test_what_cannot_be_served_is_refused_with_400(body, chat, said):
    with pytest.raises(ApiError, match=said) as err:
        parse_request(body, chat)
    assert err.value.status == 400
    assert err.value.body()["error"]["message"] == str(err.value)


def test_the_config_file_and_flags(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[controller]\nendpoint = "tcp://edge:7000"\ninsecure = true\n'
                    '[http]\nqueue_size = 3\n')
    config = load_agent_config(path, http__bind="[::1]:9000")
    assert (config.controller.endpoint, config.http.queue_size, config.http.bind) == \
        ("tcp://edge:7000", 3, "[::1]:9000")
    with pytest.raises(ConfigError, match="SSH tunnel"):
        load_agent_config(path, http__bind="0.0.0.0:8080")
    with pytest.raises(ConfigError, match="SSH tunnel"):
        load_agent_config(path, http__bind="0.0.0.0:8080", http__api_key_file="k")
    assert load_agent_config(path, http__bind="0.0.0.0:8080", http__api_key_file="k",
                             http__tls_cert="c", http__tls_key="k").http.bind == "0.0.0.0:8080"
    with pytest.raises(ConfigError, match="unknown key http.port"):
        load_agent_config(path, http__port=1)
    with pytest.raises(ConfigError, match="encrypted and authenticated"):
        load_agent_config(None, controller__endpoint="tcp://edge:7000")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_agent_config(path, http__bind="8080")
    with pytest.raises(ConfigError, match="queue_size"):
        load_agent_config(path, http__queue_size=0)


def test_the_example_config_is_valid():
    from pathlib import Path

    config = load_agent_config(Path(__file__).parent.parent / "configs/agent.example.toml")
    assert config.http.bind == "127.0.0.1:8080" and config.controller.keys_dir
