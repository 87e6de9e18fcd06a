"""overlap: how many chunks a layer's exchange is cut into, and what the exchanges did.

The exchange (exchange.py) pipelines chunks of tokens: chunk c's rows arrive while chunk c-1's
experts compute and chunk c-2's results travel back. With C chunks, dispatch + combine taking
`comm` seconds, the experts `compute` seconds and `latency` seconds of fixed cost per chunk:

    time(C) = (comm + compute) / C + (C - 1) / C * max(comm, compute) + C * latency

(the first chunk's transfers and the last chunk's compute cannot hide; the rest waits only for the
slower of the two). `choose_chunks` takes the C in CHOICES with the least time, 1 where overlap does
not pay. "auto" measures, then checks: a layer's first two calls run with C = 1 (the first may wait
for other ranks' compilation) and the second times its waits (all exposed), its experts and the
whole call; the group agrees on the smallest wait (the rank that arrived last waited for the
transfer alone) and the largest expert time and picks a C by the model; the third call runs with
that C, and the calls after keep it only if the group's slowest third call beat its slowest second
(the model does not see communication that slows the experts down, as on a CPU whose cores all
compute: measured, 2 ranks on 2 cores lost time to 2 and 4 chunks). Every rank picks the same C.

Stats (per layer, on each rank, forward calls): rows and bytes sent to and received from other
ranks, seconds waited on exchanges (exposed) and spent in the experts, the chunks used. Hidden
communication is what the exchanges would have taken at the bandwidth the layer's calls with C = 1
showed (every wait of those is exposed) less what was exposed (`Stats.summary`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

CHOICES = (1, 2, 3, 4, 6, 8)


def predicted_time(chunks: int, comm: float, compute: float, latency: float) -> float:
    return (comm + compute) / chunks + (chunks - 1) / chunks * max(comm, compute) + chunks * latency


def choose_chunks(comm: float, compute: float, latency: float) -> int:
    """The C in CHOICES with the least predicted time (the smallest of equals)."""
    return min(CHOICES, key=lambda c: (predicted_time(c, comm, compute, latency), c))


class Clock:
    """Seconds waited on exchanges and spent computing during one call. On CUDA the spans are
    timed by CUDA events on the current stream (an exchange's wait there is a stream dependency
    that returns to the host at once) and read only when asked for, never stalling the host."""

    def __init__(self, device=None):
        self._cuda = device is not None and torch.device(device).type == "cuda"
        self._host = {"wait": 0.0, "compute": 0.0, "latency": 0.0, "rest": 0.0}
        self._events = []  # (kind, start, end) CUDA events

    @contextlib.contextmanager
    def span(self, kind: str):
        """Time the block as `kind`: wait, compute, latency (the counts exchange, also a wait), or
        rest (the call after the counts exchange, waits and compute included)."""
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((kind, start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[kind] += time.perf_counter() - t0

    def wait(self):
        return self.span("wait")

    def compute(self):
        return self.span("compute")

    def seconds(self) -> tuple[float, float, float, float]:
        """(waited, computed, latency, whole call) of the call; the latency counts as waited too."""
        times = dict(self._host)
        for kind, start, end in self._events:
            end.synchronize()
            times[kind] += start.elapsed_time(end) / 1e3
        self._host, self._events = times, []
        return times["wait"] + times["latency"], times["compute"], times["latency"], times["latency"] + times["rest"]


@dataclass
class Stats:
    """One layer's exchanges on one rank, summed over forward calls (times are read when asked for)."""

    rank: int = 0
    calls: int = 0
    rows_sent: int = 0  # (token, k) rows to other ranks
    rows_received: int = 0
    bytes_sent: int = 0  # dispatch out and combine back, to other ranks
    bytes_received: int = 0
    chunks: dict = field(default_factory=dict)  # C -> calls made with it (bounded, however long the run)
    last_chunks: int | None = None
    _exposed: float = 0.0  # waiting on exchanges
    _compute: float = 0.0  # the local experts
    _serial_bytes: int = 0  # the larger direction's bytes of the calls with C = 1
    _serial_s: float = 0.0  # and their waits: the link's bandwidth as the layer sees it
    _last: tuple = (0.0, 0.0, 0.0, 0.0)
    _pending: list = field(default_factory=list)  # (clock, chunks, bytes) of calls not yet read

    def add_call(self, plan, dispatch_row: int, combine_row: int, clock: Clock) -> None:
        """Count one forward call: `plan` its Route, bytes per row each way, `clock` its times."""
        out = sum(n for c in range(plan.chunks) for r, n in enumerate(plan.send[c]) if r != self.rank)
        into = sum(n for c in range(plan.chunks) for r, n in enumerate(plan.recv[c]) if r != self.rank)
        moved = out * dispatch_row + into * combine_row, into * dispatch_row + out * combine_row
        self.calls += 1
        self.rows_sent += out
        self.rows_received += into
        self.bytes_sent += moved[0]
        self.bytes_received += moved[1]
        self.chunks[plan.chunks] = self.chunks.get(plan.chunks, 0) + 1
        self.last_chunks = plan.chunks
        self._pending.append((clock, plan.chunks, max(moved)))
        if len(self._pending) > 64:  # long done by now: reading them stalls nothing
            self._settle()

    def _settle(self) -> None:
        for clock, chunks, moved in self._pending:
            waited, computed, latency, whole = clock.seconds()
            self._exposed += waited
            self._compute += computed
            self._last = (waited, computed, latency, whole)
            if chunks == 1:
                self._serial_bytes += moved
                self._serial_s += waited
        self._pending = []

    @property
    def exposed_s(self) -> float:
        self._settle()
        return self._exposed

    @property
    def compute_s(self) -> float:
        self._settle()
        return self._compute

    @property
    def last(self) -> tuple[float, float, float, float]:
        """The last call's seconds (waited, computed, of the counts exchange, of the whole call)."""
        self._settle()
        return self._last

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second of the calls with C = 1 (all their waits exposed), None before one."""
        self._settle()
        return self._serial_bytes / self._serial_s if self._serial_s > 0 and self._serial_bytes else None

    def reset(self) -> None:
        """Forget every call (after warm-up steps, whose waits include other ranks' compilation);
        the last call's times stay `last`."""
        last = self.last
        self.__init__(rank=self.rank)
        self._last = last

    def summary(self) -> dict:
        """The numbers a report shows: totals, and communication exposed and hidden (estimated)."""
        comm = max(self.bytes_sent, self.bytes_received) / self.bandwidth if self.bandwidth else None
        hidden = None if comm is None else max(comm - self.exposed_s, 0.0)
        return {"rank": self.rank, "calls": self.calls, "rows_sent": self.rows_sent,
                "rows_received": self.rows_received, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "exposed_s": self.exposed_s, "compute_s": self.compute_s,
                "chunks": self.last_chunks, "comm_estimate_s": comm, "hidden_s": hidden,
                "hidden_fraction": None if not comm else min(hidden / comm, 1.0)}
