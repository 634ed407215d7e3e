"""Measured timeline: spans on the tracks gpu, cpu_attention, h2d, d2h and copy_thread,
weights_wait (inside GPU spans: the compute stream stalled on a layer's weights) and launcher
(the main thread's host time).

Host-thread work is timed with the wall clock; work queued on a CUDA stream is timed with CUDA
events recorded around it on that stream and resolved against one base event after the run, so a
span is when the device executed it, not when Python queued it. The Chrome/Perfetto trace uses the
event schema of the cost model's predicted timeline (`hrm.cost.timeline`): complete events
("ph": "X") in microseconds with the track name as tid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

#: spans of this track lie inside GPU spans: the compute stream stalled on a layer's weights
WAIT_TRACK = "weights_wait"
#: the launching (main) thread's host time: wall-clock spans of its decode work (launch_pre,
#: handoff_send, attn_wait, handoff_receive, launch_post: executor/engine.py)
LAUNCH_TRACK = "launcher"
#: the compute stream's copies of a CPU KV cache gathered for GPU attention (events around
#: them, inside the GPU's gpu_attn spans: executor/engine.py `_gather_with_new_token`)
KV_DMA_TRACK = "kv_dma"
#: the weights stream's copy of a layer's resident experts into its whole-layer staging buffer
#: (GPU memory to GPU memory, not over the link: executor.schedule.WeightLink)
RESIDENT_COPY_TRACK = "resident_d2d"
TRACKS = ("gpu", "cpu_attention", "h2d", "d2h", "copy_thread", WAIT_TRACK, LAUNCH_TRACK,
          KV_DMA_TRACK, RESIDENT_COPY_TRACK)


@dataclass(frozen=True)
class Span:
    track: str
    name: str
    start_s: float
    end_s: float
    layer: int | None = None
    micro_batch: int | None = None


class Tracer:
    """Collects spans from several threads; `spans()` resolves them (after a device sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._wall: list[Span] = []
        self._events: list[tuple[str, str, Any, Any, int | None, int | None]] = []
        if self.cuda:
            torch.cuda.synchronize(device)
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
            torch.cuda.synchronize(device)
        self._t0 = time.perf_counter()

    def now_s(self) -> float:
        """Wall-clock seconds since the tracer started."""
        return time.perf_counter() - self._t0

    @contextmanager
    def span(self, track: str, name: str, stream: Any = None, layer: int | None = None,
             micro_batch: int | None = None) -> Iterator[None]:
        """Time the enclosed work: on `stream` (a CUDA stream) by events, else by wall clock.
        Names are the cost model's task names (pre_attn, post_attn, d2h, cpu_attn, act_h2d,
        weights_h2d, stage_weights; plus prefill and gpu_attn)."""
        if self.cuda and stream is not None:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record(stream)
            yield
            end.record(stream)
            with self._lock:
                self._events.append((track, name, start, end, layer, micro_batch))
        else:
            start_s = self.now_s()
            yield
            with self._lock:
                self._wall.append(Span(track, name, start_s, self.now_s(), layer, micro_batch))

    def since_start(self, perf_counter_s: float) -> float:
        """A `time.perf_counter()` reading as seconds since the tracer started."""
        return perf_counter_s - self._t0

    def add(self, track: str, name: str, start_s: float, end_s: float,
            layer: int | None = None) -> None:
        """A wall-clock span timed by the caller (seconds since the tracer started), for work
        that other threads ran (the copy thread's memmoves)."""
        with self._lock:
            self._wall.append(Span(track, name, start_s, end_s, layer))

    def spans(self) -> list[Span]:
        """All spans, sorted by start; the caller must have synchronized the device."""
        resolved = [Span(track, name, self._base.elapsed_time(start) / 1e3,
                         self._base.elapsed_time(end) / 1e3, layer, mb)
                    for track, name, start, end, layer, mb in self._events] if self.cuda else []
        return sorted(self._wall + resolved, key=lambda s: s.start_s)


def busy_s(spans: list[Span], track: str, start_s: float, end_s: float,
           skip: tuple[str, ...] = ()) -> float:
    """Time in [start_s, end_s] during which `track` had at least one span running (spans
    named in `skip` left out)."""
    busy, cursor = 0.0, start_s
    for s in sorted((s for s in spans if s.track == track and s.name not in skip),
                    key=lambda s: s.start_s):
        lo, hi = max(s.start_s, cursor), min(s.end_s, end_s)
        if hi > lo:
            busy += hi - lo
            cursor = hi
    return busy


def decode_busy_s(spans: list[Span], windows: list[tuple[float, float]]) -> dict[str, float]:
    """Busy seconds of every track over the decode windows; the GPU's without its stalls on
    weights (`WAIT_TRACK`), which lie inside GPU spans: a link-bound GPU is waiting, not
    working; the launching thread's without its waits for CPU attention (attn_wait)."""
    skip = {LAUNCH_TRACK: ("attn_wait",)}
    busy = {t: sum(busy_s(spans, t, a, b, skip.get(t, ())) for a, b in windows)
            for t in TRACKS}
    busy["gpu"] = max(0.0, busy["gpu"] - busy[WAIT_TRACK])
    return busy


def chrome_trace(spans: list[Span], pid: str = "measured") -> list[dict[str, Any]]:
    """Chrome trace events (load in ui.perfetto.dev or chrome://tracing)."""
    meta = [{"name": "thread_name", "ph": "M", "pid": pid, "tid": t, "args": {"name": t}}
            for t in TRACKS]
    return meta + [{"name": s.name, "ph": "X", "ts": s.start_s * 1e6,
                    "dur": (s.end_s - s.start_s) * 1e6, "pid": pid, "tid": s.track,
                    "args": {"layer": s.layer, "micro_batch": s.micro_batch}} for s in spans]
