"""Controller config: the shipped file loads; bad values get errors naming the key."""

from pathlib import Path

import pytest

from edge_controller.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads():
    config = load_config(ROOT / "configs" / "controller.toml")
    assert config.control.draft_len <= config.control.max_draft_len
    assert config.server.bind.startswith("tcp://")


def test_overrides_win():
    config = load_config(ROOT / "configs" / "controller.toml", server__bind="tcp://0.0.0.0:7000",
                         control__draft_len=2)
    assert (config.server.bind, config.control.draft_len) == ("tcp://0.0.0.0:7000", 2)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[server]\nround_deadline_s = -1", "round_deadline_s"),
        ("[server]\nbindd = 'tcp://x'", "server.bindd"),
        ("[nope]\nx = 1", "[nope]"),
        ("[limits]\nmax_sessions = 'many'", "limits.max_sessions"),
        ("[limits]\nmax_sessions = true", "limits.max_sessions"),
        ("[control]\ndraft_len = 40\nmax_draft_len = 16", "draft_len"),
        ("[control]\nmax_draft_len = 1000", "max_draft_len"),
        ("[target]\ndtype = 'int3'", "target.dtype"),
        ("[limits]\nmax_len = 100\nmax_new_tokens = 500", "max_new_tokens"),
        ("server = 3", "[server]"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, toml, needle):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
