"""device_agent.supervise: a unit's service run without systemd (the fleet lab's boards)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from device_agent.supervise import main, running_pid


def test_start_status_stop_a_unit(tmp_path, capsys):
    marker = tmp_path / "100%"
    unit = tmp_path / "sleeper.service"
    unit.write_text(
        "[Unit]\nDescription=test\n[Service]\n"
        f"ExecStart={sys.executable} -c \"import os, time; open(os.environ['MARK'], 'w'); "
        "time.sleep(60)\"\n"
        f"Environment=MARK={tmp_path}/100%%\nWorkingDirectory={tmp_path}\n"
        "TimeoutStopSec=5s\n")
    assert main(["start", str(unit)]) == 0
    pid = running_pid(unit)
    assert pid is not None
    deadline = time.monotonic() + 10
    while not marker.exists():  # %% is systemd's escaped %
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert main(["start", str(unit)]) == 0 and running_pid(unit) == pid  # once only
    assert main(["status", str(unit)]) == 0
    assert main(["stop", str(unit)]) == 0
    assert running_pid(unit) is None and main(["status", str(unit)]) == 3


def test_a_pid_file_naming_another_process_is_not_trusted(tmp_path):
    """A pid reused by another process (or a forged pid file) is never signalled."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        unit = tmp_path / "x.service"
        unit.write_text("[Service]\nExecStart=/bin/true\n")
        unit.with_suffix(".pid").write_text(f"{other.pid} 1")  # wrong start time
        assert running_pid(unit) is None
        assert main(["stop", str(unit)]) == 0
        assert other.poll() is None  # untouched
    finally:
        other.kill()
        other.wait()
    assert os.path.exists(unit)
