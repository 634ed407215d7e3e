"""The three resources of an offloading schedule and how work is put on them.

- GPU: the compute stream (QKV/O projections, router, expert GEMMs, LM head), driven by the main
  thread.
- Link: weight pages of the next layer stream into a GPU staging buffer on a dedicated stream,
  driven by a copy thread (`WeightLink`). Pinned pages are copied straight to the GPU; pageable
  pages first go through a small pinned ring (memcpy on the copy thread, then H2D), the two paths
  of MoE-Lightning's cost model (B_pinned vs. the pageable->pinned->GPU path).
  q/k/v and parked hidden states cross the link in pinned buffers on their own streams (d2h,
  h2d); the attention output comes up on the compute stream, queued just before its use, read
  by a kernel through the pinned buffer's device alias (`device_alias`), not the copy engine.
  On the CPU stand-in nothing is pinned, so every page takes the staging-ring path.
- CPU: decode attention over the CPU KV cache on a worker thread (`CPUWorker`).

With `--device cpu` the streams are absent: "GPU" work runs on the main thread with CPU tensors,
copies are memcpys, and the threads still overlap, so the whole schedule is exercised in CI.
Events are CUDA events on the GPU and None on the CPU (work is complete when its call returns).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from executor.trace import RESIDENT_COPY_TRACK, Tracer
from executor.weights import ExpertStore
from hrm.cost import STAGING_RING_SLOTS, STAGING_SLOT_PAGES

#: threads of the copy thread's host memcpy (each moves about 10 GB/s)
COPY_THREADS = 4
#: staged chunks being memcpy'd into the ring at once: with two, the memcpy threads find the
#: next chunk's jobs queued when they finish one, instead of idling while the link thread (which
#: waits for the GIL behind the launching thread) queues the finished chunk's H2D
STAGE_AHEAD = 2
#: pinned pages per H2D copy on the weights stream (fewer, larger copies: each Python call of
#: the link thread may wait for the GIL)
PINNED_PAGES_PER_COPY = 2
#: weight bytes queued on the weights stream at once. The GPU's copy engine serves the queued
#: copies of every stream in order, so a whole layer queued at once (about 2.8 GB, 50 ms for
#: Mixtral-8x7B) holds back the small activation copies behind it, and with them the FFNs of the
#: current layer and the release of its staging buffer (measured on an H200: each act_h2d waited
#: up to 40 ms, the layer took 71 ms for 53 ms of weights). About 1.2 ms of transfer at 55 GB/s.
WEIGHT_BYTES_IN_FLIGHT = 64 * 2**20
#: Python's thread switch interval while the pipeline runs (default 5 ms): a thread woken by an
#: event (the copy thread refilling the weight queue, the worker starting attention) waits up to
#: this long for the GIL, which the main thread holds while it launches kernels
SWITCH_INTERVAL_S = 0.0005
#: how a thread waits for a CUDA event: "spin" (CUDA's default for one context: the waiting
#: thread busy-polls a core) or "sleep" (cudaEventBlockingSync: it sleeps until the event fires,
#: leaving the core to CPU attention's OpenMP threads); MOE_LIGHTNING_HOST_WAIT overrides it
HOST_WAIT = os.environ.get("MOE_LIGHTNING_HOST_WAIT", "spin")
if HOST_WAIT not in ("spin", "sleep"):
    raise ValueError(f"MOE_LIGHTNING_HOST_WAIT={HOST_WAIT!r}: expected spin or sleep")


class Streams:
    """CUDA streams of the pipeline (all None on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if cuda else None
        self.weights = torch.cuda.Stream(device) if cuda else None
        self.h2d = torch.cuda.Stream(device) if cuda else None
        self.d2h = torch.cuda.Stream(device) if cuda else None


def on(stream: Any) -> Any:
    """Context that makes `stream` current (no-op on the CPU)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def record(stream: Any) -> Any:
    """An event marking all work queued so far on `stream` (None on the CPU)."""
    if stream is None:
        return None
    event = torch.cuda.Event(blocking=HOST_WAIT == "sleep")
    event.record(stream)
    return event


def wait(stream: Any, event: Any) -> None:
    """Make `stream` wait for `event` without blocking the host."""
    if stream is not None and event is not None:
        stream.wait_event(event)


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of host-side indices on `device` without stalling the launching thread:
    a copy from pageable memory makes CUDA wait for all work queued on the stream first (a
    full stall of the pipeline each call), a copy from pinned memory does not."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


#: integer dtype and `__cuda_array_interface__` typestr of each element size (the interface
#: has no bf16, so a buffer is aliased as integers of its width and viewed back)
_AS_INT = {1: (torch.uint8, "|u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"),
           8: (torch.int64, "<i8")}


class _DeviceArray:
    """`__cuda_array_interface__` (version 2) of a pinned host tensor of an integer dtype from
    `_AS_INT`; it keeps the tensor alive."""

    def __init__(self, host: torch.Tensor, typestr: str) -> None:
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape), "typestr": typestr,
            "data": (host.data_ptr(), False), "strides": None, "version": 2}


def device_alias(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor on the same memory as the pinned, contiguous `host` tensor, or None where
    that is not possible (not CUDA, not pinned). Under unified virtual addressing a pinned page
    has one address for the host and the device, so a kernel reading the alias pulls the bytes
    over PCIe itself, without the copy engine. In the pipeline a small DMA copy waits behind the
    weight pages on the copy engine (measured on an H200, 2026-12-01: a 512 KiB attention output
    took 2.1 ms, median, with the weight stream running; a single 64 MiB copy in flight did not
    reproduce the wait, so the engine's exact queueing rule is not known)."""
    if device.type != "cuda" or not host.is_pinned() or not host.is_contiguous():
        return None
    as_int, typestr = _AS_INT[host.element_size()]
    try:
        alias = torch.as_tensor(_DeviceArray(host.view(as_int), typestr),
                                device=device).view(host.dtype)
    except (RuntimeError, TypeError):  # no unified addressing
        return None
    return alias if alias.data_ptr() == host.data_ptr() else None  # a copy is no alias


class AttentionLink:
    """How one micro-batch's decode attention crosses to the CPU worker and back (cgopipe),
    through pinned buffers allocated once per micro-batch: `send` queues its q/k/v on the d2h
    stream into the micro-batch's pinned slot after the compute that made them; the worker waits
    for that copy, attends, and `finish` writes the output into the micro-batch's pinned output
    slot; `receive` (the launching thread, right before the work that reads it) brings it onto
    the compute stream through the slot's device alias (`device_alias`): an exact copy (x * 1)
    by a kernel, so it does not queue behind the weight pages on the copy engine (a DMA copy
    where no alias exists). On the CPU stand-in the tensors pass through. `hrm profile` times
    this hand-off on the launching thread (hrm.profile.attention_handoff)."""

    def __init__(self, num_micro_batches: int, micro_batch_size: int, qkv_width: int,
                 out_width: int, qkv_dtype: torch.dtype, out_dtype: torch.dtype,
                 streams: Streams, device: torch.device) -> None:
        self.streams, self.cuda = streams, device.type == "cuda"
        shape, n = (micro_batch_size, qkv_width), num_micro_batches if self.cuda else 0
        self.qkv_host = [torch.empty(shape, dtype=qkv_dtype, pin_memory=True) for _ in range(n)]
        self.out_host = [torch.empty(micro_batch_size, out_width, dtype=out_dtype,
                                     pin_memory=True) for _ in range(n)]
        self.out_dev = [torch.empty(micro_batch_size, out_width, dtype=out_dtype, device=device)
                        for _ in range(n)]
        #: the same pinned buffers as device tensors, read by a kernel
        self.out_alias = [device_alias(h, device) for h in self.out_host]

    def send(self, m: int, qkv: torch.Tensor, tracer: Tracer, layer: int) -> tuple[Any, Any]:
        """q/k/v of micro-batch m (rows = its sequences) down into its pinned slot: the host
        tensor and the event the worker waits for (None on the CPU)."""
        if not self.cuda:
            return qkv, None
        d2h = self.streams.d2h
        wait(d2h, record(self.streams.compute))
        with on(d2h), tracer.span("d2h", "d2h", d2h, layer, m):
            host = self.qkv_host[m][:qkv.shape[0]]
            host.copy_(qkv, non_blocking=True)
            qkv.record_stream(d2h)
        return host, record(d2h)

    def finish(self, m: int, out: torch.Tensor) -> torch.Tensor:
        """Worker thread: the attention output of micro-batch m into its pinned output slot."""
        return self.out_host[m][:out.shape[0]].copy_(out) if self.cuda else out

    def receive(self, m: int, host: torch.Tensor, tracer: Tracer, layer: int) -> torch.Tensor:
        """Micro-batch m's attention output (`finish`) on the GPU, queued on the compute
        stream."""
        if not self.cuda:
            return host
        n, alias = host.shape[0], self.out_alias[m]
        with tracer.span("h2d", "act_h2d", self.streams.compute, layer, m):
            if alias is None:
                self.out_dev[m][:n].copy_(host, non_blocking=True)
            else:
                torch.mul(alias[:n], 1, out=self.out_dev[m][:n])
        return self.out_dev[m][:n]


def host_wait(event: Any) -> None:
    """Block the calling thread until `event` has completed."""
    if event is not None:
        event.synchronize()


def memmove_jobs(dst: torch.Tensor, src: torch.Tensor, pool: ThreadPoolExecutor, parts: int
                 ) -> list[Future]:
    """dst[:] = src for contiguous host tensors of one dtype, as `parts` memmoves submitted to
    `pool` (ctypes releases the GIL); each future yields the wall-clock second its part ended.
    Unlike torch's copy_, this stays out of torch's OpenMP pool, which the CPU-attention worker
    is using at the same time: two threads entering OpenMP regions at once oversubscribe the
    cores and slow both."""
    nbytes = src.numel() * src.element_size()
    chunk = -(-nbytes // parts)
    return [pool.submit(_memmove, dst.data_ptr() + off, src.data_ptr() + off,
                        min(chunk, nbytes - off)) for off in range(0, nbytes, chunk)]


def _memmove(dst: int, src: int, nbytes: int) -> float:
    ctypes.memmove(dst, src, nbytes)
    return time.perf_counter()


def host_copy(dst: torch.Tensor, src: torch.Tensor, pool: ThreadPoolExecutor, parts: int
              ) -> None:
    """dst[:] = src as `memmove_jobs`, waited for."""
    for job in memmove_jobs(dst, src, pool, parts):
        job.result()


def element_runs(start: int, end: int, size: int) -> deque[tuple[int, int]]:
    """[start, end) cut into [a, b) runs of `size` elements (the last may be short)."""
    return deque((a, min(a + size, end)) for a in range(start, end, size))


class WeightLink:
    """Streams the non-resident experts of a layer into a staging buffer, on the copy thread
    (with ExpertStore.whole_layers, after a copy of its resident experts on the GPU).

    Pinned pages go straight to the GPU, PINNED_PAGES_PER_COPY per copy, at most
    WEIGHT_BYTES_IN_FLIGHT queued at a time. Pageable pages go in chunks of STAGING_SLOT_PAGES
    through a ring of STAGING_RING_SLOTS pinned slots: COPY_THREADS memmove threads fill a slot
    (up to STAGE_AHEAD chunks at once), then the chunk crosses on the weights stream. The link
    thread only queues work, so the memcpy of the pageable bytes runs all the time the pinned
    bytes cross: a layer of p pinned and o pageable bytes takes max((p + o) / B_h2d,
    o / B_copy), the weight stream of hrm.cost. (Until 2026-12-03 the link thread did each
    page's memcpy itself, then queued pinned pages: the copy threads idled while it did, and a
    layer took about p / B_h2d + o / B_copy.)"""

    def __init__(self, store: ExpertStore, streams: Streams, tracer: Tracer) -> None:
        self.store, self.streams, self.tracer = store, streams, tracer
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="weight-link")
        self.memcpy = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="weight-memcpy")
        cuda = store.device.type == "cuda"
        needs_ring = not all(store.fully_pinned(i) for i in range(len(store.cpu)))
        self.slot_elements = STAGING_SLOT_PAGES * store.page_elements
        self.ring = [torch.empty(self.slot_elements, dtype=store.dtype, pin_memory=cuda)
                     for _ in range(STAGING_RING_SLOTS)] if needs_ring else []
        self.ring_events: list[Any] = [None] * len(self.ring)
        self.next_slot = 0
        self.bytes_pinned_path = 0
        self.bytes_staged_path = 0

    def fetch(self, layer: int, buffer: int, after: Any) -> Future:
        """Copy `layer`'s streamed experts into staging buffer `buffer` once `after` (an event on
        the compute stream: the last use of that buffer) has passed. The future yields the event
        that marks the copy done."""
        return self.pool.submit(self._copy, layer, buffer, after)

    def _copy(self, layer: int, buffer: int, after: Any) -> Any:
        """The layer's pages into staging buffer `buffer` (class docstring); returns the event
        marking the whole layer staged. Each turn queues what can go now, in this order: the
        next pageable chunk's memcpy (a ring slot is free), a memcpy'd chunk's H2D, pinned
        pages (the link has room); with nothing to queue it blocks, GIL released, on the link's
        oldest copy, else the oldest memcpy, else the ring (no polling: the first version of
        2026-12-03 polled the memcpy every 0.2 ms, each wake-up taking the GIL the launching
        thread needs)."""
        src = self.store.cpu[layer]
        if src.numel() == 0:
            return None
        dst, stream, nbytes = self.store.staging[buffer], self.streams.weights, src.element_size()
        wait(stream, after)
        offset = self.store.staged_offset(layer)
        if offset:   # whole-layer staging: the resident experts first, a copy on the GPU
            with on(stream), self.tracer.span(RESIDENT_COPY_TRACK, "resident_d2d", stream, layer):
                dst[:offset].copy_(self.store.gpu[layer], non_blocking=True)
            dst = dst[offset:]
        pinned_end = self.store.pinned_elements[layer]
        pinned = element_runs(0, pinned_end, PINNED_PAGES_PER_COPY * self.store.page_elements)
        staged = element_runs(pinned_end, src.numel(), self.slot_elements)
        copying: deque[tuple[int, int, int, float, list[Future]]] = deque()
        queued: deque[tuple[Any, int]] = deque()   # (event, bytes) of the copies on the link
        in_flight = 0
        while pinned or staged or copying:
            while queued and (queued[0][0] is None or queued[0][0].query()):
                in_flight -= queued.popleft()[1]
            slot = self.next_slot
            if staged and len(copying) < STAGE_AHEAD and _done(self.ring_events[slot]):
                start, end = staged.popleft()
                copying.append((slot, start, end, self.tracer.now_s(), memmove_jobs(
                    self.ring[slot][:end - start], src[start:end], self.memcpy, COPY_THREADS)))
                self.next_slot = (slot + 1) % len(self.ring)
                continue
            if copying and all(job.done() for job in copying[0][4]):
                slot, start, end, began_s, jobs = copying.popleft()
                self.tracer.add("copy_thread", "stage_weights",
                                began_s, self.tracer.since_start(max(j.result() for j in jobs)),
                                layer)
                self._send_staged(layer, self.ring[slot][:end - start], dst[start:end], slot)
                self.bytes_staged_path += (end - start) * nbytes
            elif pinned and in_flight < WEIGHT_BYTES_IN_FLIGHT:
                start, end = pinned.popleft()
                with on(stream), self.tracer.span("h2d", "weights_h2d", stream, layer):
                    dst[start:end].copy_(src[start:end], non_blocking=True)
                self.bytes_pinned_path += (end - start) * nbytes
            elif pinned:    # the link is full: wait for its oldest copy (the GIL released;
                host_wait(queued[0][0])   # the memcpy threads go on with the chunks queued)
                continue
            elif copying:
                futures_wait(copying[0][4])
                continue
            else:           # pageable chunks left, every ring slot still crossing the link
                host_wait(self.ring_events[slot])
                continue
            queued.append((record(stream), (end - start) * nbytes))
            in_flight += queued[-1][1]
        return record(stream)

    def _send_staged(self, layer: int, staged: torch.Tensor, dst: torch.Tensor, slot: int
                     ) -> None:
        """A memcpy'd ring slot over the link; the slot is free again when its event fires."""
        stream = self.streams.weights
        with on(stream), self.tracer.span("h2d", "weights_h2d", stream, layer):
            if stream is None:  # CPU stand-in: the link is a host memcpy
                host_copy(dst, staged, self.memcpy, COPY_THREADS)
            else:
                dst.copy_(staged, non_blocking=True)
        self.ring_events[slot] = record(stream)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.memcpy.shutdown(wait=True)


