"""The address a server is to listen on, checked before the model is loaded.

uvicorn finds a host that does not resolve, or a port another process holds, only when it binds: after the model
load and the "serving on" line, as a few log lines and exit code 3. This check says it first, in one line.
"""

from __future__ import annotations

import socket

from onnxpipe.errors import OnnxpipeError


def check_address(host: str, port: int) -> None:
    """Refuse ``host``:``port`` in one line naming it when no socket can be bound there now (uvicorn binds with
    SO_REUSEADDR, as this probe does, so a port left in TIME_WAIT passes and one held by a listener does not)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as e:
        raise OnnxpipeError(f"--host {host}: not an address to listen on ({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise OnnxpipeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
