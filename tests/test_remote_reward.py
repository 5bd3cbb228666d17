"""The ``remote`` reward against the reference server (a subprocess on 127.0.0.1) and against
tiny in-thread servers that misbehave: equal to the local reward, retries then one clear
``RewardError`` when the server dies or answers garbage, bounded timeouts, no partial batch, and
a training run with a dead reward server takes no step and prints one line."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from didr_jax import rewards
from didr_jax.rewards import remote as remote_lib
from didr_jax.errors import RewardError
from didr_jax.rewards.base import Reward
from didr_jax.rewards.server import make_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"retries": 2, "backoff": 0.05, "timeout": 2.0}  # 3 attempts, 0.15 s of back-off


def _images(n=5, size=16, seed=0):
  return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def reference_server(reward="jpeg_compressibility"):
  """``python -m didr_jax.rewards.server`` on a free loopback port; yields (url, process)."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.Popen([sys.executable, "-m", "didr_jax.rewards.server", f"--reward={reward}",
                           "--port=0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
  try:
    timer = threading.Timer(30, proc.kill)  # a server that never prints cannot hang the test
    timer.start()
    line = proc.stdout.readline()
    timer.cancel()
    assert line.startswith(f"serving {reward} on http://127.0.0.1:"), line
    yield line.split()[-1], proc
  finally:
    proc.kill()
    proc.wait(timeout=10)


@contextlib.contextmanager
def thread_server(answer):
  """A loopback server whose POST handler is ``answer(handler, body) -> (status, bytes)``;
  yields (url, list of request bodies received)."""
  seen = []

  class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
      body = self.rfile.read(int(self.headers["Content-Length"]))
      seen.append(body)
      status, out = answer(self, body)
      self.send_response(status)
      self.send_header("Content-Length", str(len(out)))
      self.end_headers()
      self.wfile.write(out)

    def log_message(self, *args):
      pass

  server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/score", seen
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_png_and_npy_encodings_round_trip():
  x = _images(2)
  png = remote_lib.decode_image(remote_lib.encode_image(x[0], "png"), "png")
  np.testing.assert_array_equal(png * 255.0, rewards.base.to_uint8(x[:1])[0].astype(np.float32))
  npy = remote_lib.decode_image(remote_lib.encode_image(x[1], "npy"), "npy")
  np.testing.assert_array_equal(npy, x[1])


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_reference_server_equals_the_local_reward(encoding):
  x, prompts = _images(5), [f"p{i}" for i in range(5)]
  local = rewards.make("jpeg_compressibility")(x, prompts)
  with reference_server() as (url, _):
    for batch_size in (0, 2):  # one request, and 3 requests of 2 + 2 + 1 images
      r = rewards.make("remote", url=url, encoding=encoding, batch_size=batch_size, **FAST)
      np.testing.assert_array_equal(r(x, prompts), local)
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    assert json.loads(conn.getresponse().read()) == {"reward": "jpeg_compressibility"}
    conn.request("POST", "/", b'{"encoding": "png", "images": ["@@"], "prompts": ["a"]}')
    resp = conn.getresponse()
    assert resp.status == 400 and "bad request" in json.loads(resp.read())["error"]
    conn.close()
  assert len(np.unique(local)) == 5  # distinct scores: a reordering would show


