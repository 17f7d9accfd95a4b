"""The HTTP server process: uvicorn, whose SIGTERM / SIGINT drains the service before it stops.

A rolling deploy (or Ctrl-C) sends SIGTERM: /readyz answers 503 at once (the load balancer stops
sending new requests) while the API keeps answering, the workers claim no more jobs, a running
job gets `drain_timeout` s to finish, and then the server stops; VideoService.close() hands a job
still running back to the queue without charging it an attempt. The process exits 0. A second
signal stops at once (the job is handed back the same way).
"""

from __future__ import annotations

import signal
import sys
import threading

import uvicorn

from wan_rt.service.service import VideoService


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: VideoService, drain_timeout: float):
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout
        self._drain_started = False

    def handle_exit(self, sig: int, frame) -> None:
        # In place of uvicorn's handler, which re-raises the signal once it has shut down (exit 143, not 0).
        if self._drain_started:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self._drain_started = True
        print(f"wan-rt serve: {signal.Signals(sig).name}: draining; running jobs have {self.drain_timeout:g} s "
              "to finish", file=sys.stderr, flush=True)
        threading.Thread(target=self._drain, name="wan-rt-drain", daemon=True).start()

    def _drain(self) -> None:
        if not self.service.drain(self.drain_timeout):
            print("wan-rt serve: drain timeout: the running jobs go back to the queue", file=sys.stderr, flush=True)
        self.should_exit = True
