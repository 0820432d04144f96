"""An S3-compatible server for the tests that can be restarted mid-job: moto's S3 app on
127.0.0.1:PORT, served from this process.

``python s3_server.py PORT [DOWN_SECONDS]`` serves until SIGTERM. On SIGUSR1 it restarts:
it stops accepting, closes the listening socket and every open client connection (requests
in flight get a reset), listens to nothing for DOWN_SECONDS (default 3), then listens again
on the same port with the same buckets and objects, as a restarted S3 endpoint comes back
with its durable storage. (moto's own ``moto_server`` keeps objects in memory, so killing
and starting it again would lose every bucket.)
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

APP = DomainDispatcherApplication(create_backend_app)  # one app, one set of backends, across restarts
OPEN: set[socket.socket] = set()  # client connections being served
LOCK = threading.Lock()


class Handler(MotoRequestHandler):
    def setup(self) -> None:
        with LOCK:
            OPEN.add(self.request)
        super().setup()

    def finish(self) -> None:
        with LOCK:
            OPEN.discard(self.request)
        super().finish()


def serve(port: int):
    server = make_server("127.0.0.1", port, APP, threaded=True, request_handler=Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    port = int(sys.argv[1])
    down = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    server = serve(port)
    restart = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: restart.set())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        if not restart.wait(0.2):  # poll: a signal handler must not race a blocking wait
            continue
        restart.clear()
        server.shutdown()
        server.server_close()
        with LOCK:
            for conn in list(OPEN):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        time.sleep(down)
        server = serve(port)


if __name__ == "__main__":
    main()
