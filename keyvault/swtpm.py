"""Run ``swtpm socket --tpm2`` as a child process, for hosts without a hardware TPM.

The emulator keeps its state (its seeds, hence the ability to unseal) in a
directory of ours, so it protects the vault key against copying the database
alone, and against nothing else: root on this machine reads the state. The
caller logs that loudly.

swtpm listens on a unix socket (mode 0600) in a fresh private directory
rather than on localhost TCP ports: no port can be taken by someone else
between choosing and binding it, and no other local user can talk to our
TPM while it runs. tpm2-tss (3.2 and later) reaches it with the TCTI
``swtpm:path=<socket>`` and finds the control channel at ``<socket>.ctrl``.
(Over TCP the TCTI would be ``swtpm:host=127.0.0.1,port=N``; the ``mssim:``
TCTI does not work against swtpm.)

The child gets SIGKILL if we die (``PR_SET_PDEATHSIG``), so a kill -9 of the
service never leaves an emulator holding the state directory's lock. The
signal is set by util-linux ``setpriv --pdeathsig`` between fork and exec,
not by a Python ``preexec_fn``: with a preexec_fn CPython runs its at-fork
hooks in the child, and gRPC's hooks (the service already runs a gRPC
server) abort the child there.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from kme.errors import ErrorCode, KmstnError

__all__ = ["SwtpmProcess"]

class SwtpmProcess:
    """One swtpm child with its state in ``state_dir``; use as a context manager."""

    def __init__(self, state_dir: Path, log: logging.Logger, binary: str = "swtpm") -> None:
        self.state_dir = state_dir
        self._log = log
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock_dir: Path | None = None
        self.socket_path: Path | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "swtpm.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def tcti(self) -> tuple[str, str]:
        """(TCTI name, TCTI configuration) for tpm2_pytss.TCTILdr."""
        if self.socket_path is None:
            raise RuntimeError("swtpm is not running")
        return "swtpm", f"path={self.socket_path}"

    def start(self, timeout: float = 15.0) -> None:
        binary = shutil.which(self._binary)
        if binary is None:
            raise KmstnError(ErrorCode.UNAVAILABLE,
                             f"swtpm is not installed ({self._binary!r} not found on PATH)")
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise KmstnError(ErrorCode.UNAVAILABLE,
                             "setpriv (util-linux) is not installed; it ties swtpm's life "
                             "to this process")
        if "," in str(self.state_dir):
            # swtpm splits its option values at commas.
            raise KmstnError(ErrorCode.INVALID_ARGUMENT,
                             f"the swtpm state directory may not contain ',': {self.state_dir}")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sock_dir = Path(tempfile.mkdtemp(prefix="kmstn-swtpm-"))
        sock = self._sock_dir / "tpm.sock"
        args = [
            setpriv, "--pdeathsig", "KILL", "--",
            binary, "socket", "--tpm2",
            "--tpmstate", f"dir={self.state_dir},mode=0600",
            "--server", f"type=unixio,path={sock},mode=0600",
            "--ctrl", f"type=unixio,path={sock}.ctrl,mode=0600",
            # Power on and send TPM2_Startup(CLEAR) without a control command.
            "--flags", "not-need-init,startup-clear",
        ]
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed arguments, resolved binary
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                tail = self._log_tail()
                self._cleanup()
                raise KmstnError(
                    ErrorCode.UNAVAILABLE,
                    f"swtpm exited at start (code {self._proc.returncode}); is its state "
                    f"directory {self.state_dir} in use by another swtpm?", cause=tail)
            if Path(f"{sock}.ctrl").exists() and self._connectable(sock):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise KmstnError(ErrorCode.UNAVAILABLE, f"swtpm did not start in {timeout:.0f} s",
                                 cause=self._log_tail())
            time.sleep(0.01)
        self.socket_path = sock
        self._log.info("swtpm started", extra={"pid": self._proc.pid,
                                               "state_dir": str(self.state_dir)})

    @staticmethod
    def _connectable(path: Path) -> bool:
        if not path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except OSError:
                return False
        return True

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._log.info("swtpm stopped", extra={"pid": proc.pid})
        self._cleanup()

    def _cleanup(self) -> None:
        self.socket_path = None
        if self._sock_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._sock_dir)
            self._sock_dir = None

    def __enter__(self) -> SwtpmProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
