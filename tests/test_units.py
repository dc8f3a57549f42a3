"""The systemd units in configs/ pass ``systemd-analyze verify`` (systemd is not PID 1
here: verify checks a unit's syntax, directives and that its command exists)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN

ROOT = Path(__file__).resolve().parent.parent
UNITS = [  # unit file, the install path of its docs to point at this checkout, --user
    ("edge-controller.service", "/opt/multispin/.venv/bin", False),
    ("device-agent.service", "/opt/multispin-agent/.venv/bin", False),
    ("device-agent.user.service", "%h/multispin-agent/.venv/bin", True),
]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("name, install, user", UNITS)
def test_the_systemd_unit_verifies(tmp_path, name, install, user):
    unit = (ROOT / "configs" / name).read_text()
    assert install in unit
    path = tmp_path / name.replace(".user", "")
    path.write_text(unit.replace(install, str(BIN)))
    command = ["systemd-analyze", *(["--user"] if user else []), "verify", str(path)]
    runtime = tmp_path / "run"  # a user manager needs its runtime directory
    runtime.mkdir(mode=0o700)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    problems = [line for line in proc.stderr.splitlines() if path.name in line]
    assert proc.returncode == 0 and not problems, proc.stderr
