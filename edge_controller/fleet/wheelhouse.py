"""The offline install set: every wheel a board's agent needs, assembled on the edge.

Boards in the field often have no route to a package index, so the edge (which has one,
or a pip cache) assembles a *wheelhouse* per board platform and pushes it; the board runs
``pip install --no-index --find-links``. What goes in: the project's own wheel and the
``device`` extra's packages at the versions installed on the edge (the versions its
tests ran), with their dependencies; for a board whose draft is an ONNX model, the
``onnx`` extra's too (ONNX Runtime and onnxruntime-genai: a wheelhouse of its own,
``<platform>-onnx``, so that llama.cpp boards do not carry them).

- A board of the edge's own platform (OS, architecture, Python tag) gets the wheels this
  edge already has, llama-cpp-python included (the set-up built it once; pip's cache
  keeps it): ``pip wheel`` collects them.
- Another platform gets binary wheels for its tags (``pip download --platform``) and
  llama-cpp-python as a source distribution with its build requirements; the first board
  of that platform builds it (on a Jetson with ``CMAKE_ARGS="-DGGML_CUDA=on
  -DCMAKE_CUDA_ARCHITECTURES=<probed>"``), and the edge keeps that wheel for the others
  (:func:`keep_built`). No board of another platform exists in this project's tests:
  docs/fleet.md says which steps could not be exercised.

Wheelhouses are cached under the user cache directory, per platform; their *digest*
hashes what the wheels hold (not their zip timestamps), so a rebuilt but identical
project wheel does not make a deploy think anything changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_controller.fleet.probe import BoardFacts
from edge_controller.fleet.remote import BoardError

log = logging.getLogger(__name__)

PROJECT = "multispin-edge"
DEVICE_PACKAGES = ("llama-cpp-python", "pyzmq", "msgpack", "psutil", "numpy",
                   "prometheus-client")  # the [device] extra, pinned to the edge's versions
ONNX_PACKAGES = ("onnxruntime", "onnxruntime-genai")  # the [onnx] extra, for ONNX drafts
LLAMA = "llama-cpp-python"
PINS_STAMP = ".pins"  # in a wheelhouse: the pins its dependencies were collected for
LLAMA_BUILD_REQUIREMENTS = ("scikit-build-core[pyproject]", "cmake", "ninja")
ROOT = Path(__file__).resolve().parents[2]  # the project's source tree (pyproject.toml)
BUILD_LEFTOVERS = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
PLATFORM = re.compile(r"[a-z]{1,32}-[a-z0-9_]{1,32}-cp\d{2,4}(-cuda\d{2,3})?")
BUILT_WHEEL = re.compile(r"llama_cpp_python-(\d+\.\d+\.\d+)-[\w.]+-[\w.]+-[\w.]+\.whl")
BUILT_MEMBERS = re.compile(r"(llama_cpp/|llama_cpp_python-[\w.]+\.dist-info/|bin/|include/|lib/)")


@dataclass
class Wheelhouse:
    directory: Path
    digest: str  # of what the wheels hold: unchanged digest, nothing to install
    llama_source: bool  # llama-cpp-python is a source distribution: build on the board
    onnx: bool = False  # holds the [onnx] extra's packages: install multispin-edge[device,onnx]

    @property
    def extras(self) -> str:
        return "device,onnx" if self.onnx else "device"


def edge_platform() -> str:
    return (f"{platform.system().lower()}-{platform.machine()}-"
            f"cp{sys.version_info.major}{sys.version_info.minor}")


def pins(onnx: bool = False) -> list[str]:
    """The device extra's packages (and with ``onnx`` the onnx extra's) at the versions
    installed here."""
    names = DEVICE_PACKAGES + ONNX_PACKAGES if onnx else DEVICE_PACKAGES
    try:
        return [f"{name}=={importlib.metadata.version(name)}" for name in names]
    except importlib.metadata.PackageNotFoundError as exc:
        raise BoardError(f"{exc.name} is not installed on the edge: pip install "
                         "'multispin-edge[onnx]' there to deploy ONNX drafts") from None


def wheelhouse_key(facts: BoardFacts, cuda: bool, onnx: bool) -> str:
    """The wheelhouse's name under the cache: the platform, and whether it holds ONNX."""
    return platform_of(facts, cuda) + ("-onnx" if onnx else "")


def llama_build_env(facts: BoardFacts) -> dict[str, str]:
    """What building llama-cpp-python on this board needs in its environment."""
    if not facts.gpu_arch:
        return {}
    return {"CMAKE_ARGS": f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={facts.gpu_arch}",
            "CUDACXX": "/usr/local/cuda/bin/nvcc"}


def needs_build(facts: BoardFacts, cuda: bool) -> bool:
    """Does this board need a llama-cpp-python built for it (not the edge's wheel)?"""
    return (cuda and bool(facts.gpu_arch)) or platform_of(facts, cuda) != edge_platform()


def platform_of(facts: BoardFacts, cuda: bool) -> str:
    key = facts.platform if cuda else facts.platform.split("-cuda")[0]
    if not PLATFORM.fullmatch(key):  # it names directories under the cache
        raise BoardError(f"the board's platform {key!r} is not one this tool knows")
    return key


def project_wheel(cache: Path) -> Path:
    """The project's own wheel, built from a clean copy of this source tree (once per
    deploy run): setuptools builds in the tree's build/, where files of modules since
    removed would stay and be packaged, and concurrent builds would collide."""
    directory = cache / "wheelhouse" / "project"
    shutil.rmtree(directory, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(directory), str(source),
             what="building the project's wheel")
    (wheel,) = directory.glob("multispin_edge-*.whl")
    return wheel


