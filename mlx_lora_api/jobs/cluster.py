"""Data-parallel fine-tunes on MLX's own distributed engine: the ranks a server may use, MLX's
hostfile read and checked, and a job's ranks started through `mlx.launch`.

The worker of a fine-tune that runs on several ranks starts `mlx.launch` (ring, JACCL or MPI, as
the hostfile says; ring on loopback for `--ranks N`), which starts `python -m
mlx_lora_api.jobs.rank` on every host and hands each the job on its stdin (one JSON line, so
the same on a remote host). Rank 0 writes the adapter, checkpoints and events into the job's
folder and prints the events on stdout, one marked line each; this module passes them on. No
MLX here: the worker imports this module before it knows what the job is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from ..types import FinetuneRequest
from .process import Failed, die_with_parent

MARKER = "@mlx-lora-api-event "  # the start of an event line on a rank's stdout (stderr: ranks >0)
BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl")
LOCAL = "127.0.0.1"  # mlx.launch runs a host named so without ssh


class Host(msgspec.Struct, forbid_unknown_fields=True):
    """One host of MLX's hostfile (`mlx.distributed_config` writes it)."""

    ssh: str
    ips: list[str] = msgspec.field(default_factory=list)
    rdma: list[Any] = msgspec.field(default_factory=list)


class Hostfile(msgspec.Struct, forbid_unknown_fields=True):
    hosts: list[Host]
    backend: str = ""
    envs: list[str] = msgspec.field(default_factory=list)


class Cluster(msgspec.Struct, frozen=True):
    """The ranks this server may run a fine-tune on: `ranks` local ranks on loopback (ring), or
    the hosts of a hostfile. One rank: no distribution at all."""

    ranks: int = 1
    hostfile: str | None = None
    backend: str = "ring"
    hosts: tuple[str, ...] = ()  # each rank's host, as it is named to ssh

    def size(self, asked: int | None) -> int:
        """How many ranks a job that asks for `asked` (None: all) runs on."""
        return min(asked or self.ranks, self.ranks)


