"""Reader for ncnn model files (``.param`` graph text + ``.bin`` weights).

ncnn stores a network as two files:

- ``.param``: text. Line 1 is the magic ``7767517``; line 2 is
  ``<layer_count> <blob_count>``; then one line per layer::

      <Type> <name> <n_inputs> <n_outputs> <input blobs...> <output blobs...> k=v k=v ...

  Keys are integers. A negative key ``-233xx`` marks an array parameter whose
  real key is ``-(key + 23300)`` and whose value is ``count,v1,v2,...``.
  Values are ints unless they contain ``.``, ``e`` or ``E`` (then floats).
- ``.bin``: raw little-endian weights, layer after layer in ``.param`` order.
  Each weight array written by ncnn's converter with a *tag* starts with a
  4-byte tag (``0x01306B47``: float16 data; ``0``: float32 data; ``0x000D4B38``:
  int8 data) and is padded to 4 bytes; arrays written *raw* (biases, PReLU
  slopes) are plain float32 without tag.

This module reads both into NumPy arrays so that PyTorch modules (e.g.
:class:`semsr.models.rrdbnet.RRDBNet`) can be filled from the blobs that
registry packages ship. Only the layer types with weights that semsr's models
use are supported (Convolution, Deconvolution, InnerProduct, PReLU); any
other layer type that carries weights raises :class:`NcnnFormatError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0
TAG_INT8 = 0x000D4B38

# Layer types without weights in the .bin (only the ones we expect to meet).
_WEIGHTLESS = {
    "Input",
    "Split",
    "Concat",
    "Eltwise",
    "BinaryOp",
    "Interp",
    "Crop",
    "Pooling",
    "PixelShuffle",
    "ReLU",
    "Sigmoid",
    "Noop",
    "Reshape",
    "Permute",
    "Slice",
    "UnaryOp",
    "Clip",
    "Padding",
    "Flatten",
    "Softmax",
    "TanH",
    "Dropout",
}


class NcnnFormatError(ValueError):
    """The ``.param``/``.bin`` pair is malformed or uses an unsupported feature."""


@dataclass
class NcnnLayer:
    """One layer line of a ``.param`` file.

    Attributes:
        type: ncnn layer type, e.g. ``"Convolution"``.
        name: layer name, e.g. ``"Conv_0"``.
        bottoms: input blob names.
        tops: output blob names.
        params: key -> value; array parameters (negative keys in the file) are
            stored under their real non-negative key as a list.
        weights: arrays read from the ``.bin`` (filled by :func:`load_ncnn`),
            e.g. ``{"weight": (O, I, kh, kw) float32, "bias": (O,) float32}``.
    """

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, int | float | list[int | float]]
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: int, default: int | float | list | None = None):
        """Parameter ``key`` or ``default`` (ncnn's default when absent)."""
        return self.params.get(key, default)


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(path: str | Path) -> list[NcnnLayer]:
    """Parse an ncnn ``.param`` text file into its layers (file order)."""
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text(encoding="ascii").splitlines() if ln.strip()]
    if not lines or lines[0] != str(MAGIC):
        raise NcnnFormatError(f"{path}: not an ncnn .param file (magic {MAGIC} missing)")
    try:
        layer_count, _blob_count = (int(v) for v in lines[1].split())
    except ValueError as err:
        raise NcnnFormatError(f"{path}: bad layer/blob count line {lines[1]!r}") from err
    layers: list[NcnnLayer] = []
    for ln in lines[2:]:
        tok = ln.split()
        ltype, name, n_in, n_out = tok[0], tok[1], int(tok[2]), int(tok[3])
        bottoms = tok[4 : 4 + n_in]
        tops = tok[4 + n_in : 4 + n_in + n_out]
        params: dict[int, int | float | list[int | float]] = {}
        for kv in tok[4 + n_in + n_out :]:
            key_s, _, val = kv.partition("=")
            key = int(key_s)
            if key <= -23300:
                count_s, *items = val.split(",")
                if len(items) != int(count_s):
                    raise NcnnFormatError(f"{path}: layer {name}: array {kv!r} has wrong length")
                params[-(key + 23300)] = [_number(v) for v in items]
            else:
                params[key] = _number(val)
        layers.append(NcnnLayer(ltype, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise NcnnFormatError(f"{path}: header says {layer_count} layers, found {len(layers)}")
    return layers


class _BinReader:
    """Sequential reader over the bytes of a ``.bin`` file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def _take(self, nbytes: int) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise NcnnFormatError(f"{self.path}: truncated weight file at byte {self.pos}")
        out = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out

    def raw_fp32(self, count: int) -> np.ndarray:
        """``count`` untagged float32 values."""
        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def tagged(self, count: int) -> np.ndarray:
        """A tagged array of ``count`` values, returned as float32."""
        (tag,) = struct.unpack("<I", self._take(4))
        if tag == TAG_FP16:
            arr = np.frombuffer(self._take(2 * count), dtype="<f2").astype(np.float32)
            self._take((-2 * count) % 4)  # fp16 arrays are padded to 4 bytes
            return arr
        if tag == TAG_FP32:
            return self.raw_fp32(count)
        if tag == TAG_INT8:
            raise NcnnFormatError(f"{self.path}: int8-quantised weights are not supported")
        raise NcnnFormatError(
            f"{self.path}: unsupported weight tag 0x{tag:08X} at byte {self.pos - 4} "
            "(table-quantised weights are not supported)"
        )


def _read_layer_weights(layer: NcnnLayer, rd: _BinReader) -> dict[str, np.ndarray]:
    """Read the weights of one layer (ncnn's ``load_model`` order)."""
    t = layer.type
    if t in ("Convolution", "Deconvolution"):
        if layer.get(8, 0):
            raise NcnnFormatError(f"{rd.path}: layer {layer.name}: int8 convolution not supported")
        if layer.get(19, 0):
            raise NcnnFormatError(f"{rd.path}: layer {layer.name}: dynamic weights not supported")
        out_c = int(layer.get(0, 0))
        kw = int(layer.get(1, 0))
        kh = int(layer.get(11, kw))
        size = int(layer.get(6, 0))
        if out_c <= 0 or kw <= 0 or size % (out_c * kh * kw):
            raise NcnnFormatError(f"{rd.path}: layer {layer.name}: inconsistent weight size {size}")
        in_c = size // (out_c * kh * kw)
        w = rd.tagged(size)
        # ncnn keeps (out, in, kh, kw) for both types; PyTorch's ConvTranspose2d
        # wants (in, out, kh, kw), so transpose Deconvolution weights when loading.
        out: dict[str, np.ndarray] = {"weight": w.reshape(out_c, in_c, kh, kw)}
        if layer.get(5, 0):
            out["bias"] = rd.raw_fp32(out_c)
        return out
    if t == "InnerProduct":
        if layer.get(8, 0):
            raise NcnnFormatError(f"{rd.path}: layer {layer.name}: int8 inner product not supported")
        out_c = int(layer.get(0, 0))
        size = int(layer.get(2, 0))
        w = rd.tagged(size)
        out = {"weight": w.reshape(out_c, size // out_c)}
        if layer.get(1, 0):
            out["bias"] = rd.raw_fp32(out_c)
        return out
    if t == "PReLU":
        return {"slope": rd.raw_fp32(int(layer.get(0, 1)))}
    if t in _WEIGHTLESS:
        return {}
    raise NcnnFormatError(f"{rd.path}: layer {layer.name}: weights of type {t!r} are not supported")


def load_ncnn(param_path: str | Path, bin_path: str | Path) -> list[NcnnLayer]:
    """Parse ``param_path`` and fill each layer's ``weights`` from ``bin_path``.

    Raises :class:`NcnnFormatError` when the ``.bin`` is shorter or longer than
    the ``.param`` implies, so a mismatched pair never loads silently.
    """
    layers = parse_param(param_path)
    bin_path = Path(bin_path)
    rd = _BinReader(bin_path.read_bytes(), bin_path)
    for layer in layers:
        layer.weights = _read_layer_weights(layer, rd)
    if rd.pos != len(rd.data):
        raise NcnnFormatError(
            f"{bin_path}: {len(rd.data) - rd.pos} bytes left after the last layer (the .bin does not match the .param)"
        )
    return layers