def _done(event: Any) -> bool:
    """Whether `event` (a CUDA event, or None: nothing pending) has completed."""
    return event is None or event.query()


class StagedLayer:
    """A layer visit's staging buffer and the copy filling it (`LayerWeightsInFlight`)."""

    def __init__(self, index: int, copy: Future, stream: Any) -> None:
        self.index, self._copy, self._stream, self._waited = index, copy, stream, False

    @property
    def waited(self) -> bool:
        return self._waited

    def ready(self) -> None:
        """Make the stream wait for the copy (once; blocks until the copy is queued)."""
        if not self._waited:
            wait(self._stream, self._copy.result())
            self._waited = True


class LayerWeightsInFlight:
    """Which layer visit uses which staging buffer, and the copies in flight.

    Visits are numbered globally (prefill layers, then each decode step's layers); visit g uses
    staging buffer g mod b (`buffers`, the policy's staging_buffers). With `prefetch`, visit
    g+b is requested as soon as visit g's last expert GEMM is queued (b = 2, double buffering:
    the copy of layer l+1 overlaps layer l's compute, and layer l+2's waits for it); without
    it, each visit's weights are fetched only when it starts, and awaited (no overlap)."""

    def __init__(self, link: WeightLink, num_layers: int, total_visits: int, prefetch: bool,
                 buffers: int = 2) -> None:
        self.link, self.num_layers, self.total = link, num_layers, total_visits
        self.prefetch, self.buffers = prefetch, buffers
        self.pending: dict[int, Future] = {}
        if prefetch:
            for g in range(min(buffers, total_visits)):
                self._request(g, None)

    def _request(self, visit: int, after: Any) -> None:
        if visit < self.total and visit not in self.pending:
            self.pending[visit] = self.link.fetch(visit % self.num_layers, visit % self.buffers,
                                                  after)

    def acquire(self, visit: int, stream: Any) -> StagedLayer:
        """The staging buffer of `visit`; its `ready()` makes `stream` wait for the weights.
        The layer code calls it just before the first streamed expert's GEMM, so the work in
        front of it (output projection, routing, resident experts) neither waits for the
        weights on the GPU nor blocks the launching thread while the copy thread queues them."""
        self._request(visit, None)
        return StagedLayer(visit % self.buffers, self.pending.pop(visit), stream)

    def release(self, visit: int, stream: Any) -> None:
        """The visit's compute has been queued: its buffer may be refilled for visit + b."""
        if self.prefetch:
            self._request(visit + self.buffers, record(stream))


