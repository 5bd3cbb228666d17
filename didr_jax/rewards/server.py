"""A reference reward server (standard library HTTP) for the ``remote`` reward: serves any
registered reward over the request format of ``didr_jax.rewards.remote``.

  python -m didr_jax.rewards.server --reward=jpeg_compressibility --port=8765
  DIDR_REWARD_URL=http://127.0.0.1:8765/ python -m didr_jax.main ... \\
      --config.rewards='{"remote": 1.0}'

``POST /`` (any path) scores a batch and answers ``{"rewards": [...]}``; a malformed request gets
HTTP 400 and a failing reward HTTP 500, each with ``{"error": "<one line>"}``. ``GET /`` answers
``{"reward": NAME}`` (a health check). Requests are served on threads; the reward itself runs
under a lock (reward models need not be thread-safe). ``--port=0`` picks a free port; the first
line on stdout is ``serving REWARD on http://HOST:PORT/``.

Limits: a request body over ``--max_body_mb`` is answered HTTP 413 without being read (a
missing or bad Content-Length: 411 / 400); a client silent for ``--idle_timeout`` seconds is
disconnected, and one whose body has not arrived within ``--request_timeout`` seconds (or that
falls silent within it) is answered 408 and disconnected.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from didr_jax import rewards
from didr_jax.rewards.base import Reward
from didr_jax.rewards.remote import decode_request, one_line

MAX_BODY_MB, IDLE_TIMEOUT, REQUEST_TIMEOUT = 256, 60.0, 600.0


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = 0, *,
                max_body: int = MAX_BODY_MB << 20, idle_timeout: float = IDLE_TIMEOUT,
                request_timeout: float = REQUEST_TIMEOUT) -> ThreadingHTTPServer:
  """An HTTP server scoring with ``reward`` (not started: call ``serve_forever``); requests
  bounded by ``max_body`` bytes, ``idle_timeout`` seconds of silence and ``request_timeout``
  seconds to send a body (see the module docstring)."""
  lock = threading.Lock()

  class Handler(BaseHTTPRequestHandler):
    # socket timeout of each read and write; the base class drops a connection that times out
    # while sending its request line or headers
    timeout = idle_timeout

    def _read_body(self) -> bytes | None:
      """The request body within the limits; None after answering the client's error."""
      raw = self.headers.get("Content-Length")
      if raw is None:
        return self._refuse(411, "a Content-Length header is required")
      try:
        n = int(raw)
        if n < 0:
          raise ValueError
      except ValueError:
        return self._refuse(400, f"bad Content-Length {one_line(raw, 40)!r}")
      if n > max_body:
        return self._refuse(413, f"the request body ({n} bytes) is over this server's limit "
                            f"of {max_body} bytes; send fewer images per request (batch_size)")
      deadline, parts, got = time.monotonic() + request_timeout, [], 0
      try:
        while got < n:
          if time.monotonic() > deadline:
            raise TimeoutError
          chunk = self.rfile.read1(min(n - got, 1 << 20))
          if not chunk:
            self.close_connection = True  # the client went away mid-body
            return None
          parts.append(chunk)
          got += len(chunk)
      except TimeoutError:
        return self._refuse(408, f"the request body did not arrive in time ({got} of {n} bytes)")
      return b"".join(parts)

    def _refuse(self, status: int, message: str) -> None:
      self.close_connection = True  # the unread rest of a body must not be parsed as a request
      try:
        self._answer(status, {"error": message})
      except OSError:
        pass  # the client is gone or not reading: nothing more to do
      return None

    def _answer(self, status: int, obj):
      body = json.dumps(obj).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):
      self._answer(200, {"reward": reward.name})

    def do_POST(self):
      body = self._read_body()
      if body is None:
        return None
      try:
        images, prompts, _ = decode_request(body)
      except Exception as e:  # noqa: BLE001  (any malformed request is the client's error)
        return self._answer(400, {"error": one_line(f"bad request: {e}")})
      try:
        with lock:
          scores = reward(images, prompts)
      except Exception as e:  # noqa: BLE001
        return self._answer(500, {"error": one_line(f"reward {reward.name!r} failed: {e}")})
      self._answer(200, {"rewards": [float(s) for s in scores]})

    def log_message(self, *args):  # quiet: one line per request would flood a training log
      pass

  server = ThreadingHTTPServer((host, port), Handler)
  server.daemon_threads = True
  return server


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse prints its usage first)
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def main(argv=None):
  ap = _Parser(description=__doc__.splitlines()[0])
  ap.add_argument("--reward", required=True, help=f"one of {rewards.names()}")
  ap.add_argument("--reward_kwargs", default="{}", help='JSON keyword arguments, e.g. '
                  '\'{"quality": 80}\'')
  ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
  ap.add_argument("--port", type=int, default=8765, help="0 = any free port")
  ap.add_argument("--max_body_mb", type=float, default=MAX_BODY_MB,
                  help="larger request bodies are answered 413 unread")
  ap.add_argument("--idle_timeout", type=float, default=IDLE_TIMEOUT,
                  help="seconds a client may stay silent")
  ap.add_argument("--request_timeout", type=float, default=REQUEST_TIMEOUT,
                  help="seconds a client may take to send its request body")
  a = ap.parse_args(argv)
  if a.reward not in rewards.names():
    ap.error(f"unknown reward {a.reward!r}; registered: {rewards.names()}")
  if not all(0 < v < float("inf") for v in (a.max_body_mb, a.idle_timeout, a.request_timeout)):
    ap.error("--max_body_mb, --idle_timeout and --request_timeout must be finite and > 0")
  try:
    kwargs = json.loads(a.reward_kwargs)
    if not isinstance(kwargs, dict):
      raise ValueError("not a JSON object")
    reward = rewards.make(a.reward, **kwargs)
  except (ValueError, TypeError) as e:
    ap.error(f"--reward_kwargs={a.reward_kwargs}: {e}")
  server = make_server(reward, a.host, a.port, max_body=int(a.max_body_mb * (1 << 20)),
                       idle_timeout=a.idle_timeout, request_timeout=a.request_timeout)
  host, port = server.server_address[:2]
  print(f"serving {a.reward} on http://{host}:{port}/", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  main()
