"""Which jitted functions traced (and so compiled) inside a block, from JAX's monitoring events."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from jax import monitoring

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # recorded once per jit cache miss


@contextlib.contextmanager
def traced_functions() -> Iterator[list[str]]:
    """``with traced_functions() as names:`` -> the name of every function jit traced in the block."""
    names: list[str] = []

    def listen(event: str, duration: float, **metadata) -> None:
        del duration
        if event == TRACE_EVENT:
            names.append(str(metadata.get("fun_name")))

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        monitoring.unregister_event_duration_listener(listen)
