# Shape legend (used in comments and names below):
#   [N]      routed token rows: token positions start_len .. P + O - 2 (P prompt, O output tokens)
#   [L]      all decoder layers (num_hidden_layers), dense ones included: SGLang's layer axis
#   [L_moe]  the MoE layers only (RoutingSpec.moe_layers)
#   [K]      top-k slots per token
"""Decode SGLang's ``meta_info["routed_experts"]`` (R3 rollout routing replay) into a :class:`RoutingRecord`.

Wire format (SGLang >= 0.5.7, server flag ``--enable-return-routed-experts``, request field
``"return_routed_experts": true``): base64 of a flat little-endian int32 array, row-major
``[N, L, K]`` with ``N = P + O - 1 - start_len``. The last generated token was never fed through the model,
so it has no row; dense layers keep their slots in the layer axis (SGLang's capture buffer is zero-filled
and only MoE layers write to it), and we drop them. ``start_len`` is SGLang's ``routed_experts_start_len``
request field (default 0), which returns only rows ``[start_len, P + O - 1)``. Prefix-cache hits return
the routing recorded when the prefix was first computed, so a later turn's rows over an earlier turn's
prompt + answer equal that turn's rows.

What SGLang itself offers the client: ``extract_routed_experts_from_meta_info(data)`` in the server
package (``sglang.srt.layers.moe.routed_experts_capturer``; newer trees moved it under
``sglang.srt.state_capturer``). It is ``np.frombuffer(pybase64.b64decode(s), np.int32)``, flat, without
validation, and importing it loads the server runtime (server args, model config, CUDA-side torch).
There is no light client-side decoder, so we do not import SGLang: the "SGLang path" here is the same
byte decoder SGLang uses, ``pybase64`` (``validate=True``), when it is installed, and the stdlib
``base64`` (``validate=True``) otherwise. Both give identical bytes for valid payloads; pybase64 is an
optional speed-up, never a dependency.

Every malformed payload raises :class:`RoutingPayloadError` (a ``ValueError``) naming the sample and what
was expected: a missing field, non-base64 characters or bad padding, a byte length that is not a whole
number of ids, the wrong number of rows, an id outside ``[0, num_experts)`` (with layer, row, slot and
value) or one expert picked twice by a token at a layer.

An open upstream proposal (sglang PR 31219) adds an optional narrower wire dtype advertised in
``meta_info["routed_experts_dtype"]`` (``"int32"`` | ``"uint16"`` | ``"uint8"``); :func:`routing_from_meta_info`
honours that field when present and defaults to int32.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Mapping

import numpy as np

from vespo_megatron.routing.record import RoutingRecord, RoutingSpec

__all__ = [
    "WIRE_DTYPES",
    "RoutingPayloadError",
    "b64_backend",
    "decode_routed_experts",
    "routing_from_meta_info",
]

# Little-endian ids on the wire (SGLang sends the host's int32 bytes; every supported host is little-endian).
WIRE_DTYPES: dict[str, np.dtype] = {"int32": np.dtype("<i4"), "uint16": np.dtype("<u2"), "uint8": np.dtype("u1")}

_BACKENDS = ("auto", "pybase64", "stdlib")
_DISTINCT_CHUNK = 1 << 16  # (row, layer) pairs per distinctness block: [K, C] uint8 planes stay in cache


class RoutingPayloadError(ValueError):
    """A routed-experts payload that cannot be decoded into a valid record; names the sample."""

    def __init__(self, sample_id, message: str):
        super().__init__(f"routed_experts of sample {sample_id!r}: {message}")
        self.sample_id = sample_id


@functools.cache
def _load_pybase64():
    """The ``pybase64`` module, or None when it is not installed (looked up once)."""
    try:
        import pybase64
    except ImportError:
        return None
    return pybase64


def b64_backend(backend: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"pybase64"`` when importable, else ``"stdlib"``; check explicit names."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pybase64" if _load_pybase64() is not None else "stdlib"
    if backend == "pybase64" and _load_pybase64() is None:
        raise ValueError("backend: 'pybase64' requested but the pybase64 package is not installed")
    return backend


def _b64decoder(backend: str) -> Callable[[str | bytes], bytes]:
    if b64_backend(backend) == "pybase64":
        mod = _load_pybase64()
        return lambda data: mod.b64decode(data, validate=True)
    return lambda data: base64.b64decode(data, validate=True)


def _decode_base64(payload, sample_id, backend: str) -> bytes:
    if isinstance(payload, bytearray | memoryview):
        payload = bytes(payload)
    if not isinstance(payload, str | bytes):
        raise RoutingPayloadError(sample_id, f"expected a base64 str or bytes, got {type(payload).__name__}")
    if len(payload) % 4:
        raise RoutingPayloadError(sample_id, f"expected padded base64 (length a multiple of 4), got length "
                                             f"{len(payload)}")
    try:
        raw = _b64decoder(backend)(payload)
    except (ValueError, TypeError) as e:  # binascii.Error is a ValueError; non-ASCII str is a ValueError
        raise RoutingPayloadError(sample_id, f"expected base64 (A-Z a-z 0-9 + / and '=' padding): {e}") from None
    tail = payload[-2:]
    pad = tail.count("=" if isinstance(tail, str) else b"=")
    if len(raw) != len(payload) // 4 * 3 - pad:  # e.g. "QUJD====": stdlib accepts excess padding
        raise RoutingPayloadError(sample_id, f"expected at most 2 trailing '=' in base64, got {payload[-4:]!r}")
    return bytes(raw)


def _check_count(sample_id, name: str, value, low: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise RoutingPayloadError(sample_id, f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def decode_routed_experts(
    payload: str | bytes,
    *,
    spec: RoutingSpec,
    sample_id: str | int,
    num_prompt_tokens: int,
    num_output_tokens: int,
    start_len: int = 0,
    wire_dtype: str = "int32",
    backend: str = "auto",
) -> RoutingRecord:
    """Decode one sample's base64 routed experts; validate shape, range and distinctness; keep MoE layers.

    Expects ``(P + O - 1 - start_len) * L * K`` ids of ``wire_dtype`` (``L = spec.num_hidden_layers``).
    Returns a record ``[N, L_moe, K]`` in the compact dtype (uint8 / int16), without the last token's row
    (see :meth:`RoutingRecord.with_last_row`). ``backend``: ``"auto"`` | ``"pybase64"`` | ``"stdlib"``.
    """
    if not isinstance(spec, RoutingSpec):
        raise TypeError(f"spec: expected a RoutingSpec, got {type(spec).__name__}")
    if not isinstance(wire_dtype, str) or wire_dtype not in WIRE_DTYPES:
        raise RoutingPayloadError(sample_id, f"wire dtype: expected one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    b64_backend(backend)  # reject a bad backend name before touching the payload
    num_prompt = _check_count(sample_id, "num_prompt_tokens", num_prompt_tokens, 1)
    num_output = _check_count(sample_id, "num_output_tokens", num_output_tokens, 0)
    start = _check_count(sample_id, "start_len", start_len, 0)
    num_rows = num_prompt + num_output - 1 - start
    if num_rows < 0:
        raise RoutingPayloadError(sample_id, f"start_len: expected <= P + O - 1 = {num_prompt + num_output - 1}, "
                                             f"got {start}")
    num_layers, k, num_experts = spec.num_hidden_layers, spec.top_k, spec.num_experts

    raw = _decode_base64(payload, sample_id, backend)
    wire = WIRE_DTYPES[wire_dtype]
    if len(raw) % wire.itemsize:
        raise RoutingPayloadError(sample_id, f"expected a whole number of {wire_dtype} ids, got {len(raw)} bytes "
                                             f"(not a multiple of {wire.itemsize})")
    num_ids = len(raw) // wire.itemsize
    row_ids = num_layers * k
    if num_ids != num_rows * row_ids:
        got_rows = f"{num_ids // row_ids}" + (f" rows + {num_ids % row_ids} ids" if num_ids % row_ids else " rows")
        raise RoutingPayloadError(
            sample_id, f"expected {num_rows} rows (P={num_prompt} + O={num_output} - 1 - start_len={start}) of "
                       f"L={num_layers} x K={k} {wire_dtype} ids = {num_rows * row_ids} ids, got {num_ids} ids "
                       f"= {got_rows}")
    ids = np.frombuffer(raw, dtype=wire).reshape(num_rows, num_layers, k)  # [N, L, K]
    if not spec.all_moe:
        ids = ids[:, np.asarray(spec.moe_layers), :]  # [N, L_moe, K]

    if ids.size:
        # Negative int32 ids read as uint32 are >= 2^31, so one max() checks both ends of the range.
        unsigned = ids.view(f"<u{wire.itemsize}") if wire.kind == "i" else ids
        if int(unsigned.max()) >= num_experts:
            r, layer, slot = (int(x) for x in np.argwhere(unsigned >= num_experts)[0])
            raise RoutingPayloadError(
                sample_id, f"expected expert ids in [0, {num_experts}), got {int(ids[r, layer, slot])} at "
                           f"layer {spec.moe_layers[layer]}, row {start + r} (token position), slot {slot}")
    compact = ids.astype(spec.dtype)  # [N, L_moe, K], a fresh writable buffer; values already range-checked
    _check_distinct(compact, spec, sample_id, start)
    return RoutingRecord(sample_id=sample_id, expert_ids=compact, num_prompt_tokens=num_prompt,
                         num_output_tokens=num_output, moe_layers=spec.moe_layers, num_experts=num_experts,
                         first_row=start)


def _check_distinct(ids: np.ndarray, spec: RoutingSpec, sample_id, start: int) -> None:
    """A router never picks one expert twice for a token: all K ids of every [row, layer] differ.

    K * (K - 1) / 2 slot-pair comparisons on contiguous slot planes ``[K, C]`` of ``_DISTINCT_CHUNK`` (row,
    layer) pairs at a time (about 2.5x faster than comparing strided slot columns of ``[N, L_moe, K]``).
    """
    num_moe, k = ids.shape[1], ids.shape[2]
    if k < 2:
        return
    flat = ids.reshape(-1, k)  # [N * L_moe, K]
    for lo in range(0, flat.shape[0], _DISTINCT_CHUNK):
        planes = np.ascontiguousarray(flat[lo : lo + _DISTINCT_CHUNK].T)  # [K, C]
        dup = np.zeros(planes.shape[1], dtype=bool)
        eq = np.empty_like(dup)
        for i in range(k - 1):
            for j in range(i + 1, k):
                np.logical_or(dup, np.equal(planes[i], planes[j], out=eq), out=dup)
        if dup.any():
            r, layer = divmod(lo + int(np.argmax(dup)), num_moe)
            raise RoutingPayloadError(
                sample_id, f"expected {k} distinct expert ids per token and layer, got {ids[r, layer].tolist()} "
                           f"at layer {spec.moe_layers[layer]}, row {start + r} (token position)")


def routing_from_meta_info(
    meta_info: Mapping,
    *,
    spec: RoutingSpec,
    sample_id: str | int | None = None,
    num_prompt_tokens: int | None = None,
    num_output_tokens: int | None = None,
    start_len: int = 0,
    backend: str = "auto",
) -> RoutingRecord:
    """Decode ``meta_info["routed_experts"]`` of one SGLang ``/generate`` response.

    Missing arguments come from ``meta_info``: ``sample_id`` from ``"id"``, the token counts from
    ``"prompt_tokens"`` / ``"completion_tokens"``, the wire dtype from ``"routed_experts_dtype"`` (int32 when
    absent). ``start_len`` must be the ``routed_experts_start_len`` sent with the request.
    """
    if not isinstance(meta_info, Mapping):
        raise RoutingPayloadError(sample_id, f"meta_info: expected a mapping, got {type(meta_info).__name__}")
    if sample_id is None:
        sample_id = meta_info.get("id")
    payload = meta_info.get("routed_experts")
    if payload is None:
        raise RoutingPayloadError(
            sample_id, "expected meta_info['routed_experts'] (start the server with --enable-return-routed-experts "
                       "and send \"return_routed_experts\": true), got none")
    counts = {}
    for name, given, key in (("num_prompt_tokens", num_prompt_tokens, "prompt_tokens"),
                             ("num_output_tokens", num_output_tokens, "completion_tokens")):
        if given is None:
            if key not in meta_info:
                raise RoutingPayloadError(sample_id, f"expected meta_info[{key!r}] (or pass {name}), got none")
            given = meta_info[key]
        counts[name] = given
    wire_dtype = meta_info.get("routed_experts_dtype") or "int32"
    return decode_routed_experts(payload, spec=spec, sample_id=sample_id, start_len=start_len,
                                 wire_dtype=wire_dtype, backend=backend, **counts)
