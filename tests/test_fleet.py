"""``edge-controller fleet`` against real SSH servers: one ``sshd`` per network namespace,
each board its own user and home, no route to any package index (the install is offline
by construction). One board carries a Jetson identity fixture (nv_tegra_release, a fake
nvcc: named as such); the CUDA build of llama-cpp-python cannot run here, so that board
says ``llama_cuda = "off"`` and gets the platform's CPU wheel (docs/fleet.md), while a
dry run shows the CUDA build it would do. systemd is not PID 1 here: the agents run
under ``device_agent.supervise``, which runs the unit's ExecStart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_controller.launch import BIN, LabKeys, controller_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and users need root"),
]

PROMPT = "The three most important inventions of the last century are"


def ensure_sshd() -> None:
    """CI installs openssh-server here rather than skipping these tests."""
    if Path("/usr/sbin/sshd").exists():
        return
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, timeout=600, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
        subprocess.run(install, check=True, capture_output=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def lab(default_models):
    from edge_controller.fleet.lab import FleetLab, cleanup_stale

    ensure_sshd()
    cleanup_stale()
    with FleetLab(boards=4, jetson=(1,)) as lab:
        yield lab


@pytest.fixture(scope="module")
def cache(tmp_path_factory, lab):
    """The edge's wheelhouse, assembled where the index is reachable (this namespace):
    deploys in the hub namespace then find it."""
    from edge_controller.fleet.probe import parse_probe, probe_script
    from edge_controller.fleet.wheelhouse import assemble, project_wheel

    out = subprocess.run(["sh", "-c", probe_script("/usr/bin/python3")], capture_output=True,
                         text=True, check=True).stdout
    cache = tmp_path_factory.mktemp("edge-cache")
    project = project_wheel(cache)
    for onnx in (False, True):  # llama.cpp boards, and a board whose draft is ONNX
        assemble(cache, parse_probe(out), cuda=False, project=project, onnx=onnx)
    return cache


@pytest.fixture(scope="module")
def controller(lab, tmp_path_factory):
    keys = LabKeys(tmp_path_factory.mktemp("keys"))

    def in_hub(argv, **kwargs):
        return subprocess.Popen(lab.in_hub(argv), **kwargs)

    with controller_process(tmp_path_factory.mktemp("log") / "controller.log", keys,
                            "--policy", "fixed", endpoint=f"tcp://{lab.hub_address}:5555",
                            spawn=in_hub) as process:
        yield keys, process


def inventory(lab, keys: LabKeys, path: Path, boards=None, overrides=None) -> Path:
    return lab.inventory(path, keys.controller_dir, boards, overrides)


def fleet(lab, cache: Path, *args: str) -> tuple[int, list[dict], str]:
    return lab.fleet(cache, *args)


def complete(lab, board) -> dict:
    """One greedy completion through the board's own API, from inside the board."""
    code = ("import json, sys, urllib.request\n"
            "models = json.load(urllib.request.urlopen('http://127.0.0.1:8080/v1/models'))\n"
            "body = {'model': models['data'][0]['id'], 'prompt': sys.argv[1], 'max_tokens': 16,"
            " 'temperature': 0}\n"
            "request = urllib.request.Request('http://127.0.0.1:8080/v1/completions', "
            "json.dumps(body).encode(), {'Content-Type': 'application/json'})\n"
            "print(urllib.request.urlopen(request, timeout=120).read().decode())")
    out = subprocess.run(lab.in_board(board, [sys.executable, "-c", code, PROMPT]),
                         capture_output=True, text=True, timeout=180, check=True)
    return json.loads(out.stdout)


