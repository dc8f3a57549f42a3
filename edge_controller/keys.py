"""CURVE key files and the controller's allowlist, shared by both sides (imports only zmq).

Files are pyzmq's ZPL certificates, as ``zmq.auth.create_certificates`` writes them: a
public ``NAME.key`` and a secret ``NAME.key_secret`` (written with mode 0600 and refused at
load when group or others may read it). Layouts (docs/security.md)::

    controller keys dir                  device keys dir
      controller.key                       device.key
      controller.key_secret  (0600)        device.key_secret  (0600)
      devices/NAME.key      (allowlist: one public key per listed device)

A device's name is the file name its public key is listed under, nothing it says itself.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from edge_controller.protocol import DEVICE_NAME

log = logging.getLogger(__name__)

CONTROLLER = "controller"
DEVICE = "device"
ALLOWLIST = "devices"
NAME_PATTERN = DEVICE_NAME  # a device's name is also its allowlist file's name
Z85_KEY_CHARS = 40  # a 32-byte Curve25519 key in Z85
MAX_FILE_BYTES = 16 * 1024  # a certificate is ~300 bytes


class KeyFileError(ValueError):
    """A key, key file or keys directory that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Keypair:
    public: bytes  # Z85, 40 bytes
    secret: bytes  # Z85, 40 bytes

    @property
    def public_text(self) -> str:
        return self.public.decode("ascii")


@dataclass(frozen=True)
class CurveClient:
    """What a device needs to dial a CURVE controller: its keypair and the pinned server key."""

    keypair: Keypair
    server_key: bytes  # Z85 public key of the controller

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_serverkey = self.server_key