def read_hostfile(path: Path) -> Hostfile:
    """MLX's hostfile, checked: a ValueError names the file and what is wrong in it."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"hostfile {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"hostfile {path} is not JSON: {e}") from None
    if isinstance(data, list):  # MLX also reads a bare list of hosts
        data = {"hosts": data}
    try:
        hostfile = msgspec.convert(data, Hostfile)
    except msgspec.ValidationError as e:
        raise ValueError(f"hostfile {path}: {e}") from None
    if not hostfile.hosts:
        raise ValueError(f"hostfile {path} lists no hosts")
    if hostfile.backend and hostfile.backend not in BACKENDS:
        raise ValueError(f"hostfile {path}: backend {hostfile.backend!r} is not one of {', '.join(BACKENDS)}")
    backend = hostfile.backend or "ring"
    for i, host in enumerate(hostfile.hosts):
        if not host.ssh:
            raise ValueError(f"hostfile {path}: hosts[{i}].ssh is empty")
        if backend == "ring" and not host.ips:
            raise ValueError(f"hostfile {path}: hosts[{i}] ({host.ssh}) has no ips, which the ring backend needs")
    return hostfile


def make_cluster(ranks: int, hostfile: Path | None) -> Cluster:
    """The server's cluster from `--ranks` and `--hostfile` (which takes its first `ranks` hosts
    where both are given); ValueError where they do not fit."""
    if ranks < 1:
        raise ValueError(f"--ranks must be at least 1, not {ranks}")
    if hostfile is None:
        return Cluster(ranks=ranks, hosts=(LOCAL,) * ranks)
    read = read_hostfile(hostfile)
    count = len(read.hosts) if ranks == 1 else ranks
    if count > len(read.hosts):
        raise ValueError(f"--ranks {ranks} asks for more ranks than hostfile {hostfile} has hosts ({len(read.hosts)})")
    return Cluster(
        ranks=count,
        hostfile=str(hostfile.resolve()),
        backend=read.backend or "ring",
        hosts=tuple(h.ssh for h in read.hosts[:count]),
    )


class RankJob(msgspec.Struct, kw_only=True):
    """What every rank is handed on its stdin: a fine-tune, and where rank 0 writes it."""

    base_path: str
    base_ref: str
    request: FinetuneRequest
    out_dir: str
    resume: bool
    retention_cache: str | None
    initial_weights: str | None
    levers: str  # MLX_LORA_API_LEVERS as the worker has it
    backend: str
    hosts: list[str]


class RankFailed(Failed):
    """A rank failed, or could not be started: the message names it and its host."""


def _free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on loopback (the ring backend's: one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((LOCAL, 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind((LOCAL, port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free ports for the ranks")


def _command(cluster: Cluster, size: int, folder: Path) -> list[str]:
    launcher = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
    common = ["--python", sys.executable, "--starting-port", str(_free_ports(size))]
    if cluster.hostfile is None:
        where = ["--backend", "ring", "--hosts", LOCAL, "-n", str(size)]
    else:
        data = json.loads(Path(cluster.hostfile).read_text())
        if isinstance(data, list):
            data = {"hosts": data}
        data["hosts"] = data["hosts"][:size]
        trimmed = folder / "hostfile.json"
        trimmed.write_text(json.dumps(data))
        where = ["--hostfile", str(trimmed), "--backend", cluster.backend]
    return [*launcher, *where, *common, "--", "-m", "mlx_lora_api.jobs.rank"]


FAILED_RANK = re.compile(r"rank (\d+) (?:exited with code (-?\d+)|was killed)")


def train(job: RankJob, cluster: Cluster, size: int, folder: Path, on_event: Callable[[dict], None]) -> dict[str, Any]:
    """Run `job` on `size` ranks of `cluster`; returns rank 0's metrics, raises RankFailed naming
    the rank and host that failed. `folder`: the job's own (it holds the trimmed hostfile)."""
    hosts = list(cluster.hosts[:size])
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launch = subprocess.Popen(
        _command(cluster, size, folder),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        start_new_session=True,  # the launcher and its local ranks: one group, stopped together
        preexec_fn=die_with_parent,
    )
    assert launch.stdin and launch.stdout and launch.stderr
    # Kept open: mlx.launch passes its stdin to every rank, and at its end it would spin.
    launch.stdin.write(msgspec.json.encode(job) + b"\n")
    launch.stdin.flush()
    failures: list[str] = []
    errors: list[str] = []
    result: dict[str, Any] = {}

    def note(line: str) -> bool:
        if (at := line.find(MARKER)) >= 0:
            event = json.loads(line[at + len(MARKER) :])
            if event["type"] == "rank_error":
                errors.append(f"rank {event['rank']} on {hosts[event['rank']]}: {event['message']}")
            elif event["type"] == "result":
                result.update(event["metrics"])
            else:
                on_event(event)
            return True
        return False

    def read_stderr() -> None:
        for raw in launch.stderr:  # type: ignore[union-attr]
            line = raw.decode(errors="replace").rstrip()
            if not note(line):
                if found := FAILED_RANK.search(line):
                    rank = int(found.group(1))
                    code = found.group(2)
                    how = f"exited with code {code}" if code else "was killed"
                    if code == "255":
                        how += " (ssh could not reach it, or it ended at once)"
                    if code and int(code) < 0:
                        how = f"was killed by {signal.Signals(-int(code)).name}"
                    failures.append(f"rank {rank} on {hosts[rank] if rank < len(hosts) else '?'} {how}")
                sys.stderr.write(line + "\n")

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        for raw in launch.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not note(line) and line:
                sys.stdout.write(line + "\n")
        launch.wait()
        reader.join()
    finally:
        if launch.poll() is None:  # cancelled, or the worker failed: every rank stops
            _stop(launch)
    if result and not errors:
        return result
    # The cause first: a rank killed (the others then fail for the lost peer), then what the ranks
    # said, then the ranks that ended without saying anything.
    # (SIGTERM is mlx.launch stopping the others once one has failed.)
    stopped = [f for f in failures if f.endswith("SIGTERM")]
    killed = [f for f in failures if " was killed" in f and f not in stopped]
    spoke = {e.split(":", 1)[0] for e in errors}
    silent = [f for f in failures if f not in killed + stopped and f.split(" exited", 1)[0] not in spoke]
    said = "; ".join([*killed, *errors, *silent, *stopped]) or f"no rank said why (mlx.launch: {launch.returncode})"
    raise RankFailed(f"the fine-tune failed on {size} ranks ({cluster.backend}): {said}")


def _stop(launch: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(launch.pid, sig)
        except ProcessLookupError:
            return
        try:
            launch.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
