"""Key files, the allowlist and the ``keys`` commands: real files, pyzmq's ZPL format."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq.auth

from edge_controller import keys as K
from edge_controller.transport import Transport, TransportError, is_loopback
from tests.conftest import BIN


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=60)


def test_init_writes_zpl_files_with_a_private_secret(tmp_path):
    keypair = K.init_keypair(tmp_path / "k", K.CONTROLLER)
    public, secret = tmp_path / "k" / "controller.key", tmp_path / "k" / "controller.key_secret"
    assert os.stat(secret).st_mode & 0o777 == 0o600
    assert os.stat(public).st_mode & 0o777 == 0o644
    assert zmq.auth.load_certificate(str(secret)) == (keypair.public, keypair.secret)
    assert zmq.auth.load_certificate(str(public)) == (keypair.public, None)
    with pytest.raises(K.KeyFileError, match="already exists"):
        K.init_keypair(tmp_path / "k", K.CONTROLLER)
    rotated = K.init_keypair(tmp_path / "k", K.CONTROLLER, force=True)
    assert rotated.public != keypair.public
    assert (tmp_path / "k" / "controller.key_secret.old").is_file()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_secret_key_others_may_read_is_refused(tmp_path, mode):
    K.init_keypair(tmp_path, K.DEVICE)
    secret = tmp_path / "device.key_secret"
    secret.chmod(mode)
    with pytest.raises(K.KeyFileError, match=f"chmod 600 {secret}"):
        K.load_own_keypair(tmp_path, K.DEVICE)
    secret.chmod(0o600)
    assert K.load_own_keypair(tmp_path, K.DEVICE).secret


def test_allowlist_maps_keys_to_names_and_sees_changes(tmp_path):
    K.init_keypair(tmp_path, K.CONTROLLER)
    orin = K.init_keypair(tmp_path / "orin", K.DEVICE)
    phone = K.init_keypair(tmp_path / "phone", K.DEVICE)
    K.list_device(tmp_path, "orin", orin.public_text)
    K.list_device(tmp_path, "phone", str(tmp_path / "phone" / "device.key"))  # a file works
    allowlist = K.Allowlist(tmp_path)
    assert allowlist.reload() and allowlist.names == {orin.public: "orin", phone.public: "phone"}
    assert not allowlist.reload()  # nothing changed on disk
    assert allowlist.callback("multispin", orin.public)
    K.revoke_device(tmp_path, "orin")
    assert allowlist.reload() and allowlist.name_of(orin.public) is None
    assert not allowlist.callback("multispin", orin.public)
    # A key listed after the last look is found by the handshake itself (no 0.5 s wait).
    K.list_device(tmp_path, "orin2", orin.public_text)
    assert allowlist.callback("multispin", orin.public)
    assert allowlist.name_of(orin.public) == "orin2"


def test_listing_refuses_duplicates_bad_names_and_bad_keys(tmp_path):
    K.init_keypair(tmp_path, K.CONTROLLER)
    key = K.init_keypair(tmp_path / "d", K.DEVICE).public_text
    K.list_device(tmp_path, "orin", key)
    with pytest.raises(K.KeyFileError, match="listed already"):
        K.list_device(tmp_path, "orin", K.init_keypair(tmp_path / "e", K.DEVICE).public_text)
    with pytest.raises(K.KeyFileError, match="one key, one device"):
        K.list_device(tmp_path, "other", key)
    for name in ("../evil", "", ".hidden", "a b", "x" * 65):
        with pytest.raises(K.KeyFileError, match="device name"):
            K.list_device(tmp_path, name, key)
    for bad in ("short", "z" * 41, "~" * 40):
        with pytest.raises(K.KeyFileError, match="not a CURVE public key"):
            K.list_device(tmp_path, "fresh", bad)
    with pytest.raises(K.KeyFileError, match="not listed"):
        K.revoke_device(tmp_path, "nobody")


def test_odd_allowlist_entries_are_skipped_never_fatal(tmp_path):
    """What an attack found: a line without '=' (pyzmq raises IndexError), a pipe (open()
    blocks), a link to /dev/zero (endless), a huge file, a file others may write."""
    K.init_keypair(tmp_path, K.CONTROLLER)
    good = K.init_keypair(tmp_path / "d", K.DEVICE)
    other = K.init_keypair(tmp_path / "o", K.DEVICE)
    K.list_device(tmp_path, "good", good.public_text)
    devices = tmp_path / "devices"
    (devices / "broken.key").write_text("curve\n    public-key = \"nope\"\n")
    (devices / "noequals.key").write_text("curve\n    public-key\n")
    os.mkfifo(devices / "fifo.key")
    (devices / "zero.key").symlink_to("/dev/zero")
    (devices / "elsewhere.key").symlink_to(tmp_path / "o" / "device.key")
    (devices / "huge.key").write_text("#" * (K.MAX_FILE_BYTES + 1))
    writable = devices / "writable.key"
    writable.write_text((tmp_path / "o" / "device.key").read_text())
    writable.chmod(0o666)
    allowlist = K.Allowlist(tmp_path)
    allowlist.reload()
    assert allowlist.names == {good.public: "good"}
    assert not allowlist.callback("multispin", other.public)  # and it did not raise
    assert allowlist.callback("multispin", good.public)


def test_a_keys_directory_others_may_write_is_refused(tmp_path):
    K.init_keypair(tmp_path, K.CONTROLLER)
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices").chmod(0o777)
    with pytest.raises(K.KeyFileError, match="chmod go-w"):
        K.load_own_keypair(tmp_path, K.CONTROLLER)


def test_a_key_file_path_of_40_characters_is_read_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = "k" * (40 - len("/device.key")) + "/device.key"  # as long as a Z85 key
    keypair = K.init_keypair(Path(path).parent, K.DEVICE)
    assert len(path) == 40
    assert K.parse_public_key(path) == keypair.public


def test_keys_commands_end_to_end(tmp_path):
    controller_dir, device_dir = tmp_path / "edge", tmp_path / "board"
    init = run("edge-controller", "keys", "init", "--dir", str(controller_dir))
    assert init.returncode == 0, init.stderr
    controller_key = init.stdout.strip()
    assert len(controller_key) == 40
    device = run("device-agent", "keys", "init", "--dir", str(device_dir))
    assert device.returncode == 0, device.stderr
    device_key = device.stdout.strip()
    assert f"edge-controller keys add NAME {device_key}" in device.stderr
    assert run("edge-controller", "keys", "add", "orin-01", device_key,
               "--dir", str(controller_dir)).returncode == 0
    listed = json.loads(run("edge-controller", "keys", "list", "--dir", str(controller_dir),
                            "--json").stdout)
    assert listed == {"controller": controller_key, "devices": {"orin-01": device_key}}
    again = run("edge-controller", "keys", "add", "orin-02", device_key, "--dir",
                str(controller_dir))
    assert again.returncode == 1 and "one key, one device" in again.stderr
    assert run("edge-controller", "keys", "revoke", "orin-01",
               "--dir", str(controller_dir)).returncode == 0
    listed = json.loads(run("edge-controller", "keys", "list", "--dir", str(controller_dir),
                            "--json").stdout)
    assert listed["devices"] == {}


def test_the_zap_thread_survives_a_broken_allowlist(tmp_path):
    """A broken file plus an unknown key's handshake used to kill the authenticator thread:
    every later handshake hung, and closing the transport hung too."""
    from device_agent.link import ControllerLink, KeyRefused
    from edge_controller import protocol as P

    K.init_keypair(tmp_path / "ctl", K.CONTROLLER)
    listed = K.init_keypair(tmp_path / "dev", K.DEVICE)
    K.list_device(tmp_path / "ctl", "dev", listed.public_text)
    transport = Transport("tcp://127.0.0.1:*", tmp_path / "ctl")
    endpoint = transport.open()
    server_key = K.load_own_keypair(tmp_path / "ctl", K.CONTROLLER).public
    try:
        (tmp_path / "ctl" / "devices" / "bad.key").write_text("curve\n    public-key\n")
        stranger = K.CurveClient(K.init_keypair(tmp_path / "x", K.DEVICE), server_key)
        with ControllerLink(endpoint, curve=stranger) as link, pytest.raises(KeyRefused):
            link.send(P.Ping(0.0))
            link.receive(timeout_s=10)
        with ControllerLink(endpoint, curve=K.CurveClient(listed, server_key)) as link:
            link.send(P.Ping(0.0))
            deadline = time.monotonic() + 10
            while (message := transport.receive()) is None:
                assert time.monotonic() < deadline, "a listed device's handshake hung"
                transport.poll(0.1)
            assert message[0].name == "dev"
    finally:
        closer = threading.Thread(target=transport.close, daemon=True)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "closing the transport hung"


def test_transport_refuses_no_keys_and_insecure_off_loopback(tmp_path):
    with pytest.raises(TransportError, match="edge-controller keys init"):
        Transport("tcp://127.0.0.1:5555", None)
    with pytest.raises(TransportError, match="--insecure-anywhere"):
        Transport("tcp://0.0.0.0:5555", None, insecure=True)
    assert not Transport("tcp://0.0.0.0:5555", None, insecure=True,
                         insecure_anywhere=True).secure
    with pytest.raises(K.KeyFileError, match="does not exist"):
        Transport("tcp://127.0.0.1:5555", tmp_path / "missing")
    assert [is_loopback(e) for e in ("tcp://127.0.0.1:1", "tcp://[::1]:1", "tcp://localhost:1",
                                     "ipc:///tmp/x", "tcp://*:1", "tcp://0.0.0.0:1",
                                     "tcp://10.0.0.1:1", "tcp://eth0:1")] == [
        True, True, True, True, False, False, False, False]


def test_start_without_keys_says_how_to_make_them_and_checks_key_modes(tmp_path):
    bare = run("edge-controller", "start", "--bind", "tcp://127.0.0.1:0")
    assert bare.returncode == 2
    assert "edge-controller keys init --dir DIR" in bare.stderr
    K.init_keypair(tmp_path, K.CONTROLLER)
    (tmp_path / "controller.key_secret").chmod(0o644)
    loose = run("edge-controller", "start", "--keys", str(tmp_path))
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    anywhere = run("edge-controller", "start", "--insecure", "--bind", "tcp://0.0.0.0:0")
    assert anywhere.returncode == 2 and "--insecure-anywhere" in anywhere.stderr


def test_agent_needs_keys_or_insecure(tmp_path):
    for args, expect in [((), "--keys DIR"), (("--keys", str(tmp_path)), "--controller-key"),
                         (("--insecure", "--keys", str(tmp_path)), "without --keys")]:
        proc = run("device-agent", "generate", "--controller", "tcp://127.0.0.1:9",
                   "--prompt", "hi", *args)
        assert proc.returncode == 2, proc.stderr
        assert expect in proc.stderr


def test_a_file_revoked_mid_scan_drops_only_itself(tmp_path, monkeypatch):
    K.init_keypair(tmp_path, K.CONTROLLER)
    for name in ("a", "c"):
        K.list_device(tmp_path, name, K.init_keypair(tmp_path / name, K.DEVICE).public_text)
    allowlist = K.Allowlist(tmp_path)
    real_glob = type(allowlist.directory).glob
    vanished = allowlist.directory / "b.key"  # listed by glob, gone before its stat

    def glob(self, pattern):
        return [*real_glob(self, pattern), vanished]

    monkeypatch.setattr(type(allowlist.directory), "glob", glob)
    allowlist.reload()
    assert sorted(allowlist.names.values()) == ["a", "c"]


def test_public_keys_never_start_like_an_option(tmp_path):
    """A Z85 key starting with "-" broke `--controller-key KEY` (argparse took it for an
    option), one key in 85; keys init makes keypairs until it does not."""
    for i in range(300):
        assert not K.init_keypair(tmp_path / str(i), K.DEVICE).public_text.startswith("-")