def require_curve() -> None:
    if not zmq.has("curve"):
        raise KeyFileError("this libzmq was built without CURVE security; install pyzmq's "
                           "wheels (they bundle libsodium) or a libzmq with libsodium")


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(f"device name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def parse_public_key(text: str, files: bool = True) -> bytes:
    """A Z85 public key given as text, or (``files``) read from a public ``.key`` file;
    Z85 bytes. Text from elsewhere (a board's answer) is parsed with ``files=False``: it
    must never name a file of this host."""
    candidate = text.strip()
    path = Path(candidate)
    if files and path.is_file():  # a path wins, even one of 40 characters
        public, _ = _load(path)
        return public
    try:
        if len(candidate) != Z85_KEY_CHARS or len(z85.decode(candidate)) != 32:
            raise ValueError
    except Exception:  # pyzmq's decoder raises KeyError, ValueError or struct.error
        raise KeyFileError(
            f"{text!r} is not a CURVE public key: expected {Z85_KEY_CHARS} Z85 characters "
            "(as `keys init` prints) or the path of a public .key file") from None
    return candidate.encode("ascii")


def init_keypair(directory: Path, name: str, *, force: bool = False) -> Keypair:
    """Create ``directory/name.key`` and ``name.key_secret`` (0600); return the keypair.

    Refuses to overwrite an existing keypair unless ``force``: then the old files are kept
    beside the new ones with a ``.old`` suffix (key rotation, docs/security.md)."""
    require_curve()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_path, secret_path = _paths(directory, name)
    if public_path.exists() or secret_path.exists():
        if not force:
            raise KeyFileError(f"{secret_path} already exists: keep using it, or pass --force "
                               "to make a new keypair (the old one is kept as .old)")
        for path in (public_path, secret_path):
            if path.exists():
                path.replace(path.with_name(path.name + ".old"))
    # create_certificates writes with the process umask: make the secret file 0600 from
    # its first byte, then open the public one to everybody.
    old_umask = os.umask(0o077)
    try:
        # A Z85 key may start with "-", which command lines take for an option (keys add
        # NAME -KEY, --controller-key -KEY): make keypairs until it does not (1 in 85).
        while True:
            zmq.auth.create_certificates(str(directory), name)
            if not _load(public_path)[0].startswith(b"-"):
                break
    finally:
        os.umask(old_umask)
    public_path.chmod(0o644)
    return load_keypair(secret_path)


def load_keypair(secret_path: Path) -> Keypair:
    """The keypair of a secret key file, refused when group or others may read it."""
    try:
        mode = secret_path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"secret key file {secret_path} does not exist: make the keypair "
                           f"with `keys init --dir {secret_path.parent}`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"secret key file {secret_path} is accessible by group or others (mode "
            f"{stat.S_IMODE(mode):04o}): run `chmod 600 {secret_path}`")
    public, secret = _load(secret_path)
    if secret is None:
        raise KeyFileError(f"{secret_path} holds no secret key")
    return Keypair(public, secret)


def load_own_keypair(directory: Path, name: str) -> Keypair:
    """``name``'s keypair from a keys directory made by ``keys init``."""
    if not directory.is_dir():
        raise KeyFileError(f"keys directory {directory} does not exist: make it with "
                           "`keys init --dir DIR`")
    check_keys_dir(directory)
    return load_keypair(_paths(directory, name)[1])


def public_key(directory: Path, name: str) -> str:
    """``name``'s public key (Z85) from a keys directory, without reading its secret."""
    return _load(_paths(directory, name)[0])[0].decode("ascii")


def device_client(keys_dir: Path, controller_key: str) -> CurveClient:
    require_curve()
    return CurveClient(load_own_keypair(keys_dir, DEVICE), parse_public_key(controller_key))


# ---- the allowlist -------------------------------------------------------------------------
def list_device(keys_dir: Path, name: str, public_key: str, files: bool = True) -> Path:
    """Add ``name`` with ``public_key`` (``files``: or the path of its file) to the
    allowlist; return the file written. The controller's own key is never listed."""
    check_name(name)
    key = parse_public_key(public_key, files)
    if (keys_dir / f"{CONTROLLER}.key").is_file() and key == _load(keys_dir /
                                                                   f"{CONTROLLER}.key")[0]:
        raise KeyFileError("that is the controller's own public key, not a device's")
    allowlist = Allowlist(keys_dir)
    allowlist.reload()
    if name in allowlist.names.values():
        raise KeyFileError(f"{name!r} is listed already: revoke it first to give it a new key")
    if key in allowlist.names:
        raise KeyFileError(f"that key is listed already, as {allowlist.names[key]!r}: "
                           "one key, one device")
    allowlist.directory.mkdir(parents=True, exist_ok=True)
    path = allowlist.directory / f"{name}.key"
    # Write then rename: a controller watching the directory never reads half a file.
    with tempfile.TemporaryDirectory(dir=allowlist.directory, prefix=".add-") as tmp:
        staged = Path(tmp) / "key"
        staged.write_text(_public_certificate(name, key))
        staged.chmod(0o644)
        staged.replace(path)
    return path


def revoke_device(keys_dir: Path, name: str) -> None:
    check_name(name)
    path = keys_dir / ALLOWLIST / f"{name}.key"
    if not path.is_file():
        raise KeyFileError(f"{name!r} is not listed in {path.parent}")
    path.unlink()


class Allowlist:
    """The listed devices of a controller keys directory: public key (Z85) -> name.

    Also the ZAP credentials provider (``callback``), called from the authenticator's
    thread: the mapping is replaced as a whole on reload, never edited in place, and
    ``generation`` counts the changes, whichever thread saw them.
    """

    MISS_RELOAD_S = 0.2  # an unknown key re-reads the directory at most this often

    def __init__(self, keys_dir: Path):
        self.directory = Path(keys_dir) / ALLOWLIST
        self.names: dict[bytes, str] = {}
        self.generation = 0
        self._signature: object = None
        self._lock = threading.Lock()
        self._miss_reload_at = 0.0
        self._scanned_mtime: int | None = None

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is ``key`` listed? A key listed a moment ago is found without waiting for
        the controller's next look at the directory: an unknown key re-reads it when the
        directory changed (one stat), or at most every MISS_RELOAD_S. Never raises: an
        exception here would kill the authenticator thread and hang every handshake."""
        try:
            if key not in self.names:
                now = time.monotonic()
                if self._dir_mtime() != self._scanned_mtime or now - self._miss_reload_at > \
                        self.MISS_RELOAD_S:
                    self._miss_reload_at = now
                    self.reload()
            return key in self.names
        except Exception:
            log.exception("allowlist: refusing a handshake after an error")
            return False

    def name_of(self, key: bytes) -> str | None:
        return self.names.get(key)

    def reload(self) -> bool:
        """Re-read the directory if any file in it changed; True if the mapping changed.

        Only regular files of at most MAX_FILE_BYTES that only their owner may write are
        read; any other entry, and any file that does not parse, is skipped with an error in
        the log (once, until it changes), never the whole list."""
        with self._lock:
            mtime = self._dir_mtime()
            signature = self._scan()  # may raise (no file descriptor left): retried later
            self._scanned_mtime = mtime
            if signature == self._signature:
                return False
            self._signature = signature
            names: dict[bytes, str] = {}
            for path, _, _, problem in signature:
                try:
                    if problem:
                        raise KeyFileError(problem)
                    public, _ = _load(path)
                except Exception as exc:  # pyzmq's parser raises IndexError too
                    log.error("allowlist: skipping %s: %s", path, exc)
                    continue
                if public in names:
                    log.error("allowlist: %s repeats the key of %r; skipping it", path,
                              names[public])
                    continue
                names[public] = path.stem
            changed = names != self.names
            self.names = names
            self.generation += changed
            return changed

    def _dir_mtime(self) -> int | None:
        try:
            return self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _scan(self) -> tuple:
        """(path, mtime, size, problem or "") of every entry named like a listed device; an
        entry that vanishes mid-scan (a revoke right now) is simply not there."""
        entries = []
        for path in self.directory.glob("*.key") if self.directory.is_dir() else ():
            if not NAME_PATTERN.fullmatch(path.stem):
                continue
            try:
                st = path.lstat()  # never follow a link: it could lead anywhere (/dev/zero)
            except FileNotFoundError:
                continue
            entries.append((path, st.st_mtime_ns, st.st_size, _listing_problem(st)))
        return tuple(sorted(entries))


def _listing_problem(st: os.stat_result) -> str:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (links, pipes and devices are not read)"
    if st.st_size > MAX_FILE_BYTES:
        return f"{st.st_size} bytes: larger than any certificate ({MAX_FILE_BYTES})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): anyone "
                "could put their key there; chmod go-w")
    return ""


def check_keys_dir(keys_dir: Path) -> None:
    """Refuse a controller keys directory (or its allowlist) that others may write: they
    could list themselves."""
    for directory in (keys_dir, keys_dir / ALLOWLIST):
        if directory.is_dir() and directory.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise KeyFileError(f"{directory} is writable by group or others: anyone could list "
                               f"a key there; run `chmod go-w {directory}`")


def _paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except Exception as exc:  # OSError, ValueError, and IndexError on a line without "="
        raise KeyFileError(f"cannot read key file {path}: {exc!r}") from None
    if len(public or b"") != Z85_KEY_CHARS:
        raise KeyFileError(f"key file {path} holds no valid public key")
    return public, secret


def _public_certificate(name: str, public_key: bytes) -> str:
    """A public certificate in ZPL, the layout ``zmq.auth.create_certificates`` writes."""
    return ("#   ZeroMQ CURVE Public Certificate\n"
            f"#   device {name}, listed by `edge-controller keys add`\n\n"
            f"metadata\n    name = {name}\ncurve\n"
            f'    public-key = "{public_key.decode("ascii")}"\n')
