"""async_op=True: dispatch and combine return before their exchange ends, so the caller can
compute meanwhile (the shared expert, the next micro-batch's attention); `.wait()` joins it and
returns what the synchronous call returns, with its autograd graph.

A Buffer runs its engine calls on one worker thread of its own, in the order they were made (the
same order on every rank, as its collectives need): several calls may be in flight (two
micro-batches' dispatches), and a synchronous call made meanwhile queues behind them. The engine
releases the GIL, so on the CPU the exchange and the caller's work run at the same time. On CUDA
the call's device work goes on the stream that was current when it was made (put a Buffer's
calls on a side stream of their own to overlap on the GPU, README: Overlap); `previous_event`
makes that stream wait for an event first, and `.wait()` makes the current stream wait for the
call's work."""

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch


class InOrder:
    """The worker thread of one Buffer: runs engine calls one at a time, in submission order."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._in_flight = 0

    def submit(self, fn: Callable, stream=None, previous_event=None, record_done: bool = False) -> Future:
        """fn() on the worker, with `stream` (a torch.cuda.Stream, or None on the CPU) current
        there, after that stream waited for `previous_event`. -> its future, of (result, done):
        done is an event recorded after fn's work when record_done (CUDA), else None."""
        with self._lock:
            self._in_flight += 1

        def job():
            try:
                if stream is None:
                    return fn(), None
                with torch.cuda.stream(stream):
                    if previous_event is not None:
                        stream.wait_event(previous_event)
                    result = fn()
                    if not record_done:
                        return result, None
                    done = torch.cuda.Event()
                    done.record(stream)
                    return result, done
            finally:
                with self._lock:
                    self._in_flight -= 1

        return self._pool.submit(job)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._in_flight > 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Pending:
    """A dispatch or combine in flight. `wait()` -> what the synchronous call returns (raises
    what it would have raised), once; `done()`: whether the host part of the call has ended
    (wait() then does not block). Later calls on the Buffer need not wait for it: they queue
    behind it, in order."""

    def __init__(self, future: Future, finish: Callable, device: torch.device, stream=None):
        self._future = future
        self._finish = finish
        self._device = device
        self._stream = stream  # the call's (CUDA)
        self._value = None
        self._error = None
        self._waited = False

    def done(self) -> bool:
        return self._future.done()

    def wait(self):
        if not self._waited:
            self._waited = True
            try:
                self._value = self._join()
            except BaseException as error:  # every wait() raises it
                self._error = error
        if self._error is not None:
            raise self._error
        return self._value

    def _join(self):
        result, done_event = self._future.result()
        if done_event is None:
            return self._finish(result)
        # The caller's stream waits for the call's work (no host wait). The autograd node is
        # made on the call's stream, so that the backward runs there too, with the handle's
        # arrays, which live on it.
        torch.cuda.current_stream(self._device).wait_event(done_event)
        with torch.cuda.stream(self._stream):
            value = self._finish(result)
        _record_on_current(value, self._device)
        return value


def _record_on_current(value, device) -> None:
    """Outputs made on the call's stream are read on the current one: the allocator must not hand
    their memory to the call's stream again before the current stream is done with them."""
    current = torch.cuda.current_stream(device)
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, torch.Tensor) and item.is_cuda:
            item.record_stream(current)


def call_stream(device: torch.device, previous_event) -> Optional[torch.cuda.Stream]:
    """The stream a call made now runs on (the current one), or None on the CPU."""
    if device.type != "cuda":
        if previous_event is not None:
            raise ValueError("previous_event: a CUDA event only orders a CUDA Buffer's calls; this Buffer is on "
                             "the CPU (pass None)")
        return None
    if previous_event is not None and not isinstance(previous_event, torch.cuda.Event):
        raise TypeError(f"previous_event: must be a torch.cuda.Event or None, got {type(previous_event).__name__}")
    return torch.cuda.current_stream(device)