def test_deploy_three_boards_then_unchanged_then_uninstall(lab, cache, controller, tmp_path,
                                                          target, default_models):
    """Board b2 drafts with ONNX Runtime: its wheelhouse holds it, its draft is a directory."""
    from device_agent.drafter import Drafter
    from edge_controller.fleet.deploy import UNIT
    from models.target import reference_greedy

    keys, _ = controller
    path = inventory(lab, keys, tmp_path / "fleet.toml", boards=[0, 1, 2],
                     overrides={2: {"draft": "onnx"}})
    drafter = Drafter(default_models.drafts["q4_0"])
    ids, _ = reference_greedy(target, drafter.tokenize(PROMPT), 16)
    want = drafter.detokenize(ids).decode()  # the target alone's text, as a board decodes it

    code, reports, log = fleet(lab, cache, "deploy", str(path), "--dry-run")
    assert code == 0, log
    assert [r["status"] for r in reports] == ["would change"] * 3
    assert not (lab.boards[0].home / "multispin-agent").exists()  # nothing changed
    assert not (keys.controller_dir / "devices").exists()

    code, reports, log = fleet(lab, cache, "deploy", str(path))
    assert code == 0, log
    by_name = {r["board"]: r for r in reports}
    assert all(r["status"] == "deployed" for r in reports), log
    assert by_name["b1"]["facts"]["jetpack"] == "JetPack 6"  # the Jetson fixture, probed
    assert by_name["b1"]["facts"]["gpu_arch"] == "87"
    assert by_name["b1"]["facts"]["cuda"] == "12.2"
    assert all(r["draft_tok_s"] and r["draft_tok_s"] > 0 for r in reports)
    assert "onnxruntime-genai" in by_name["b2"]["versions"]
    assert "onnxruntime-genai" not in by_name["b0"]["versions"]
    assert all("llama-cpp-python" in r["versions"] for r in reports)
    onnx_dir = lab.boards[2].home / "multispin-agent" / "models" / \
        "smollm2-135m-instruct-onnx-int4"
    assert (onnx_dir / "genai_config.json").is_file() and (onnx_dir / "model.onnx").is_file()
    for board in lab.boards[:3]:
        root = board.home / "multispin-agent"
        assert (root / UNIT).is_file() and (root / "keys" / "device.key_secret").is_file()
        assert (keys.controller_dir / "devices" / f"{board.name}.key").is_file()
        answer = complete(lab, board)
        assert answer["choices"][0]["text"] == want
    # The boards' secret keys never left them: the edge holds only its own.
    assert [p.name for p in keys.controller_dir.rglob("*.key_secret")] == \
        ["controller.key_secret"]
    first_s = max(r["seconds"] for r in reports)

    code, reports, log = fleet(lab, cache, "deploy", str(path))
    assert code == 0, log
    assert [r["status"] for r in reports] == ["unchanged"] * 3, log
    assert max(r["seconds"] for r in reports) < first_s

    code, reports, log = fleet(lab, cache, "status", str(path))
    assert code == 0 and [r["status"] for r in reports] == ["registered"] * 3, log
    code, _, log = fleet(lab, cache, "logs", str(path), "b0", "--lines", "50")
    assert code == 0 and "serving" in log

    code, reports, log = fleet(lab, cache, "uninstall", str(path))
    assert code == 0 and [r["status"] for r in reports] == ["removed"] * 3, log
    for board in lab.boards[:3]:
        assert not (board.home / "multispin-agent").exists()
        assert not (keys.controller_dir / "devices" / f"{board.name}.key").exists()
        assert not alive_processes(board.user)


def alive_processes(user: str) -> list[str]:
    """The user's processes that still run (exited ones this container's init has not
    reaped yet are gone for our purpose)."""
    out = subprocess.run(["ps", "-o", "stat=,pid=,args=", "-u", user], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if line.strip() and not line.startswith("Z")]


def test_unreachable_and_bad_host_key_boards_fail_alone(lab, cache, controller, tmp_path):
    keys, _ = controller
    bad_known_hosts = tmp_path / "known_hosts"
    other = lab.known_hosts.read_text().splitlines()
    # Board 3's address with board 0's key: what a man in the middle (or a reinstall) shows.
    bad_known_hosts.write_text(f"{lab.boards[3].address} {other[0].split(' ', 1)[1]}\n")
    path = inventory(lab, keys, tmp_path / "fleet.toml", boards=[0, 3],
                     overrides={3: {"known_hosts": str(bad_known_hosts)}})
    path.write_text(path.read_text() + "\n[[board]]\nname = \"gone\"\nhost = \"10.233.0.250\"\n"
                    "user = \"nobody\"\n")
    code, reports, log = fleet(lab, cache, "deploy", str(path))
    by_name = {r["board"]: r for r in reports}
    assert code == 1, log
    assert by_name["b0"]["status"] == "deployed", log  # the others failing stopped nothing
    assert by_name["b3"]["status"] == "failed" and "host key" in by_name["b3"]["why"]
    assert by_name["gone"]["status"] == "failed" and "cannot reach" in by_name["gone"]["why"]

    # --accept-new trusts a board seen for the first time (and writes its key down), but
    # never a board whose key changed.
    unknown = tmp_path / "empty_known_hosts"
    unknown.write_text("")
    path = inventory(lab, keys, tmp_path / "fleet2.toml", boards=[0, 3],
                     overrides={0: {"known_hosts": str(unknown)},
                                3: {"known_hosts": str(bad_known_hosts)}})
    code, reports, log = fleet(lab, cache, "status", str(path), "--accept-new")
    by_name = {r["board"]: r for r in reports}
    assert by_name["b0"]["status"] == "registered", log  # deployed above
    assert "TRUSTED ON FIRST USE" in log
    assert unknown.read_text().startswith(lab.boards[0].address + " ssh-ed25519 ")
    assert by_name["b3"]["status"] == "failed" and "host key" in by_name["b3"]["why"]


def test_a_jetson_board_dry_run_shows_its_cuda_build(lab, cache, controller, tmp_path):
    keys, _ = controller
    path = inventory(lab, keys, tmp_path / "fleet.toml", boards=[1],
                     overrides={1: {"llama_cuda": "auto"}})
    code, reports, log = fleet(lab, cache, "deploy", str(path), "--dry-run")
    assert code == 0, log
    (report,) = reports
    assert report["status"] == "would change"
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87" in report["why"]


