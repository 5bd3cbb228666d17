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
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from didr_jax.rewards.base import Reward
from didr_jax.rewards.remote import decode_request, one_line


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
  """An HTTP server scoring with ``reward`` (not started: call ``serve_forever``)."""
  lock = threading.Lock()

  class Handler(BaseHTTPRequestHandler):
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
      try:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
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


def main(argv=None):
  from didr_jax import rewards
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reward", required=True, help=f"one of {rewards.names()}")
  ap.add_argument("--reward_kwargs", default="{}", help='JSON keyword arguments, e.g. '
                  '\'{"quality": 80}\'')
  ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
  ap.add_argument("--port", type=int, default=8765, help="0 = any free port")
  a = ap.parse_args(argv)
  if a.reward not in rewards.names():
    ap.error(f"unknown reward {a.reward!r}; registered: {rewards.names()}")
  reward = rewards.make(a.reward, **json.loads(a.reward_kwargs))
  server = make_server(reward, a.host, a.port)
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