class CPUWorker:
    """One worker thread for CPU attention (torch uses all intra-op threads inside it)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cpu-attention")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def compute_threads(cores: int | None = None) -> int:
    """torch intra-op threads while the pipeline runs: the cores minus one each for the main
    (GPU-driving) thread and the link thread and COPY_THREADS for the memcpy. OpenMP regions
    spin at barriers; with as many OpenMP threads as cores, any other busy thread deschedules
    one of them and every small op of CPU attention waits milliseconds (measured: 5 ms vs.
    300 ms per call on a 2-core machine with one busy core). Cores are those this process may
    run on (a rank of a multi-GPU run has its share: executor/distributed.py)."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores - 2 - COPY_THREADS)


@contextmanager
def pipeline_switch_interval() -> Iterator[None]:
    """Python's thread switch interval set to SWITCH_INTERVAL_S for the enclosed work."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@contextmanager
def pipeline_threads(store: ExpertStore, streams: Streams, tracer: Tracer
                     ) -> Iterator[tuple[WeightLink, CPUWorker]]:
    link, worker = WeightLink(store, streams, tracer), CPUWorker()
    threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads())
    try:
        with pipeline_switch_interval():
            yield link, worker
    finally:
        torch.set_num_threads(threads)
        worker.close()
        link.close()
