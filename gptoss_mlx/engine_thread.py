"""The engine thread: the one thread that does all of a process's MLX work.

MLX streams belong to the thread that made them (MLX >= 0.31). A lazy array built on one thread
cannot be evaluated on another ("There is no Stream(cpu, 1) in current thread"), and the process
may abort later. Evaluated arrays, such as loaded weights, are plain buffers that any thread may
read. So model loading, prefill and decoding all run on one thread, and front ends hand it work
from their own threads: the CLI's main thread, the TUI's workers, or a server's event loop.

    thread = engine_thread()
    model, tokenizer = thread.call(load, path)     # waits; an exception is raised here
    for token in thread.stream(engine_generator):  # produced there, consumed here
        ...
    async for event in thread.astream(chat_events):  # the same, from asyncio
        ...

Work submitted from the engine thread itself runs inline, so code that already runs there can
use the same calls. The thread is a daemon that is joined at interpreter exit. A stream that is
still running stops at its next item, so exit never tears MLX down under a running step.

Starting the engine thread lowers the interpreter's GIL switch interval to ``SWITCH_INTERVAL_S``
(if it is higher). Decoding is host-bound: each token's step is Python building a graph, and when
a front end's thread (a server's event loop, the TUI) holds the GIL, the engine thread waiting
for it gets it only when that thread blocks or after the switch interval, 5 ms by default: as
long as a token's step (docs/measurements.md: through the server, on the GPU machine).
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import sys
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Callable, Iterator, TypeVar

import mlx.core as mx

T = TypeVar("T")

_ITEM, _ERROR, _END = "item", "error", "end"
# The GIL switch interval while an engine thread runs (see above).
SWITCH_INTERVAL_S = 0.0005


class EngineThread:
    """A thread that runs submitted callables and generators one at a time, in order."""

    def __init__(self, name: str = "gptoss-mlx-engine"):
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._cancel: threading.Event | None = None  # the cancel of the stream being made
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
        # A thread's streams must be destroyed before it ends (ml-explore/mlx#3395): left to
        # interpreter exit they abort the process ("terminate called without an active exception").
        mx.synchronize()  # a step queued ahead (async_eval) finishes first
        mx.clear_streams()

    @property
    def is_current(self) -> bool:
        """Whether the caller is running on this thread."""
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future:
        """Queue ``fn(*args, **kwargs)``; its Future holds the result or the exception.
        An array result is evaluated first: a lazy one cannot leave the thread that built it."""
        future: Future = Future()

        def job():
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
                if isinstance(result, mx.array):
                    mx.eval(result)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
            else:
                future.set_result(result)

        if self._closing.is_set():
            raise RuntimeError("the engine thread has shut down")
        self._jobs.put(job)
        return future

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn`` on this thread and wait for its result (inline if already on it)."""
        if self.is_current:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def stream(self, items: Iterator[T]) -> Iterator[T]:
        """Run the generator ``items`` on this thread; its items come back here through a queue
        as they are made (it does not wait for the consumer). An exception it raises is raised
        here. Closing this iterator, or an exception here (Ctrl-C), closes the generator at its
        next item, and waits until its clean-up has run."""
        if self.is_current:
            yield from items
            return
        out: queue.SimpleQueue = queue.SimpleQueue()
        cancel = threading.Event()
        self.submit(self._drive, items, out.put, cancel)
        entry = (_ITEM, None)
        try:
            while (entry := out.get())[0] == _ITEM:
                yield entry[1]
        finally:
            if entry[0] == _ITEM:  # left early: close the generator and wait for its clean-up
                cancel.set()
                _drain(out)
        _raise_error(entry)

    async def astream(self, items: Iterator[T]) -> AsyncIterator[T]:
        """:meth:`stream` for asyncio: the items arrive on the running event loop."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(entry) -> None:
            loop.call_soon_threadsafe(out.put_nowait, entry)

        done = asyncio.wrap_future(self.submit(self._drive, items, put, cancel))
        entry = (_ITEM, None)
        try:
            while (entry := await out.get())[0] == _ITEM:
                yield entry[1]
        finally:
            if entry[0] == _ITEM:
                cancel.set()
                await done
        _raise_error(entry)

    def cancelled(self) -> bool:
        """On this thread, inside a stream's generator: whether its consumer has left (or the
        thread is shutting down), so that long work within one item (a prefill) can end early."""
        cancel = self._cancel if self.is_current else None
        return cancel is not None and (cancel.is_set() or self._closing.is_set())

    def _drive(self, items: Iterator[T], put: Callable, cancel: threading.Event) -> None:
        """Run ``items`` to its end, or until ``cancel`` or shutdown; ``put`` every outcome."""
        self._cancel = cancel
        try:
            for item in items:
                put((_ITEM, item))
                if cancel.is_set() or self._closing.is_set():
                    items.close()  # GeneratorExit at its yield: it cleans up on this thread
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((_ERROR, e))
        else:
            put((_END, None))
        finally:
            self._cancel = None

    def shutdown(self) -> None:
        """Stop running streams at their next item, finish queued work, end the thread."""
        self._closing.set()
        self._jobs.put(None)
        if not self.is_current:
            self._thread.join()


def _drain(out: queue.SimpleQueue) -> None:
    """Wait for the end of a closed stream's items: its clean-up has then run. A Ctrl-C
    meanwhile (a second one) is raised after it, so that the consumer never goes on while the
    generator still changes what it shares (a chat's history)."""
    interrupted = None
    while True:
        try:
            while out.get()[0] == _ITEM:
                pass
            break
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted


def _raise_error(entry: tuple) -> None:
    if entry[0] == _ERROR:
        raise entry[1]


_default: EngineThread | None = None
_default_lock = threading.Lock()


def engine_thread() -> EngineThread:
    """The process's engine thread, started on first use and shut down at interpreter exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = EngineThread()
            atexit.register(_default.shutdown)
        return _default
