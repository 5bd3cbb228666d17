"""Checkpoint conversion between diffusers / transformers PyTorch layouts and our NNX modules.

Our module attribute names mirror the PyTorch module names, so a parameter's PyTorch key is its
NNX path joined with dots, with flax leaf names renamed (``kernel``/``scale``/``embedding`` ->
``weight``) and kernels transposed (Linear (in, out) <- (out, in); Conv HWIO <- OIHW).
Models with other names pass a ``key_fn`` that returns the candidate PyTorch keys of a path.

Safetensors are read with our own reader (memory-mapped, every dtype including bfloat16 through
``ml_dtypes``): no pickle is ever loaded. Tensors are streamed one by one into the target
sharding of each parameter, so a model never needs to fit on one device or in host memory twice.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from didr_jax.errors import ConversionError

Path = tuple[Any, ...]

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# safetensors I/O


class SafetensorsFile(Mapping[str, np.ndarray]):
  """A read-only mapping over one ``.safetensors`` file; tensors are memory-mapped views."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ConversionError(f"{path}: not a safetensors file (too short)")
      (n,) = struct.unpack("<Q", head)
      if n > os.path.getsize(path) - 8:
        raise ConversionError(f"{path}: corrupt safetensors header (length {n})")
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
      raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    self._header = header
    self._offset = 8 + n
    try:
      end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
      raise ConversionError(f"{path}: corrupt safetensors header (bad data_offsets)") from None
    size = os.path.getsize(path)
    if self._offset + end > size:
      raise ConversionError(
          f"{path} is truncated: its header describes {self._offset + end} bytes, the file has "
          f"{size} (an incomplete download or copy?); fetch the file again")
    self._mm = None

  def _buffer(self):
    if self._mm is None:
      with open(self.path, "rb") as f:
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return self._mm

  def __getitem__(self, key: str) -> np.ndarray:
    info = self._header[key]
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ConversionError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    buf = self._buffer()
    if self._offset + end > len(buf):
      raise ConversionError(f"{self.path}: tensor {key!r} lies past the end of the file "
                            "(truncated download?)")
    arr = np.frombuffer(buf, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                        offset=self._offset + start)
    return arr.reshape(info["shape"])

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def __iter__(self):
    return iter(self._header)

  def __len__(self):
    return len(self._header)


class TensorStore(Mapping[str, np.ndarray]):
  """Several safetensors files (a sharded checkpoint) seen as one mapping."""

  def __init__(self, files: Sequence[SafetensorsFile]):
    self.files = list(files)
    self._where = {}
    for f in self.files:
      for k in f:
        self._where[k] = f

  def __getitem__(self, key):
    return self._where[key][key]

  def shape(self, key):
    return self._where[key].shape(key)

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def open_weights(folder: str, prefer: Sequence[str] = ()) -> TensorStore:
  """Opens the safetensors weights of one component folder (single file or sharded with index).

  ``prefer`` names file stems to look for first (e.g. "diffusion_pytorch_model", "model").
  Folders holding only pickled ``.bin`` / ``.pt`` weights are refused: we never unpickle.
  """
  if not os.path.isdir(folder):
    raise ConversionError(f"weights folder {folder!r} does not exist")
  names = sorted(os.listdir(folder))
  stems = list(prefer) + ["diffusion_pytorch_model", "model"]
  for stem in stems:
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.exists(index):
      shards = _index_shards(index)
      missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
      if missing:
        raise ConversionError(f"{folder}: index names shards that are missing: {missing}")
      return TensorStore([SafetensorsFile(os.path.join(folder, s)) for s in shards])
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.exists(single):
      return TensorStore([SafetensorsFile(single)])
  st = [n for n in names if n.endswith(".safetensors")]
  if len(st) == 1:
    return TensorStore([SafetensorsFile(os.path.join(folder, st[0]))])
  pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  if pickled:
    raise ConversionError(f"{folder}: only pickled weights {pickled} found; didr_jax reads "
                          "safetensors only (convert them with safetensors' own tools first)")
  raise ConversionError(f"{folder}: no safetensors weights found (files: {names})")


