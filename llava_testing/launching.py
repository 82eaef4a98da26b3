"""Test helpers for runs of several ranks: `mlx.launch` (ring backend, ranks on 127.0.0.1, free
ports), run to the end or kept serving in the background, every wait bounded."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # seconds for one mlx.launch run (2 ranks)
FAILED_RANK = re.compile(r"rank \d+ (exited with code -?[1-9]|was killed)")  # the launcher's


def free_port_pair() -> int:
    """A port P such that P and P + 1 (one per rank) are free on 127.0.0.1."""
    for _ in range(50):
        port = random.randrange(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def launch_command(*argv: str, ranks: int = 2) -> list[str]:
    """`mlx.launch -n RANKS --backend ring --starting-port P -- python ARGV...`."""
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    command = [launcher, "-n", str(ranks), "--backend", "ring"]
    return command + ["--starting-port", str(free_port_pair()), "--", sys.executable, *argv]


def launch(*argv: str, ranks: int = 2, stdin: str = "") -> tuple[str, str]:
    """Run `python ARGV...` on RANKS ranks to the end; (stdout, stderr).

    mlx.launch exits 0 even when a rank fails, so its report of a failed rank fails the test.
    """
    done = subprocess.run(
        launch_command(*argv, ranks=ranks),
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert done.returncode == 0 and not FAILED_RANK.search(done.stderr), done.stderr
    return done.stdout, done.stderr


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, waiting to be reaped, does not)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return state.stdout.strip() != "" and not state.stdout.strip().startswith("Z")


class Launch:
    """`python ARGV...` on RANKS ranks in the background, in a session of its own (so that a
    test can signal the whole launch as Ctrl-C would); its output goes to `log`.

    The launcher's stdin is a pipe kept open, as a terminal's would be.
    """

    def __init__(self, *argv: str, log: Path, ranks: int = 2):
        self.ranks = ranks
        self.log_path = log
        self._log: IO = open(log, "w")
        self.process = subprocess.Popen(
            launch_command(*argv, ranks=ranks),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rank_pids(self, timeout: float = 30.0) -> list[int]:
        """The processes of the ranks (the launcher's children: it execs python in each)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = subprocess.run(
                ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
            ).stdout.split()
            if len(found) == self.ranks:
                return sorted(int(pid) for pid in found)
            time.sleep(0.1)
        raise AssertionError(f"the launch did not start {self.ranks} ranks:\n{self.output}")

    def signal_all(self, sig: int) -> None:
        """Signal the launcher and every rank, as Ctrl-C in a terminal does."""
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """Stop everything at once (the tests' own cleanup)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._log.close()

    def wait_gone(self, pids: list[int], timeout: float) -> Optional[float]:
        """Seconds until every process of `pids` has ended, or None after `timeout`."""
        tic = time.monotonic()
        while time.monotonic() - tic < timeout:
            if not any(alive(pid) for pid in pids):
                return time.monotonic() - tic
            time.sleep(0.1)
        return None
