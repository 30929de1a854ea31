"""`mx.compile` for functions that worker threads call, with a way for a thread to free its share.

MLX keeps each thread's compiled graphs in thread-local storage (`CompileCache`), which the OS
thread's exit destroys; its entries hold Python objects, so destroying them takes the GIL. A
worker thread (the server's generation thread) that ends while the interpreter is finalizing
cannot take it, is unwound mid-destructor and aborts the process ("terminate called without an
active exception", SIGABRT: seen on the server's Ctrl-C in ~1 of 3 runs once decoding used more
compiled kernels, backtrace in `CompileCache::_M_dispose` under `__call_tls_dtors`).

MLX erases a compiled function's entries from the calling thread's cache when the `mx.compile`
object is destroyed, so `per_thread` gives each thread its own compiled object (made on first
call, in a `threading.local`) and `release()`, called by a thread before it ends, destroys that
thread's objects and so empties its cache while the GIL can still be taken.
"""

from __future__ import annotations

import threading
from typing import Callable

import mlx.core as mx

_local = threading.local()


def per_thread(fn: Callable | None = None, **compile_kwargs):
    """`mx.compile(fn, **compile_kwargs)`, one compiled object per calling thread; usable as
    `@per_thread` or `@per_thread(shapeless=True)`."""
    if fn is None:
        return lambda f: per_thread(f, **compile_kwargs)
    key = object()  # this function's slot in each thread's table

    def call(*args, **kwargs):
        table = getattr(_local, "compiled", None)
        if table is None:
            table = _local.compiled = {}
        compiled = table.get(key)
        if compiled is None:
            compiled = table[key] = mx.compile(fn, **compile_kwargs)
        return compiled(*args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "compiled")
    call.__doc__ = fn.__doc__
    call.__wrapped__ = fn
    return call


def release() -> int:
    """Destroy the calling thread's compiled objects (and so its compile-cache entries); returns
    how many. They are made again on the thread's next call."""
    table = getattr(_local, "compiled", None)
    if not table:
        return 0
    count = len(table)
    table.clear()
    return count