def _index_shards(index: str) -> list[str]:
  """The shard file names of a ``*.safetensors.index.json``: each a plain file name in the
  index's own folder (a path elsewhere, ``../x`` or ``/abs/x``, is refused: never read)."""
  obj = read_json(index)
  weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ConversionError(f"{index}: no \"weight_map\" of tensor names to shard files")
  shards = sorted(set(weight_map.values()))
  outside = [s for s in shards if s in ("", ".", "..") or os.path.basename(s) != s
             or os.path.isabs(s) or (os.altsep and os.altsep in s)]
  if outside:
    raise ConversionError(f"{index} names shards outside its folder: {outside[:3]}; an index may "
                          "only name files beside it")
  return shards


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file atomically (temp file, then rename)."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  arrays = []
  for k in sorted(tensors):
    a = np.asarray(tensors[k], order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if a.dtype not in _ST_NAMES:
      raise ConversionError(f"tensor {k!r}: dtype {a.dtype} cannot be written to safetensors")
    header[k] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                 "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise ConversionError(f"missing {path}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# key mapping

_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def default_torch_key(path: Path) -> str:
  """('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  *mods, leaf = path
  return ".".join([str(p) for p in mods] + [_LEAF_RENAMES.get(leaf, leaf)])


def torch_to_flax_layout(path: Path, value: np.ndarray, target_ndim: int) -> np.ndarray:
  """Transposes a PyTorch tensor into our layout (only ``kernel`` leaves change)."""
  if path[-1] == "kernel":
    if value.ndim == 2 and target_ndim == 2:
      return value.T
    if value.ndim == 4 and target_ndim == 4:
      return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.ndim == 2 and target_ndim == 4:  # a torch Linear loaded into a 1x1 conv
      return value.T[None, None]
    if value.ndim == 4 and target_ndim == 2 and value.shape[2:] == (1, 1):  # 1x1 conv -> Linear
      return value[:, :, 0, 0].T
  return value


def flax_to_torch_layout(path: Path, value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
  return value


KeyFn = Callable[[Path], str | Sequence[str]]


def _candidates(key_fn: KeyFn, path: Path) -> list[str]:
  k = key_fn(path)
  return [k] if isinstance(k, str) else list(k)


def param_paths(model: nnx.Module) -> list[tuple[Path, nnx.Variable]]:
  """(path, variable) for every nnx.Param of a (possibly abstract) module, in a stable order."""
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def load_torch_weights(model: nnx.Module, tensors: Mapping[str, np.ndarray], *,
                       key_fn: KeyFn = default_torch_key,
                       shardings: Callable[[Path, nnx.Variable], Any] | None = None,
                       ignore: Callable[[str], bool] = lambda k: False,
                       strict: bool = True, source: str = "checkpoint") -> nnx.Module:
  """Fills ``model`` (concrete or from ``nnx.eval_shape``) with PyTorch-layout tensors.

  Every parameter must be found (under one of ``key_fn``'s candidate names) with a matching
  shape; with ``strict`` every tensor of the checkpoint must be used (except ``ignore``d keys).
  Each tensor is converted to the parameter's dtype and placed with ``shardings(path, var)``
  (default: the default device) as it is read. Returns a new module; the input is not changed.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = list(nnx.to_flat_state(params))
  used: set[str] = set()
  missing, mismatched, new = [], [], []
  for path, var in flat:
    cands = _candidates(key_fn, path)
    key = next((c for c in cands if c in tensors), None)
    if key is None:
      missing.append(f"{'.'.join(map(str, path))} (looked for {cands})")
      continue
    used.add(key)
    raw = tensors[key]
    value = torch_to_flax_layout(path, raw, len(var.shape))
    if tuple(value.shape) != tuple(var.shape):
      expected = flax_to_torch_layout(path, np.empty(var.shape, np.bool_)).shape
      mismatched.append(f"{key}: {source} has shape {tuple(raw.shape)}, the model expects "
                        f"{tuple(expected)}")
      continue
    arr = np.asarray(value).astype(var.dtype)
    sharding = shardings(path, var) if shardings is not None else None
    new.append((path, var.replace(jax.device_put(arr, sharding) if sharding is not None
                                  else jnp.asarray(arr))))
  errors = []
  if mismatched:
    errors.append("shape mismatches:\n  " + "\n  ".join(mismatched))
  if missing:
    errors.append(f"{len(missing)} parameters missing from {source}:\n  "
                  + "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else ""))
  if strict:
    unused = sorted(k for k in tensors if k not in used and not ignore(k))
    if unused:
      errors.append(f"{len(unused)} tensors of {source} are not used by the model "
                    "(wrong model class or config?):\n  " + "\n  ".join(unused[:20])
                    + ("\n  ..." if len(unused) > 20 else ""))
  if errors:
    raise ConversionError("\n".join(errors))
  return nnx.merge(graphdef, nnx.from_flat_state(new), rest)


def export_torch_weights(model: nnx.Module, *, key_fn: KeyFn = default_torch_key,
                         dtype: Any = None) -> dict[str, np.ndarray]:
  """The inverse of ``load_torch_weights``: PyTorch-layout numpy arrays keyed by the first
  candidate name of each parameter (gathered to host)."""
  out = {}
  for path, var in param_paths(model):
    value = np.asarray(jax.device_get(var[...]))
    if dtype is not None:
      value = value.astype(dtype)
    out[_candidates(key_fn, path)[0]] = flax_to_torch_layout(path, value)
  return out
