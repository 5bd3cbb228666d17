"""The ``remote`` reward: scores images on a reward server over HTTP (VLM judges, OCR, detectors
that run in another process or on another host).

Configuration. Name it like any reward, ``c.rewards = {"remote": 1.0}``; its URL and options come
from, in this order: keyword arguments (``make("remote", url=..., timeout=...)`` or
``from_config(spec, remote={"url": ..., ...})``), then the environment variable
``DIDR_REWARD_URL``. Options may ride in the URL's fragment (the part after ``#``, which HTTP
never sends to the server), so one string configures everything::

  DIDR_REWARD_URL='http://10.0.0.5:8765/score#timeout=60&retries=5&encoding=npy&batch_size=16' \\
    python -m didr_jax.main --config=configs/toy_ddpo.py --config.rewards='{"remote": 1.0}'

Options (keyword argument > URL fragment > default):
  timeout       seconds one attempt may take in all: connect, send, the whole answer     (30)
  retries       further attempts after a failed one                                      (3)
  backoff       seconds before the first retry; doubles each retry: backoff * 2**k     (0.5)
  encoding      "png" (8-bit RGB, round(clip(x, 0, 1) * 255)) or "npy" (float32 as given) (png)
  batch_size    images per request; 0 = the whole batch in one request                    (0)
  batch_timeout seconds one call (a batch: every request, retry and back-off) may take;
                0 = no bound beyond requests x (1 + retries) x timeout + back-off          (0)
  metadata      a JSON-able dict sent with every request (keyword argument only)         ({})

Both deadlines hold whatever the server does (one byte every second keeps no attempt alive
past its timeout): each attempt runs on a helper thread that is abandoned, its socket shut
down, at the deadline. An answer larger than ``MAX_ANSWER_BYTES`` is refused.

Request: ``POST <url>`` with ``Content-Type: application/json`` and the body::

  {"encoding": "png" | "npy", "prompts": [B strings], "metadata": {...},
   "images": [B base64 strings, each a PNG file or a .npy file of a float32 (H, W, 3) array]}

Answer: HTTP 200 with a JSON list of exactly B finite numbers, or ``{"rewards": [...]}`` of the
same. ``didr_jax.rewards.server`` is a reference server that serves any registered reward.

Failure policy: connection errors, timeouts and HTTP 5xx (and 408/429) are retried up to
``retries`` times with exponential back-off, as long as the batch deadline allows; another
HTTP status, or a 200 whose body is not exactly B finite numbers, is not retried. Either way
the call raises ``RewardError`` with one line naming the server and the problem (server down,
"answered 3 rewards for 4 images", "reward at index 2 is not a number", "reward at index 1 is
NaN", "did not score the batch within its batch_timeout"). A batch split into several requests is
all scored or raises: no partial batch is ever returned, so the trainer (which waits for every
reward of an epoch before its first update) takes no step on it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import math
import os
import socket
import threading
import time
import urllib.parse
from typing import Any, Mapping, Sequence

import numpy as np

from didr_jax.errors import RewardError
from didr_jax.rewards.base import Reward, register, to_uint8

ENV_URL = "DIDR_REWARD_URL"
ENCODINGS = ("png", "npy")
DEFAULTS = {"timeout": 30.0, "retries": 3, "backoff": 0.5, "encoding": "png", "batch_size": 0,
            "batch_timeout": 0.0}
MAX_ANSWER_BYTES = 16 << 20  # B numbers as JSON: far below this for any batch
_F32_MAX = float(np.finfo(np.float32).max)
_TYPES = {"timeout": float, "retries": int, "backoff": float, "encoding": str, "batch_size": int,
          "batch_timeout": float}


def one_line(text: Any, limit: int = 200) -> str:
  """``text`` with whitespace runs (newlines included) collapsed, cut to ``limit`` characters."""
  s = " ".join(str(text).split())
  return s if len(s) <= limit else s[: limit - 3] + "..."


# ------------------------------------------------------------------------------ wire format

def encode_image(image: np.ndarray, encoding: str) -> str:
  """One (H, W, 3) image in [0, 1] -> base64 of a PNG (8-bit) or .npy (float32) file."""
  buf = io.BytesIO()
  if encoding == "png":
    from PIL import Image
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
  else:
    np.save(buf, np.asarray(image, np.float32), allow_pickle=False)
  return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str, encoding: str) -> np.ndarray:
  """Inverse of ``encode_image``: float32 (H, W, 3) in [0, 1] (PNG: k / 255)."""
  raw = base64.b64decode(data, validate=True)
  if encoding == "png":
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.float32) / 255.0
  else:
    img = np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"an image has shape {img.shape}, not (H, W, 3)")
  return img


def encode_request(images: np.ndarray, prompts: Sequence[str], encoding: str,
                   metadata: Mapping[str, Any] | None = None) -> bytes:
  return json.dumps({"encoding": encoding, "prompts": list(prompts),
                     "metadata": dict(metadata or {}),
                     "images": [encode_image(x, encoding) for x in images]}).encode("utf-8")


def decode_request(body: bytes) -> tuple[np.ndarray, list[str], dict]:
  """(images (B, H, W, 3) float32, prompts, metadata) of a request body; ValueError if malformed."""
  req = json.loads(body)
  if not isinstance(req, dict):
    raise ValueError("the request must be a JSON object")
  enc, images, prompts = req.get("encoding"), req.get("images"), req.get("prompts")
  if enc not in ENCODINGS:
    raise ValueError(f"encoding {enc!r} is not one of {ENCODINGS}")
  if not isinstance(images, list) or not isinstance(prompts, list) or not images:
    raise ValueError("'images' and 'prompts' must be non-empty lists")
  if len(images) != len(prompts) or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts (strings expected)")
  return (np.stack([decode_image(x, enc) for x in images]), prompts,
          dict(req.get("metadata") or {}))


def parse_rewards(body: bytes, n: int, where: str, offset: int = 0) -> np.ndarray:
  """Validates an answer: a JSON list (or {"rewards": list}) of exactly ``n`` numbers finite in
  float32; else ``RewardError`` naming the first problem (indices offset by ``offset``)."""
  try:
    obj = json.loads(body)
  except (ValueError, UnicodeDecodeError):
    raise RewardError(f"{where} answered something that is not JSON: "
                      f"{one_line(body[:80].decode('utf-8', 'replace'))!r}") from None
  if isinstance(obj, dict) and "rewards" in obj:
    obj = obj["rewards"]
  if not isinstance(obj, list):
    raise RewardError(f"{where} answered {one_line(json.dumps(obj), 80)}; expected a JSON list of "
                      'numbers or {"rewards": [...]}')
  if len(obj) != n:
    raise RewardError(f"{where} answered {len(obj)} rewards for {n} images")
  out = np.zeros(n, np.float32)
  for i, v in enumerate(obj):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise RewardError(f"{where}: reward at index {offset + i} is not a number: "
                        f"{one_line(json.dumps(v), 60)}")
    try:
      f = float(v)
    except OverflowError:  # an integer beyond float64
      f = math.inf
    if math.isnan(f) or not abs(f) <= _F32_MAX:
      what = "NaN" if math.isnan(f) else f"{one_line(v, 40)}, not finite in float32"
      raise RewardError(f"{where}: reward at index {offset + i} is {what}")
    out[i] = f
  return out


# ------------------------------------------------------------------------------ client

def resolve_options(url: str | None, **kwargs) -> tuple[str, dict]:
  """(URL without fragment, options) from keyword arguments > URL fragment > ``DEFAULTS``."""
  url = url or os.environ.get(ENV_URL, "")
  if not url:
    raise RewardError(f"remote reward: no server URL; set {ENV_URL}=http://HOST:PORT/ "
                      "or pass url=... (see didr_jax/rewards/remote.py)")
  parts = urllib.parse.urlsplit(url)
  try:
    parts.port  # noqa: B018  (raises on a port that is not a number)
  except ValueError:
    raise RewardError(f"remote reward: {url!r} has a bad port") from None
  if parts.scheme not in ("http", "https") or not parts.hostname:
    raise RewardError(f"remote reward: {url!r} is not an http:// or https:// URL")
  opts = dict(DEFAULTS)
  for key, value in urllib.parse.parse_qsl(parts.fragment, keep_blank_values=True):
    if key not in DEFAULTS:
      raise RewardError(f"remote reward: unknown option {key!r} in the URL fragment of {url!r}; "
                        f"options: {sorted(DEFAULTS)}")
    opts[key] = value
  opts.update({k: v for k, v in kwargs.items() if v is not None})
  try:
    opts = {k: _TYPES[k](v) for k, v in opts.items()}
  except (TypeError, ValueError) as e:
    raise RewardError(f"remote reward: bad option value ({e})") from None
  if opts["encoding"] not in ENCODINGS:
    raise RewardError(f"remote reward: encoding {opts['encoding']!r} is not one of {ENCODINGS}")
  if not (0 < opts["timeout"] < math.inf and 0 <= opts["backoff"] < math.inf
          and 0 <= opts["batch_timeout"] < math.inf and opts["retries"] >= 0
          and opts["batch_size"] >= 0):
    raise RewardError(f"remote reward: need a finite timeout > 0, finite backoff and "
                      f"batch_timeout >= 0, and retries, batch_size >= 0; got {opts}")
  return urllib.parse.urlunsplit(parts._replace(fragment="")), opts


class RemoteClient:
  """Scores (B, H, W, 3) batches on the server at ``url``; see the module docstring."""

  def __init__(self, url: str | None = None, *, metadata: Mapping[str, Any] | None = None,
               **options):
    self.url, opts = resolve_options(url, **options)
    self.timeout, self.retries, self.backoff = opts["timeout"], opts["retries"], opts["backoff"]
    self.encoding, self.batch_size = opts["encoding"], opts["batch_size"]
    self.batch_timeout = opts["batch_timeout"]
    self.metadata = dict(metadata or {})
    json.dumps(self.metadata)  # refuse non-JSON-able metadata now, not at the first batch
    p = urllib.parse.urlsplit(self.url)
    self._conn = (http.client.HTTPSConnection if p.scheme == "https" else
                  http.client.HTTPConnection)
    self._host, self._port = p.hostname, p.port
    self._path = (p.path or "/") + (f"?{p.query}" if p.query else "")

  def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    n = len(images)
    size = self.batch_size or n
    deadline = time.monotonic() + self.batch_timeout if self.batch_timeout else math.inf
    out = [self._score(images[s: s + size], prompts[s: s + size], s, deadline)
           for s in range(0, n, size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def _score(self, images, prompts, offset: int, deadline: float) -> np.ndarray:
    body = encode_request(images, prompts, self.encoding, self.metadata)
    return parse_rewards(self._post(body, deadline), len(images),
                         f"remote reward at {self.url}", offset)

  def _attempt(self, body: bytes, deadline: float) -> tuple[int, bytes]:
    """One POST on a helper thread, abandoned (its socket shut down) at ``deadline``:
    ``TimeoutError`` then, whatever the server does meanwhile."""
    conn = self._conn(self._host, self._port, timeout=max(deadline - time.monotonic(), 1e-3))
    box: dict[str, Any] = {}

    def exchange():
      try:
        conn.request("POST", self._path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        box["answer"] = resp.status, resp.read(MAX_ANSWER_BYTES + 1)
      except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
        box["error"] = e

    worker = threading.Thread(target=exchange, name="remote-reward-request", daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0.0))
    if worker.is_alive():
      sock = conn.sock
      if sock is not None:  # wakes the worker's blocked read; it ends on its own
        with contextlib.suppress(OSError):
          sock.shutdown(socket.SHUT_RDWR)
      conn.close()
      raise TimeoutError
    conn.close()
    if "error" in box:
      raise box["error"]
    return box["answer"]

  def _post(self, body: bytes, deadline: float = math.inf) -> bytes:
    """The body of the first HTTP 200 within 1 + ``retries`` attempts, each within ``timeout``
    and all before ``deadline`` (the batch's), else ``RewardError``."""
    t0, last, attempts = time.monotonic(), "", 0
    for attempt in range(self.retries + 1):
      if attempt:
        pause = self.backoff * 2 ** (attempt - 1)
        if time.monotonic() + pause >= deadline:
          break
        time.sleep(pause)
      start = time.monotonic()
      if start >= deadline:
        break
      attempts += 1
      cut = start + self.timeout > deadline
      try:
        status, data = self._attempt(body, min(start + self.timeout, deadline))
      except TimeoutError:
        last = ("no answer before the batch_timeout" if cut else
                f"no answer within the {self.timeout:g} s timeout")
        continue
      except ConnectionRefusedError:
        last = "connection refused"
        continue
      except (OSError, http.client.HTTPException) as e:
        last = one_line(f"{type(e).__name__}: {e}", 120)
        continue
      if len(data) > MAX_ANSWER_BYTES:
        raise RewardError(f"remote reward at {self.url} answered more than "
                          f"{MAX_ANSWER_BYTES} bytes")
      if status == 200:
        return data
      last = f"HTTP {status}: {_error_text(data)}"
      if status < 500 and status not in (408, 429):
        raise RewardError(f"remote reward at {self.url} refused the request ({last})")
    spent = f"{attempts} attempts in {time.monotonic() - t0:.1f} s, last: {last or 'none'}"
    if attempts < self.retries + 1 or time.monotonic() >= deadline:
      raise RewardError(f"remote reward: the server at {self.url} did not score the batch "
                        f"within its batch_timeout of {self.batch_timeout:g} s: {spent}")
    raise RewardError(f"remote reward: the server at {self.url} is down or failing: {spent}")


def _error_text(data: bytes) -> str:
  """The server's ``{"error": ...}`` message, or the start of its body, on one line."""
  try:
    obj = json.loads(data)
    if isinstance(obj, dict) and "error" in obj:
      return one_line(obj["error"], 160)
  except (ValueError, UnicodeDecodeError):
    pass
  return one_line(data[:160].decode("utf-8", "replace"), 160) or "(empty body)"


@register("remote")
def remote(url: str | None = None, timeout: float | None = None, retries: int | None = None,
           backoff: float | None = None, encoding: str | None = None,
           batch_size: int | None = None, batch_timeout: float | None = None,
           metadata: Mapping[str, Any] | None = None) -> Reward:
  """Rewards from an HTTP reward server (see the module docstring for URL, options, format)."""
  client = RemoteClient(url, timeout=timeout, retries=retries, backoff=backoff,
                        encoding=encoding, batch_size=batch_size, batch_timeout=batch_timeout,
                        metadata=metadata)
  return Reward("remote", client)
