"""CPU and memory of the processes taking part in a benchmark run (Linux, via psutil).

CPU is measured as a delta of user + system time over the measured window, per group of
processes. PostgreSQL forks one backend per connection, so its group is "every postgres
process whose title names the bench database" (the service's pooled connections, autovacuum
workers on that database), re-discovered at every sample so backends that start during the
run are counted whole and backends that end keep the CPU last seen. The rest of the server
(checkpointer, WAL writer, other databases' backends) is shared with whatever else runs on
the machine and reported apart.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """(user + system, system) CPU seconds."""
    t = proc.cpu_times()
    return float(t.user + t.system), float(t.system)


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (a service that forks is counted whole)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def by_name(name: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == name:
            out.append(proc)
    return out


def postgres_split(database: str) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(backends serving ``database``, every other postgres process)."""
    mine: list[psutil.Process] = []
    rest: list[psutil.Process] = []
    for proc in by_name("postgres"):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        (mine if f" {database} " in f"{title} " else rest).append(proc)
    return mine, rest


@dataclass
class Group:
    """CPU seconds of a changing set of processes since :meth:`start`."""

    find: Callable[[], list[psutil.Process]]
    base: dict[tuple[int, float], tuple[float, float]] = field(default_factory=dict)
    last: dict[tuple[int, float], tuple[float, float]] = field(default_factory=dict)
    started: float = 0.0

    def _snap(self) -> dict[tuple[int, float], tuple[float, float]]:
        out = {}
        for proc in self.find():
            with contextlib.suppress(psutil.Error):
                out[(proc.pid, proc.create_time())] = _cpu(proc)
        return out

    def start(self) -> None:
        self.started = time.time()
        self.base = self._snap()
        self.last = dict(self.base)

    def sample(self) -> None:
        self.last.update(self._snap())

    def used(self, *, system: bool = False) -> float:
        """CPU seconds used since :meth:`start` (only kernel time with ``system``)."""
        i = 1 if system else 0
        total = 0.0
        for key, cpu in self.last.items():
            if key in self.base:
                total += cpu[i] - self.base[key][i]
            elif key[1] >= self.started - 1:  # born during the run: all of it is ours
                total += cpu[i]
        return total


REFERENCE_ITERATIONS = 50_000


def reference_slice() -> float:
    """CPU milliseconds this thread takes for a fixed slice of pure-Python work.

    The same work on the same interpreter, so its time moves only with the machine's speed:
    on a shared host that speed drifts (seen here: the same slice took 1.0x to 1.8x its
    fastest time within a minute). A rough gauge: the slice is small and stays in cache, so
    it sees contention for the core, not for memory, and the service's CPU per generation
    does not follow it closely; the interleaved ``--compare`` is the fair comparison.
    """
    started = time.thread_time()
    total = 0
    for i in range(REFERENCE_ITERATIONS):
        total += i * i
    return (time.thread_time() - started) * 1000


class Sampler(threading.Thread):
    """Samples the groups' CPU and the service processes' RSS every ``interval`` seconds,
    and times a :func:`reference_slice` at every sample (``speed``: the machine's speed
    during the run)."""

    def __init__(self, groups: dict[str, Group], rss_pids: list[int],
                 interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.groups = groups
        self.rss_pids = rss_pids
        self.interval = interval
        self.rss: list[tuple[float, list[float]]] = []  # (seconds since start, MB per pid)
        self.speed: list[float] = []  # reference_slice() ms, one per sample
        self.halt = threading.Event()
        self.t0 = time.perf_counter()

    def start(self) -> None:
        for g in self.groups.values():
            g.start()
        self.t0 = time.perf_counter()
        self._rss()
        super().start()

    def _rss(self) -> None:
        self.rss.append((time.perf_counter() - self.t0, [rss_mb(p) for p in self.rss_pids]))

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            for g in self.groups.values():
                g.sample()
            self._rss()
            self.speed.append(reference_slice())

    def finish(self) -> tuple[dict[str, float], dict[str, float]]:
        """(CPU seconds per group, of which kernel time)."""
        self.halt.set()
        self.join(5)
        for g in self.groups.values():
            g.sample()
        self._rss()
        return ({name: g.used() for name, g in self.groups.items()},
                {name: g.used(system=True) for name, g in self.groups.items()})


def rss_mb(pid: int) -> float:
    try:
        return float(sum(p.memory_info().rss for p in tree(pid))) / 2**20
    except psutil.Error:
        return float("nan")


def peak_rss_mb(pid: int) -> float:
    """The kernel's high-water mark of the process's resident set (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def postmaster_reaped_cpu() -> float:
    """CPU seconds of the postmaster's exited (reaped) children, every database's.

    A backend that connects and exits between two samples never shows up in a
    :class:`Group`; its CPU lands here once the postmaster has reaped it.
    """
    total = 0.0
    for proc in by_name("postgres"):
        try:
            if proc.parent() is None or proc.parent().name() != "postgres":
                t = proc.cpu_times()
                total += float(t.children_user + t.children_system)
        except psutil.Error:
            pass
    return total
