"""What a board is: one shell script run over SSH, its ``key=value`` lines parsed.

The script reads only paths and tools that exist on a plain Linux board or a Jetson:
``uname``, the interpreter named in the inventory, ``df`` of the home, ``/proc/meminfo``,
``/etc/nv_tegra_release`` (L4T, hence JetPack), ``nvcc --version`` (CUDA) and, where
there is no nvidia-smi, the GPU architecture that the L4T release implies. A test board
provides the same paths: ``$MULTISPIN_PROBE_ROOT`` (unset on a real board) is put before
``/etc/nv_tegra_release``, so a test board's sshd can point it at a fixture tree
(edge_controller/fleet/lab.py names its Jetson files as fixtures).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass

# L4T major release -> (JetPack line, CUDA architecture of its GPUs).
L4T_RELEASES = {
    "36": ("JetPack 6", "87"),  # Orin (Nano, NX, AGX)
    "35": ("JetPack 5", "87"),  # Orin; Xavier boards on R35 are sm_72 (see gpu_arch below)
    "34": ("JetPack 5 (developer preview)", "87"),
    "32": ("JetPack 4", "72"),  # Xavier (sm_72); Nano and TX1 are sm_53, TX2 sm_62
}
SOC_ARCH = {"t194": "72", "t234": "87", "t210": "53", "t186": "62"}  # from nv_tegra_release


def probe_script(python: str) -> str:
    """The shell script whose output :func:`parse_probe` reads."""
    py = shlex.quote(python)
    return "\n".join([
        'echo "os=$(uname -s)"',
        'echo "arch=$(uname -m)"',
        'echo "kernel=$(uname -r)"',
        f'echo "python=$({py} -c \'import sys; print("%d.%d.%d" % sys.version_info[:3])\' '
        '2>/dev/null)"',
        f'echo "python_path=$(command -v {py})"',
        'echo "disk_free_kb=$(df -Pk "$HOME" | awk \'NR==2 {print $4}\')"',
        'echo "mem_total_kb=$(awk \'/^MemTotal:/ {print $2}\' /proc/meminfo)"',
        'echo "mem_available_kb=$(awk \'/^MemAvailable:/ {print $2}\' /proc/meminfo)"',
        'echo "cpus=$(getconf _NPROCESSORS_ONLN)"',
        'echo "systemd=$(test -d /run/systemd/system && echo yes || echo no)"',
        'TEGRA="${MULTISPIN_PROBE_ROOT:-}/etc/nv_tegra_release"',
        'if [ -r "$TEGRA" ]; then echo "tegra=$(head -n 1 "$TEGRA")"; fi',
        'DT="${MULTISPIN_PROBE_ROOT:-}/proc/device-tree/compatible"',
        'if [ -r "$DT" ]; then echo "compatible=$(tr \'\\0\' \' \' < "$DT")"; fi',
        'NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)',
        'if [ -n "$NVCC" ]; then echo "cuda=$("$NVCC" --version | '
        'sed -n \'s/.*release \\([0-9.]*\\).*/\\1/p\')"; fi',
        'if command -v nvidia-smi >/dev/null; then echo "gpu_arch=$(nvidia-smi '
        '--query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)"; fi',
    ])


@dataclass
class BoardFacts:
    os: str = ""
    arch: str = ""
    kernel: str = ""
    python: str = ""  # X.Y.Z of the inventory's interpreter; "" = not found
    python_path: str = ""
    disk_free_mb: int = 0
    mem_total_mb: int = 0
    mem_available_mb: int = 0
    cpus: int = 1
    systemd: bool = False  # systemd runs the board (PID 1)
    l4t: str = ""  # e.g. "36.3.0" on a Jetson; "" elsewhere
    jetpack: str = ""
    soc: str = ""  # t234 (Orin), t194 (Xavier), ...
    cuda: str = ""  # nvcc's release, e.g. "12.2"
    gpu_arch: str = ""  # CUDA architecture, e.g. "87"

    @property
    def jetson(self) -> bool:
        return bool(self.l4t)

    @property
    def python_tag(self) -> str:
        """cp311 for 3.11.x: which wheels fit the board."""
        major, minor = self.python.split(".")[:2]
        return f"cp{major}{minor}"

    @property
    def platform(self) -> str:
        """What a wheelhouse is built for: os-arch-python (and the CUDA arch, on Jetson)."""
        tail = f"-cuda{self.gpu_arch}" if self.gpu_arch else ""
        return f"{self.os.lower()}-{self.arch}-{self.python_tag}{tail}"

    def to_dict(self) -> dict:
        return asdict(self)


# What each fact may look like: a board's answer names directories on the edge (its
# platform's wheelhouse), so anything else is dropped, never trusted.
FACT_PATTERNS = {
    "os": r"[A-Za-z]{1,32}", "arch": r"[a-z0-9_]{1,32}", "kernel": r"[\w.+-]{1,128}",
    "python": r"\d{1,2}\.\d{1,3}\.\d{1,3}", "python_path": r"/[\w./+-]{0,255}",
    "disk_free_kb": r"\d{1,18}", "mem_total_kb": r"\d{1,18}", "mem_available_kb": r"\d{1,18}",
    "cpus": r"\d{1,4}", "systemd": r"yes|no", "tegra": r"[\w ,.:()#/+-]{1,300}",
    "compatible": r"[\w ,.+-]{1,500}", "cuda": r"\d{1,3}(\.\d{1,3}){0,2}",
    "gpu_arch": r"\d{2,3}",
}


def parse_probe(text: str) -> BoardFacts:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        value = value.strip()
        if sep and key in FACT_PATTERNS and re.fullmatch(FACT_PATTERNS[key], value):
            values[key] = value
    facts = BoardFacts(
        os=values.get("os", ""), arch=values.get("arch", ""), kernel=values.get("kernel", ""),
        python=values.get("python", ""), python_path=values.get("python_path", ""),
        disk_free_mb=_int(values.get("disk_free_kb")) // 1024,
        mem_total_mb=_int(values.get("mem_total_kb")) // 1024,
        mem_available_mb=_int(values.get("mem_available_kb")) // 1024,
        cpus=max(1, _int(values.get("cpus"))), systemd=values.get("systemd") == "yes",
        cuda=values.get("cuda", ""), gpu_arch=values.get("gpu_arch", ""),
    )
    # "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, ..."
    # (R32: "BOARD: t210ref"; R35/36 boards say "generic": Orin, by default)
    tegra = values.get("tegra", "")
    if release := re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", tegra):
        major = release.group(1)
        facts.l4t = f"{major}.{release.group(2)}"
        facts.jetpack, default_arch = L4T_RELEASES.get(major, (f"L4T R{major}", ""))
        # The SoC: the device tree says it on every release ("nvidia,tegra234"); R32's
        # release line does too ("BOARD: t210ref"). R35 runs Xavier (t194) and Orin.
        compatible = values.get("compatible", "")
        if soc := (re.search(r"nvidia,tegra(\d{3})", compatible)
                   or re.search(r"BOARD: t(\d{3})", tegra)):
            facts.soc = f"t{soc.group(1)}"
        facts.gpu_arch = facts.gpu_arch or SOC_ARCH.get(facts.soc, default_arch)
    return facts


def _int(text: str | None) -> int:
    return int(text) if text and text.strip().isdigit() else 0