def kept_wheels(cache: Path, facts: BoardFacts, cuda: bool) -> list[Path]:
    """llama-cpp-python wheels a board of this platform built before."""
    built = cache / "wheelhouse" / "built" / platform_of(facts, cuda)
    return sorted(built.glob("llama_cpp_python-*.whl")) if built.is_dir() else []


def planned(cache: Path, facts: BoardFacts, cuda: bool, onnx: bool = False) -> Wheelhouse:
    """What :func:`assemble` would give, changing nothing (a dry run): the cached
    wheelhouse with this tree's project wheel (built aside) if the platform has one, else
    a digest that matches no board."""
    directory = cache / "wheelhouse" / wheelhouse_key(facts, cuda, onnx)
    llama_source = needs_build(facts, cuda) and not kept_wheels(cache, facts, cuda)
    if not _has_dependencies(directory, onnx):
        return Wheelhouse(directory, "(to assemble)", llama_source, onnx)
    with tempfile.TemporaryDirectory() as tmp:
        project = project_wheel(Path(tmp))
        files = [p for p in directory.iterdir() if not p.name.startswith(("multispin_edge-",
                                                                           "."))]
        return Wheelhouse(directory, digest([*files, project]), llama_source, onnx)


def assemble(cache: Path, facts: BoardFacts, cuda: bool, project: Path,
             onnx: bool = False) -> Wheelhouse:
    """The wheelhouse for a board's platform (with ``onnx``: and ONNX Runtime), with the
    ``project`` wheel."""
    directory = cache / "wheelhouse" / wheelhouse_key(facts, cuda, onnx)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("multispin_edge-*.whl"):
        old.unlink()
    shutil.copy2(project, directory / project.name)
    kept = kept_wheels(cache, facts, cuda)
    for wheel in kept:  # a board of this platform built it before
        shutil.copy2(wheel, directory / wheel.name)
    if not _has_dependencies(directory, onnx):  # else there from an earlier deploy
        if needs_build(facts, cuda):
            _download_for(directory, facts, pins(onnx), skip_llama=bool(kept))
        else:
            _pip("wheel", "-w", str(directory), "--find-links", str(directory), *pins(onnx),
                 what="collecting the device's wheels")
        (directory / PINS_STAMP).write_text("\n".join(pins(onnx)))
    llama_source = needs_build(facts, cuda) and not kept
    return Wheelhouse(directory, digest(list(directory.iterdir())), llama_source, onnx)


def _has_dependencies(directory: Path, onnx: bool) -> bool:
    """The wheelhouse holds the dependencies at this edge's pins (its stamp says so)."""
    stamp = directory / PINS_STAMP
    return stamp.is_file() and stamp.read_text() == "\n".join(pins(onnx))


def _download_for(directory: Path, facts: BoardFacts, pinned: list[str],
                  skip_llama: bool) -> None:
    """Wheels for another platform's tags, and llama-cpp-python's source to build there."""
    major, minor = facts.python.split(".")[:2]
    tags = ["--only-binary=:all:", "--implementation", "cp", "--python-version",
            f"{major}.{minor}", "--platform", f"manylinux2014_{facts.arch}",
            "--platform", f"manylinux_2_28_{facts.arch}", "--platform", f"linux_{facts.arch}"]
    others = [p for p in pinned if not p.startswith(LLAMA)]
    _pip("download", "-d", str(directory), *tags, *others, *LLAMA_BUILD_REQUIREMENTS,
         what=f"downloading wheels for {facts.platform}")
    if not skip_llama:
        llama = next(p for p in pinned if p.startswith(LLAMA))
        _pip("download", "-d", str(directory), "--no-deps", "--no-binary", ":all:", llama,
             what="downloading llama-cpp-python's source")
        # Its own dependencies (jinja2, diskcache, ...) as wheels for the board.
        _pip("download", "-d", str(directory), *tags, "jinja2", "diskcache",
             "typing-extensions", what="downloading llama-cpp-python's dependencies")


def check_built(name: str, wheel: Path | None = None) -> None:
    """A llama-cpp-python wheel a board built, before the edge keeps it for other boards
    (a board that lies must not reach the others): the pinned version, a plain file name,
    and only llama.cpp's own files inside (no .pth, nothing that runs at start-up)."""
    pinned = importlib.metadata.version(LLAMA)
    match = BUILT_WHEEL.fullmatch(name)
    if match is None or match.group(1) != pinned:
        raise BoardError(f"the board built {name!r}, not a llama-cpp-python {pinned} wheel")
    if wheel is None:
        return
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BoardError(f"the board's llama-cpp-python wheel is not a wheel: {exc}") from None
    odd = [m for m in members if not BUILT_MEMBERS.match(m) or ".." in m or m.endswith(".pth")]
    if odd:
        raise BoardError(f"the board's llama-cpp-python wheel holds {odd[:3]}: not kept")


def keep_built(cache: Path, facts: BoardFacts, cuda: bool, wheel: Path) -> None:
    """Keep a wheel a board built for its platform (checked): the next board of that kind
    reuses it."""
    check_built(wheel.name, wheel)
    built = cache / "wheelhouse" / "built" / platform_of(facts, cuda)
    built.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, built / wheel.name)


def digest(files: list[Path]) -> str:
    """What a wheelhouse holds: names and member contents, not zip timestamps."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        if path.name.startswith("."):
            continue
        h.update(path.name.encode())
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                for info in sorted(wheel.infolist(), key=lambda i: i.filename):
                    if not info.filename.endswith("/RECORD"):  # RECORD hashes the rest
                        h.update(info.filename.encode())
                        h.update(hashlib.sha256(wheel.read(info)).digest())
        else:
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _pip(*args: str, what: str) -> None:
    command = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BoardError(f"{what} on the edge failed: {tail}")