def test_the_lab_boards_have_no_route_out(lab):
    out = subprocess.run(lab.in_board(lab.boards[0], ["ip", "route"]), capture_output=True,
                         text=True, check=True).stdout
    assert "default" not in out


def test_the_example_inventory_loads(tmp_path):
    from edge_controller.fleet.inventory import load_fleet
    from edge_controller.keys import CONTROLLER, init_keypair

    keys = tmp_path / "keys"
    public = init_keypair(keys, CONTROLLER).public_text
    example = Path(__file__).parent.parent / "configs" / "fleet.example.toml"
    text = example.read_text().replace('config = "controller.toml"', f'keys_dir = "{keys}"')
    (tmp_path / "fleet.toml").write_text(text)
    fleet = load_fleet(tmp_path / "fleet.toml")
    assert [b.name for b in fleet.boards] == ["orin-nano-1", "orin-nano-2", "agx-orin-1"]
    assert fleet.boards[2].threads == 8 and fleet.boards[0].service == "user"
    assert fleet.controller_key == public


@pytest.mark.parametrize("board, said", [
    ('name = "a b"\nhost = "h"', "not a valid device name"),
    ('name = "a"', "host required"),
    ('name = "a"\nhost = "h"\nservice = "cron"', "service must be one of"),
    ('name = "a"\nhost = "h"\nport = 0', "port must be"),
    ('name = "a"\nhost = "h"\ninstall_dir = "/opt/x"', "relative to the user's home"),
    ('name = "a"\nhost = "h"\nthreads = "four"', "threads must be a int"),
    ('name = "a"\nhost = "h"\nflavour = 1', r"unknown key board\[0\]\.flavour"),
    ('name = "a"\nhost = "h"\ncontroller = "h:1"', "controller must be tcp://"),
])
def test_a_bad_inventory_is_refused_with_the_key_named(tmp_path, board, said):
    from edge_controller.config import ConfigError
    from edge_controller.fleet.inventory import load_fleet
    from edge_controller.keys import CONTROLLER, init_keypair

    init_keypair(tmp_path / "keys", CONTROLLER)
    path = tmp_path / "fleet.toml"
    path.write_text(f'[defaults]\ncontroller = "tcp://e:5555"\n[controller]\n'
                    f'keys_dir = "{tmp_path / "keys"}"\n[[board]]\n{board}\n')
    with pytest.raises(ConfigError, match=said):
        load_fleet(path)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("service", ["user", "system"])
def test_the_units_a_deploy_writes_verify(tmp_path, service):
    from edge_controller.fleet.deploy import Paths, agent_unit
    from edge_controller.fleet.inventory import Board

    paths = Paths(str(tmp_path), "multispin-agent")
    Path(paths.bin).mkdir(parents=True)
    Path(paths.bin, "device-agent").symlink_to(BIN / "device-agent")
    board = Board("b", "h", controller="tcp://e:5555", service=service)
    unit = tmp_path / "device-agent.service"
    unit.write_text(agent_unit(board, paths, "jetson"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    command = ["systemd-analyze", *(["--user"] if service == "user" else []), "verify", str(unit)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    problems = [line for line in proc.stderr.splitlines() if unit.name in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_a_boards_answers_are_not_trusted(tmp_path, monkeypatch):
    """What a compromised board could say: paths in its facts, a wheel for the others
    with a start-up hook, a path instead of a key, terminal escapes."""
    import importlib.metadata
    import zipfile

    from edge_controller.fleet.deploy import printable
    from edge_controller.fleet.probe import parse_probe
    from edge_controller.fleet.remote import BoardError
    from edge_controller.fleet.wheelhouse import check_built
    from edge_controller.keys import KeyFileError, parse_public_key

    facts = parse_probe("os=Linux\narch=x86_64/../..\npython=3.11.2\ngpu_arch=/../../.ssh\n")
    assert (facts.arch, facts.gpu_arch, facts.python) == ("", "", "3.11.2")

    version = importlib.metadata.version("llama-cpp-python")
    for name in (f"llama_cpp_python-/../../x-{version}-py3-none-any.whl",
                 "llama_cpp_python-0.0.1-py3-none-any.whl"):
        with pytest.raises(BoardError):
            check_built(name)
    hooked = tmp_path / f"llama_cpp_python-{version}-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(hooked, "w") as wheel:
        wheel.writestr("llama_cpp/__init__.py", "")
        wheel.writestr("evil.pth", "import os")
    with pytest.raises(BoardError, match="evil.pth"):
        check_built(hooked.name, hooked)

    # A board's "key" that names a file here is taken as key text, never read.
    monkeypatch.chdir(tmp_path)
    name = "k" * 36 + ".key"
    (tmp_path / name).write_text("public-key = \"" + "a" * 40 + "\"")
    assert parse_public_key(name, files=False) == name.encode()
    with pytest.raises(KeyFileError):
        parse_public_key("/etc/passwd", files=False)
    assert printable("ok\x1b]0;owned\x07") == "ok\\x1b]0;owned\\x07"
