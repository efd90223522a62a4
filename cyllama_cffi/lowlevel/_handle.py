"""Ownership of one C handle: freed exactly once, never used after.

Each thin class (model, context, sampler, batch) owns one pointer through a
``CHandle``. ``close()`` frees it; a ``weakref.finalize`` frees it when the
object is collected or at interpreter exit (finalizers run newest first, so a
context goes before the model it was made from). Objects that borrow a
parent's pointer register as dependents and are closed before the parent.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Optional

from ..errors import ClosedError


class CHandle:
    """Base for classes that own a C pointer."""

    _kind = "object"

    def __init__(self, pointer: Any, free: Callable[[Any], None]) -> None:
        self._ptr = pointer
        self._dependents: "weakref.WeakSet[CHandle]" = weakref.WeakSet()
        self._close_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, free, pointer)

    @property
    def ptr(self) -> Any:
        """The live C pointer; ``ClosedError`` after ``close()``."""
        pointer = self._ptr
        if pointer is None:
            raise ClosedError(f"this {self._kind} is closed")
        return pointer

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _depend_on(self, parent: "CHandle") -> None:
        """Close this object before ``parent`` is closed."""
        parent._dependents.add(self)

    def close(self) -> None:
        """Free the C object now. Idempotent; dependents are closed first."""
        with self._close_lock:
            if self._ptr is None:
                return
            for dependent in list(self._dependents):
                dependent.close()
            self._ptr = None
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Optional[object]) -> None:
        self.close()