def test_prompts_images_and_metadata_reach_the_server_in_order():
  probe = Reward("probe", lambda x, p: x.mean(axis=(1, 2, 3)) + np.array([len(s) for s in p]))
  server = make_server(probe, "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    x, prompts = _images(5), ["a", "bb", "ccc", "dddd", "eeeee"]
    url = f"http://127.0.0.1:{server.server_address[1]}/#batch_size=2&encoding=npy"
    got = rewards.make("remote", url=url, retries=0)(x, prompts)
    np.testing.assert_allclose(got, x.mean(axis=(1, 2, 3)) + np.arange(1, 6), rtol=1e-6)
  finally:
    server.shutdown()
    server.server_close()
  meta = {"run": "r1", "epoch": 3}
  with thread_server(lambda h, b: (200, b"[0.5]")) as (url, seen):
    rewards.make("remote", url=url, metadata=meta, encoding="npy")(x[:1], ["a"])
  req = json.loads(seen[0])
  assert req["metadata"] == meta and req["prompts"] == ["a"] and req["encoding"] == "npy"


def test_server_killed_mid_run_retries_then_one_clear_line():
  x = _images(4)
  with reference_server() as (url, proc):
    r = rewards.make("remote", url=url, **FAST)
    assert r(x, ["a"] * 4).shape == (4,)  # alive: scores
    proc.kill()
    proc.wait(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(RewardError) as e:
      r(x, ["a"] * 4)
    elapsed = time.monotonic() - t0
  msg = str(e.value)
  assert "\n" not in msg and url in msg and "down" in msg and "3 attempts" in msg
  assert "connection refused" in msg
  assert 0.15 <= elapsed < 5.0  # waited the back-off (0.05 + 0.1 s), then gave up


def test_no_partial_batch_when_a_later_request_fails():
  calls = []

  def answer(h, body):  # the batch's first request succeeds, every later one fails
    calls.append(1)
    if len(calls) == 1:
      return 200, json.dumps([1.0] * len(json.loads(body)["images"])).encode()
    return 500, b'{"error": "model crashed"}'

  with thread_server(answer) as (url, seen):
    r = rewards.make("remote", url=url, batch_size=2, **FAST)
    with pytest.raises(RewardError, match=r"HTTP 500: model crashed"):
      r(_images(4), ["a"] * 4)
  assert len(seen) == 1 + 3  # one good request, then the second one tried 1 + retries times


@pytest.mark.parametrize("status,body,expected,attempts", [
    (200, b"[1, 2]", "answered 2 rewards for 3 images", 1),
    (200, b'[1, "high", 3]', "reward at index 1 is not a number", 1),
    (200, b'{"rewards": [1, NaN, 3]}', "reward at index 1 is NaN", 1),
    (200, b"[1, 2, Infinity]", "reward at index 2 is inf", 1),
    (200, b"<html>\n<body>oops</body>\n</html>", "not JSON", 1),
    (200, b'{"score": 1}', "expected a JSON list", 1),
    (500, b'{"error": "CUDA out of memory"}', "HTTP 500: CUDA out of memory", 3),
    (503, b"", "HTTP 503: (empty body)", 3),
    (400, b'{"error": "bad image size"}', "refused the request (HTTP 400: bad image size)", 1),
])
def test_garbage_answers_raise_one_line_naming_the_problem(status, body, expected, attempts):
  with thread_server(lambda h, b: (status, body)) as (url, seen):
    r = rewards.make("remote", url=url, **FAST)
    with pytest.raises(RewardError) as e:
      r(_images(3), ["a", "b", "c"])
  msg = str(e.value)
  assert expected in msg and url in msg and "\n" not in msg, msg
  assert len(seen) == attempts  # 5xx retried; a garbage 200 or a 4xx is not


def test_a_server_sleeping_past_the_timeout_is_bounded():
  stop = threading.Event()

  def sleepy(h, body):
    stop.wait(10)  # far past the timeout; released at the end of the test
    return 200, b"[0]"

  with thread_server(sleepy) as (url, seen):
    r = rewards.make("remote", url=url, timeout=0.3, retries=1, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"no answer within the 0.3 s timeout"):
      r(_images(1), ["a"])
    elapsed = time.monotonic() - t0
    stop.set()
  assert len(seen) == 2 and 0.6 <= elapsed < 2.0  # 2 attempts x 0.3 s + 0.05 s back-off


def test_url_and_options_from_the_environment(monkeypatch):
  monkeypatch.delenv(remote_lib.ENV_URL, raising=False)
  with pytest.raises(RewardError, match=remote_lib.ENV_URL):
    rewards.make("remote")
  monkeypatch.setenv(remote_lib.ENV_URL, "http://h:1/s?k=v#timeout=7&encoding=npy&batch_size=4")
  url, opts = remote_lib.resolve_options(None, timeout=9)
  assert url == "http://h:1/s?k=v"  # the fragment is never sent
  assert opts == {**remote_lib.DEFAULTS, "timeout": 9.0, "encoding": "npy", "batch_size": 4}
  for bad, why in [("http://h:1/#retry=2", "unknown option 'retry'"),
                   ("http://h:1/#encoding=jpeg", "encoding 'jpeg'"),
                   ("http://h:1/#timeout=0", "timeout > 0"),
                   ("http://h:1/#timeout=inf", "finite timeout"), ("h:1", "not an http"),
                   ("http://h:port/", "bad port"), ("http://h:1/#retries=two", "bad option")]:
    with pytest.raises(RewardError, match=why):
      rewards.make("remote", url=bad)
  built = rewards.from_config({"remote": 0.5, "jpeg_compressibility": 1.0},
                              remote={"url": "http://h:2/", "retries": 0})
  assert built.name == "0.5*remote+1*jpeg_compressibility"


def _stub_trainer():
  """A ``DDPOTrainer`` without a model: sampling returns random images, ``train_on`` records
  the rewards it was given. The loop's real epoch (``loop.run_epoch``) and DDPO's real
  ``rollout`` / ``update`` run around it."""
  from types import SimpleNamespace as NS
  import jax.numpy as jnp
  from didr_jax.train import advantages
  from didr_jax.train.ddpo import DDPOTrainer

  class Stub(DDPOTrainer):
    def __init__(self):
      self.c = NS(seed=0, log_images=2, sample=NS(num_batches=2, batch_size=4, group_size=2,
                                                  eta=1.0, num_steps=2))
      self.trained, self.images = [], []
      self.normalizer = advantages.AdvantageNormalizer("group")

    def window_start(self, rng):
      return 0

    def levels(self, eta, num_steps, start):
      return np.full((num_steps,), eta, np.float32)

    def policy_params(self, state):
      return state["params"]

    def sample(self, params, prompts, rng, levels=None):
      n = len(prompts)
      self.images.append(_images(n, 8, seed=len(self.images)))
      traj = NS(latents=jnp.zeros((3, n, 2)), log_probs=jnp.zeros((2, n)),
                timesteps=jnp.arange(2), next_timesteps=jnp.arange(2) + 1,
                levels=jnp.ones((2,)), stochastic=jnp.ones((2,), bool))
      return traj, jnp.asarray(self.images[-1]), jnp.zeros((n, 4)), None

    def train_on(self, state, data, uncond, rng):
      self.trained.append(np.asarray(data["rewards"]))
      return {**state, "step": state["step"] + 1}, {"loss": 0.0}

  return Stub()


def _epoch_with(url, trainer):
  from didr_jax.train import loop, prompts as prompts_lib
  rewarder = rewards.AsyncRewards(rewards.make("remote", url=url, **FAST))
  stream = prompts_lib.PromptStream([f"prompt {i}" for i in range(8)], seed=0)
  try:
    return loop.run_epoch(trainer, {"step": 0, "params": {}}, 0, stream, rewarder)
  finally:
    rewarder.close()


def test_a_training_epoch_waits_for_every_remote_reward_before_its_update():
  trainer = _stub_trainer()
  with reference_server() as (url, _):
    state, _, _ = _epoch_with(url, trainer)
  local = rewards.make("jpeg_compressibility")(np.concatenate(trainer.images), ["p"] * 8)
  assert state["step"] == 1 and len(trainer.trained) == 1
  np.testing.assert_array_equal(trainer.trained[0], local)
  # a dead server: the epoch raises before its update, so no training step is taken
  trainer = _stub_trainer()
  with pytest.raises(RewardError, match="down or failing: 3 attempts"):
    _epoch_with(f"http://127.0.0.1:{_free_port()}/", trainer)
  assert len(trainer.images) == 2 and trainer.trained == []
  # a server that answers one batch and garbage for the next: no step on the partial epoch
  trainer, answers = _stub_trainer(), iter([b"[1, 2, 3, 4]", b"[1, 2, 3]"])
  with thread_server(lambda h, b: (200, next(answers))) as (url, seen):
    with pytest.raises(RewardError, match="answered 3 rewards for 4 images"):
      _epoch_with(url, trainer)
  assert len(seen) == 2 and trainer.trained == []


def test_main_refuses_a_bad_remote_url_before_the_model_loads(tmp_path):
  """``didr_jax.main`` with ``rewards={"remote": 1}`` and no server URL: one line at config
  validation, exit code 2, and no workdir left behind."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  env.pop(remote_lib.ENV_URL, None)
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "didr_jax.main", "--config=configs/toy_ddpo.py",
                      '--config.rewards={"remote": 1.0}', "--config.eval.num_samples=0",
                      f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: config.rewards.remote: remote reward: no server URL; set DIDR_REWARD_URL="), lines
  assert not workdir.exists()


@pytest.mark.parametrize("url,why", [
    (None, "no server URL"), ("ftp://h/x", "not an http:// or https:// URL"),
    ("http://h:1/#timeout=-1", "need a finite timeout > 0"),
    ("http://h:1/#batch_timeout=nan", "finite backoff and batch_timeout >= 0"),
])
def test_validate_refuses_a_bad_remote_url(monkeypatch, url, why):
  from didr_jax.testing.configs import load_config
  from didr_jax.train import config as config_lib
  if url is None:
    monkeypatch.delenv(remote_lib.ENV_URL, raising=False)
  else:
    monkeypatch.setenv(remote_lib.ENV_URL, url)
  c = load_config("toy_ddpo")
  with c.rewards.unlocked():
    c.rewards["remote"] = 1.0
  with pytest.raises(config_lib.ConfigError, match=why) as e:
    config_lib.validate(c, num_devices=1)
  assert str(e.value).startswith("config.rewards.remote: ") and "\n" not in str(e.value)
  c.rewards["remote"] = 0.0  # switched off: its URL is not needed
  config_lib.validate(c, num_devices=1)


# ------------------------------------------------------------------------- deadlines

@contextlib.contextmanager
def trickle_server(interval=0.1, per_connection_s=5.0, max_connections=8):
  """A loopback server that reads each request, then answers one byte of a never-ending
  status line and header every ``interval`` seconds (far inside any per-read timeout).
  Bounded: each connection ends after ``per_connection_s`` or when the client hangs up, and
  at most ``max_connections`` are served; everything stops when the block ends. Yields (url,
  list of the connections' durations in seconds)."""
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(max_connections)
  listener.settimeout(0.1)
  stop, durations, threads = threading.Event(), [], []

  def trickle(conn):
    t0 = time.monotonic()
    with conn:
      conn.settimeout(1.0)
      with contextlib.suppress(OSError):
        conn.recv(1 << 16)  # (the start of) the request
        for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
          if stop.is_set() or time.monotonic() - t0 > per_connection_s:
            break
          conn.sendall(bytes([b]))
          time.sleep(interval)
    durations.append(time.monotonic() - t0)

  def accept():
    while not stop.is_set() and len(threads) < max_connections:
      try:
        conn, _ = listener.accept()
      except TimeoutError:
        continue
      threads.append(threading.Thread(target=trickle, args=(conn,), daemon=True))
      threads[-1].start()

  acceptor = threading.Thread(target=accept, daemon=True)
  acceptor.start()
  try:
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/", durations
  finally:
    stop.set()
    acceptor.join(timeout=5)
    for t in threads:
      t.join(timeout=5)
    listener.close()


def test_a_trickling_server_is_cut_at_the_request_deadline():
  """One byte every 0.1 s never trips a per-read timeout of 0.5 s (the client used to wait
  as long as the server kept trickling); each attempt now ends at its 0.5 s deadline."""
  with trickle_server() as (url, durations):
    r = rewards.make("remote", url=url, timeout=0.5, retries=1, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardError) as e:
      r(_images(1), ["a"])
    elapsed = time.monotonic() - t0
    time.sleep(0.3)  # the server notices the hang-ups
  msg = str(e.value)
  assert "\n" not in msg and url in msg and "2 attempts" in msg, msg
  assert "no answer within the 0.5 s timeout" in msg, msg
  assert 1.0 <= elapsed < 1.05 + 0.5, elapsed  # 2 x 0.5 s + 0.05 s back-off, small slack
  assert len(durations) == 2 and max(durations) < 1.5, durations  # both connections dropped


def test_batch_timeout_bounds_the_whole_batch():
  """Ten 0.4 s attempts per request, two requests: the 1 s batch_timeout ends it all."""
  with trickle_server() as (url, durations):
    r = rewards.make("remote", url=url, timeout=0.4, retries=9, backoff=0.05, batch_size=1,
                     batch_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(RewardError) as e:
      r(_images(2), ["a", "b"])
    elapsed = time.monotonic() - t0
  msg = str(e.value)
  assert "within its batch_timeout of 1 s" in msg and "\n" not in msg, msg
  assert 0.9 <= elapsed < 1.0 + 0.5, elapsed
  assert 2 <= len(durations) <= 3, durations  # the first request's attempts only


def _raw_exchange(port, data: bytes, timeout=5.0) -> tuple[bytes, float]:
  """Sends ``data`` on a fresh connection; (everything answered until the server closes,
  seconds it took)."""
  t0, out = time.monotonic(), b""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
    if data:
      s.sendall(data)
    with contextlib.suppress(ConnectionResetError):
      while chunk := s.recv(1 << 16):
        out += chunk
  return out, time.monotonic() - t0


def test_reference_server_caps_the_body_and_drops_idle_clients():
  probe = Reward("probe", lambda x, p: x.mean(axis=(1, 2, 3)))
  server = make_server(probe, "127.0.0.1", 0, max_body=4000, idle_timeout=0.3,
                       request_timeout=0.6)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  port = server.server_address[1]
  try:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    out, _ = _raw_exchange(port, head % 5000)  # over the cap: answered without reading it
    assert out.startswith(b"HTTP/1.0 413") and b"limit of 4000 bytes" in out, out
    out, _ = _raw_exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 411"), out
    out, took = _raw_exchange(port, b"")  # connects and says nothing
    assert out == b"" and 0.25 <= took < 1.5, (out, took)
    out, took = _raw_exchange(port, head % 100 + b"{")  # a body that stops coming
    assert out.startswith(b"HTTP/1.0 408") and took < 1.5, (out, took)
    x = _images(1, 8)  # a request within the cap is still scored
    got = rewards.make("remote", url=f"http://127.0.0.1:{port}/", encoding="npy", retries=0)(
        x, ["a"])
    np.testing.assert_allclose(got, x.mean(axis=(1, 2, 3)), rtol=1e-6)
  finally:
    server.shutdown()
    server.server_close()
