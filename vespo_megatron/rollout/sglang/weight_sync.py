"""Chunked, versioned weight sync from the trainer to a separate SGLang server over a torch process group.

Why: ``/update_weights_from_disk`` needs a checkpoint on a file system the server can read and a full
save + load per step. SGLang's distributed path streams the weights instead: the trainer's sending rank
and the server's workers form one process group, and for every bucket the trainer posts the metadata while
broadcasting the tensors from rank 0. This module is the trainer side of that protocol.

The protocol (SGLang ``http_server.py``, ``io_struct.py``, ``model_runner.py``, ``utils/common.py``):

1. ``POST /init_weights_update_group`` ``{master_address, master_port, rank_offset, world_size,
   group_name, backend}``. Each server worker joins as rank ``rank_offset + tp_rank`` through
   ``init_custom_process_group``: a ``tcp://`` rendezvous (rank 0 hosts the TCP store), the store wrapped in
   ``PrefixStore(group_name)``, then torch's ``_new_process_group_helper``. The trainer is rank 0; see
   :func:`open_weight_update_group` for how its side matches.
2. Per bucket, ``POST /update_weights_from_distributed`` ``{names, dtypes, shapes, group_name, flush_cache,
   weight_version}``: every worker allocates ``torch.empty(shape, dtype=getattr(torch, dtype))`` per name, in
   order, receives each by ``broadcast(src=0)`` on the group, then calls ``model.load_weights``. The request
   blocks in that receive until the trainer broadcasts, hence the HTTP call runs in a background thread.
   Dtypes travel as ``torch`` attribute names (``"bfloat16"``, ``"float32"``). A failure answers HTTP 400
   ``{"success": false, "message": ...}``.
3. ``flush_cache`` flushes the prefix cache after that bucket loads, so it is set on the last bucket only.
   ``weight_version``: on success SGLang's tokenizer manager sets the server's tag to it *as soon as that
   bucket is loaded* (``_update_weight_version_if_provided``), so a tag sent with an intermediate bucket would
   label generations made from half-updated weights. It is therefore sent with the last bucket only; the
   intermediate buckets omit it (``None``: the tag is left alone). A refused flush (requests still running)
   fails that bucket with HTTP 400 after it loaded.
4. Session (SGLang >= 0.5.21): the buckets of one sync run between ``POST /begin_weight_update`` ``{}`` and
   ``POST /end_weight_update`` ``{}`` (``BeginWeightUpdateReqInput`` / ``EndWeightUpdateReqInput`` in
   ``io_struct.py``; the scheduler's ``weight_updater.py`` answers a bucket outside a session with 400 before
   receiving anything). The end call runs in a ``finally``. A server that answers 404 to begin (0.5.20 and
   older) has no sessions: the sender remembers that and sends the buckets alone.
5. The new tag is read back from ``GET /get_weight_version`` (SGLang >= 0.5.21 answers that 404 and reports
   ``weight_version`` in ``/model_info``; older ones in ``/get_model_info``); ``POST
   /destroy_weights_update_group`` ``{group_name}`` on close.

Data parallelism: SGLang asserts ``dp_size == 1`` for weight-update groups (HTTP 500); :meth:`open` checks the
server's ``dp_size`` first and raises :class:`EngineError` instead.

Between buckets SGLang serves requests with partly updated weights (each bucket takes the model-update
write lock only for itself): pause generation around a sync (``SGLangClient.pause_generation``) if that
matters. Generation through the *same* :class:`SGLangClient` never interleaves with a sync: the sender holds
the engine's lock (:meth:`SGLangClient.exclusive`) for the whole of :meth:`DistributedWeightSender.send`.

Memory: one bucket (at most ``bucket_bytes``, or one larger tensor alone) plus one look-ahead tensor is
held at a time; on NCCL each bucket is copied to the current CUDA device if it is not there already.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vespo_megatron.base.validation import ConfigError, check_choice, check_number
from vespo_megatron.rollout.engine import EngineError, PolicyWeights
from vespo_megatron.rollout.sglang.client import SGLangClient

__all__ = [
    "DiskWeightSync",
    "StreamedWeightSync",
    "make_weight_sync",
    "DistributedWeightSender",
    "WeightSyncConfig",
    "WeightSyncStats",
    "bucketize",
    "dtype_name",
    "open_weight_update_group",
]

logger = logging.getLogger(__name__)

_MODES = ("disk", "distributed")
_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True, kw_only=True)
class WeightSyncConfig:
    """How the trainer pushes weights to the SGLang server.

    ``mode="disk"`` keeps ``SGLangClient.update_weights`` (a checkpoint path); ``"distributed"`` uses
    :class:`DistributedWeightSender`. ``master_address`` must be reachable *from the server* (the trainer
    hosts the rendezvous store there); ``master_port=0`` picks a free port when the group is opened.
    ``server_ranks`` is the number of server workers joining (SGLang: its ``tp_size``); None reads it from
    ``/server_info``. They take ranks ``rank_offset ..`` (the trainer is rank 0). ``backend="auto"`` is
    NCCL when CUDA is available, else gloo. ``init_timeout_s`` bounds opening the group (rendezvous, join,
    the HTTP call); ``bucket_timeout_s`` one bucket (its HTTP answer and broadcasts) and each collective.
    """

    mode: str = "disk"
    bucket_bytes: int = 512 * 1024**2
    master_address: str = "127.0.0.1"
    master_port: int = 0
    group_name: str = "vespo_weight_sync"
    backend: str = "auto"
    rank_offset: int = 1
    server_ranks: int | None = None
    init_timeout_s: float = 300.0
    bucket_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        c = "WeightSyncConfig"
        check_choice(c, "mode", self.mode, _MODES)
        check_choice(c, "backend", self.backend, _BACKENDS)
        check_number(c, "bucket_bytes", self.bucket_bytes, low=1, integer=True)
        check_number(c, "master_port", self.master_port, low=0, integer=True)
        if self.master_port > 65535:
            raise ConfigError(c, "master_port", "0..65535 (0: a free port)", self.master_port)
        check_number(c, "rank_offset", self.rank_offset, low=1, integer=True)
        if self.server_ranks is not None:
            check_number(c, "server_ranks", self.server_ranks, low=1, integer=True)
        for name in ("master_address", "group_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(c, name, "a non-empty str", value)
        check_number(c, "init_timeout_s", self.init_timeout_s, low=0, integer=False, allow_equal=False)
        check_number(c, "bucket_timeout_s", self.bucket_timeout_s, low=0, integer=False, allow_equal=False)

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass(frozen=True)
class WeightSyncStats:
    """What one :meth:`DistributedWeightSender.send` moved."""

    version: int
    num_buckets: int
    num_tensors: int
    num_bytes: int
    seconds: float

    @property
    def gib_per_s(self) -> float:
        return self.num_bytes / 1024**3 / self.seconds if self.seconds > 0 else math.inf


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _buckets_with_last(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                       ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """``(bucket, is_last)``: a bucket is closed by the first tensor that does not fit, so whether more
    follow is known without reading a whole bucket ahead."""
    check_number("bucketize", "bucket_bytes", bucket_bytes, low=1, integer=True)
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for i, item in enumerate(named_tensors):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"named_tensors[{i}]: expected a (str, torch.Tensor) pair, got "
                            f"{type(item).__name__}")
        n = _nbytes(item[1])
        if current and size + n > bucket_bytes:
            yield current, False
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        yield current, True


def bucketize(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
              ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs, in order, into lists of at most ``bucket_bytes`` bytes each; a tensor
    larger than ``bucket_bytes`` goes alone. Lazy: reads one tensor past the bucket it yields."""
    for bucket, _ in _buckets_with_last(named_tensors, bucket_bytes):
        yield bucket


def dtype_name(dtype: torch.dtype) -> str:
    """The name SGLang resolves with ``getattr(torch, name)``: ``torch.bfloat16`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    if getattr(torch, name, None) is not dtype:
        raise ValueError(f"dtype: {dtype!r} has no torch attribute name SGLang could resolve")
    return name


def open_weight_update_group(*, master_address: str, master_port: int, world_size: int, group_name: str,
                             backend: str, timeout: timedelta) -> dist.ProcessGroup:
    """Join SGLang's weight-update group as rank 0; return the group (not the default process group).

    What must match the server (SGLang's ``init_custom_process_group``, run by every server worker):

    - the store: the server calls ``rendezvous("tcp://addr:port", rank, world_size)``, which makes rank 0
      host a ``TCPStore`` there and every other rank a client. We build rank 0's store explicitly rather
      than through ``rendezvous``, because under ``torchrun`` (``TORCHELASTIC_USE_AGENT_STORE=True``)
      ``rendezvous`` would make rank 0 a client too and nobody would host the store;
    - the key space: the server wraps the store in ``PrefixStore(group_name)`` and passes ``group_name``
      to ``_new_process_group_helper``, which prefixes again with ``f"{group_name}/"`` and the device
      backend's ``f"{device}/"``. Doing the same two steps with the same ``group_name`` and backend lands
      both sides' gloo/NCCL rendezvous keys in the same place;
    - ranks: ``global_ranks_in_group=[]`` makes the helper treat the group as stand-alone (no check against
      the default group, which may or may not exist); ``_world.pg_group_ranks`` maps ranks to themselves
      so ``broadcast(src=0, group=...)`` means group rank 0 on both sides.

    Torch private API used: ``torch.distributed.distributed_c10d._new_process_group_helper`` and
    ``_world`` (SGLang uses the same two). Checked against torch 2.13 (its signature and store layout) and
    SGLang's ``python/sglang/srt/utils/common.py``; trainer and server torch versions must agree on that
    layout. ``backend_options``/``pg_options`` (renamed in torch 2.6) is left at its default.

    NCCL detail: if the default group is bound to a device (``init_process_group(device_id=...)``), the
    helper would create this communicator with ``ncclCommSplit`` from the default one -- a collective over
    the *trainer's* ranks that the server cannot join. The binding is hidden for the duration of the call.
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    store = dist.TCPStore(host_name=master_address, port=master_port, world_size=world_size, is_master=True,
                          timeout=timeout, multi_tenant=True)
    store = PrefixStore(group_name, store)
    default = dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
    bound = default.bound_device_id if default is not None else None
    if bound is not None:
        default.bound_device_id = None
    try:
        made = _new_process_group_helper(world_size, 0, [], Backend(backend), store, group_name=group_name,
                                         timeout=timeout)
    finally:
        if bound is not None:
            default.bound_device_id = bound
    pg = made[0] if isinstance(made, tuple) else made  # (pg, prefix_store) since torch 2.1
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class DistributedWeightSender:
    """Rank 0 of the trainer streams named tensors to one SGLang server, bucket by bucket.

    ``with DistributedWeightSender(engine, config) as sender: stats = sender.send(named_tensors, version)``.
    The group is opened on first use (or by :meth:`open`) and kept across sends; :meth:`close` destroys it
    on both sides. Not thread-safe: one sender per engine, driven from one thread.
    """

    def __init__(self, engine: SGLangClient, config: WeightSyncConfig):
        if not isinstance(engine, SGLangClient):
            raise TypeError(f"engine: expected an SGLangClient, got {type(engine).__name__}")
        if not isinstance(config, WeightSyncConfig):
            raise TypeError(f"config: expected a WeightSyncConfig, got {type(config).__name__}")
        if config.mode != "distributed":
            raise ValueError(f"config.mode: expected 'distributed' for a DistributedWeightSender, got "
                             f"{config.mode!r}")
        self.engine = engine
        self.config = config
        self.backend = config.resolved_backend()
        self._pg: dist.ProcessGroup | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._broken: str | None = None  # why the group can no longer be used
        self._has_session: bool | None = None  # /begin_weight_update exists (None: not asked yet)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> DistributedWeightSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._pg is not None

    def open(self) -> None:
        """Form the group with the server's workers (no-op when open). Raises :class:`EngineError`."""
        if self._pg is not None:
            return
        cfg = self.config
        world_size = 1 + self._server_ranks()
        port = cfg.master_port or _free_port(cfg.master_address)
        timeout = timedelta(seconds=cfg.init_timeout_s)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-http")
        http = pool.submit(self.engine.init_weights_update_group, master_address=cfg.master_address,
                           master_port=port, rank_offset=cfg.rank_offset, world_size=world_size,
                           group_name=cfg.group_name, backend=self.backend, timeout=cfg.init_timeout_s)
        # Our side blocks until the server joins (gloo connects at creation); run it aside so that a server
        # that refuses at once fails the call at once instead of after init_timeout_s.
        made: dict[str, Any] = {}

        def create() -> None:
            try:
                made["pg"] = open_weight_update_group(master_address=cfg.master_address, master_port=port,
                                                      world_size=world_size, group_name=cfg.group_name,
                                                      backend=self.backend, timeout=timeout)
            except BaseException as e:  # noqa: BLE001 (reported by the caller thread)
                made["error"] = e

        creator = threading.Thread(target=create, name="weight-sync-group", daemon=True)
        creator.start()
        where = (f"group {cfg.group_name!r} at {cfg.master_address}:{port} ({self.backend}, world_size "
                 f"{world_size})")
        try:
            while creator.is_alive():
                if http.done() and http.exception() is not None:
                    raise EngineError(f"SGLang server refused to join weight-update {where}: "
                                      f"{http.exception()}") from http.exception()
                creator.join(0.05)
            if "error" in made:
                server = ""
                if http.done() and http.exception() is not None:
                    server = f"; server: {http.exception()}"
                raise EngineError(f"could not form weight-update {where}: {made['error']}{server}"
                                  ) from made["error"]
            self._pg = made["pg"]
            try:
                http.result(timeout=cfg.init_timeout_s)
            except BaseException as e:
                self._destroy_local()
                if isinstance(e, FutureTimeout):
                    raise EngineError(f"no answer to /init_weights_update_group within "
                                      f"{cfg.init_timeout_s} s although the {where} formed") from None
                raise
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        self._pool = pool
        self._broken = None
        logger.info("weight sync: opened %s", where)

    def close(self) -> None:
        """Destroy the group on the server (``/destroy_weights_update_group``) and here. Idempotent."""
        if self._pg is None:
            return
        pool = self._pool
        http: Future | None = None
        if pool is not None:
            http = pool.submit(self.engine.destroy_weights_update_group, self.config.group_name,
                               timeout=self.config.init_timeout_s)
        try:
            self._destroy_local()
            if http is not None:
                try:
                    http.result(timeout=self.config.init_timeout_s)
                except Exception as e:  # the server side is best effort on close
                    logger.warning("weight sync: destroying group %r on the server failed: %s",
                                   self.config.group_name, e)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._broken = None

    def _destroy_local(self) -> None:
        pg, self._pg = self._pg, None
        if pg is None:
            return
        try:
            dist.destroy_process_group(pg)
        except Exception as e:
            logger.warning("weight sync: destroying the local group failed: %s", e)

    def _break(self, reason: str) -> None:
        """Mark the group unusable and abort its pending work (so nothing waits on a peer that left)."""
        self._broken = reason
        try:
            self._pg.abort()
        except Exception as e:  # not every backend can abort
            logger.warning("weight sync: aborting group %r failed: %s", self.config.group_name, e)

    def _server_ranks(self) -> int:
        info = self.engine.server_info or self.engine.check_server()
        dp = info.get("dp_size", 1)
        if dp not in (None, 1):
            raise EngineError(f"SGLang server at {self.engine.config.base_url} has dp_size={dp!r}, expected "
                              f"dp_size=1: SGLang's weight-update groups do not support data-parallel "
                              f"replicas (it asserts dp_size == 1 and answers HTTP 500); restart the server "
                              f"with --dp-size 1, or use WeightSyncConfig(mode='disk')")
        if self.config.server_ranks is not None:
            return self.config.server_ranks
        tp, pp = info.get("tp_size"), info.get("pp_size", 1)
        if not isinstance(tp, int) or tp < 1:
            raise EngineError(f"SGLang /server_info has no usable tp_size ({tp!r}); set WeightSyncConfig."
                              f"server_ranks to the number of server workers")
        if pp not in (None, 1):
            raise EngineError(f"SGLang server has pp_size={pp}; its workers join the update group as "
                              f"rank_offset + tp_rank, which collides across pipeline stages")
        return tp

    # ------------------------------------------------------------------ sending

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightSyncStats:
        """Stream ``(hf_name, full_tensor)`` pairs to the server and tag the result ``version``.

        Per bucket: the metadata POST runs in a background thread while the tensors are broadcast from
        rank 0 in the same order; then the server's answer is checked (``success: false`` or an HTTP error
        raise :class:`EngineError` with the server's message). On SGLang >= 0.5.21 the buckets run inside one
        ``/begin_weight_update`` .. ``/end_weight_update`` session (the end call in a ``finally``). The last
        bucket carries ``weight_version`` and
        ``flush_cache`` (unless the engine's ``flush_cache_after_update`` is off). Afterwards the server must
        report ``str(version)`` (:meth:`SGLangClient.get_weight_version`; servers that report none are not
        checked).

        A server that fails *after* receiving a bucket leaves the group usable (its weights are partly
        updated: send again). One that fails or times out with broadcasts pending breaks the group:
        :meth:`close` it and open a new one (with NCCL, a broadcast the server never joins can only end at
        the collective timeout).
        """
        check_number("DistributedWeightSender.send", "version", version, low=0, integer=True)
        if self._broken is not None:
            raise EngineError(f"weight-update group {self.config.group_name!r} is unusable ({self._broken}); "
                              f"close() the sender and open a new group")
        self.open()
        assert self._pg is not None and self._pool is not None
        start = time.perf_counter()
        num_buckets = num_tensors = num_bytes = 0
        with self.engine.exclusive():
            in_session = self._begin_session()
            done = False
            try:
                for bucket, is_last in _buckets_with_last(named_tensors, self.config.bucket_bytes):
                    self._send_bucket(bucket, version=version, is_last=is_last, index=num_buckets)
                    num_buckets += 1
                    num_tensors += len(bucket)
                    num_bytes += sum(_nbytes(t) for _, t in bucket)
                if num_buckets == 0:
                    raise ValueError("named_tensors: expected at least one (name, tensor) pair, got none")
                done = True
            finally:
                if in_session:
                    self._end_session(raise_errors=done)
            served = self.engine.get_weight_version()
            if served is not None and served != str(version):
                raise EngineError(f"SGLang server at {self.engine.config.base_url} reports weight_version "
                                  f"{served!r} after the sync, expected {str(version)!r}")
        stats = WeightSyncStats(version=version, num_buckets=num_buckets, num_tensors=num_tensors,
                                num_bytes=num_bytes, seconds=time.perf_counter() - start)
        logger.info("weight sync: version %d, %d tensors, %.1f MiB in %d buckets, %.2f s", version,
                    num_tensors, num_bytes / 1024**2, num_buckets, stats.seconds)
        return stats

    def _begin_session(self) -> bool:
        """Open the server's weight-update session; False on servers without sessions (404, remembered)."""
        if self._has_session is False:
            return False
        try:
            opened = self.engine.begin_weight_update(timeout=self.config.bucket_timeout_s)
        except EngineError as e:
            raise EngineError(f"weight sync: SGLang server at {self.engine.config.base_url} refused to open a "
                              f"weight-update session (/begin_weight_update): {e}") from e
        if not opened:
            logger.info("weight sync: %s has no /begin_weight_update (SGLang <= 0.5.20): buckets are sent "
                        "without a weight-update session", self.engine.config.base_url)
        self._has_session = opened
        return opened

    def _end_session(self, *, raise_errors: bool) -> None:
        """Close the session; a failure raises when the sync itself succeeded, else it is logged (the
        sync's own error is the one raised)."""
        try:
            self.engine.end_weight_update(timeout=self.config.bucket_timeout_s)
        except EngineError as e:
            message = (f"weight sync: SGLang server at {self.engine.config.base_url} failed to close the "
                       f"weight-update session (/end_weight_update): {e}")
            if raise_errors:
                raise EngineError(message) from e
            logger.error("%s (after the sync had failed)", message)

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], *, version: int, is_last: bool,
                     index: int) -> None:
        device = self._device()
        tensors = [t.detach().to(device).contiguous() for _, t in bucket]
        names = [name for name, _ in bucket]
        http = self._pool.submit(
            self.engine.update_weights_from_distributed, names, [dtype_name(t.dtype) for t in tensors],
            [list(t.shape) for t in tensors], group_name=self.config.group_name,
            version=version if is_last else None,
            flush_cache=is_last and self.engine.config.flush_cache_after_update,
            timeout=self.config.bucket_timeout_s)
        works = [dist.broadcast(t, src=0, group=self._pg, async_op=True) for t in tensors]
        what = f"bucket {index} ({len(names)} tensors, first {names[0]!r})"
        deadline = time.monotonic() + self.config.bucket_timeout_s
        pause = 0.0005
        while True:
            pending = [w for w in works if not w.is_completed()]
            if http.done() and http.exception() is not None:
                if pending:  # the server gave up without receiving everything: the group is out of step
                    self._break(f"{what} failed with broadcasts pending")
                raise EngineError(f"weight sync {what}: {http.exception()}") from http.exception()
            if not pending:
                break
            if time.monotonic() > deadline:
                self._break(f"{what} timed out after {self.config.bucket_timeout_s} s")
                raise EngineError(f"weight sync {what}: broadcasts not received by the server within "
                                  f"{self.config.bucket_timeout_s} s")
            time.sleep(pause)
            pause = min(2 * pause, 0.02)
        try:
            for w in works:
                w.wait()  # completed: surfaces a transport error, if any
        except Exception as e:
            self._break(f"{what}: broadcast failed")
            raise EngineError(f"weight sync {what}: broadcast failed: {e}") from e
        # The HTTP answer comes once the server has loaded the bucket; its errors raise EngineError here.
        try:
            http.result(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        except FutureTimeout:
            raise EngineError(f"weight sync {what}: no answer from the server within "
                              f"{self.config.bucket_timeout_s} s after the broadcasts") from None


def _free_port(host: str) -> int:
    """A port free on ``host`` now (another process may take it before the store binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- the two strategies, picked once


class DiskWeightSync:
    """Every trainer rank writes its shard of an HF checkpoint to ``<root>/v<version>``; the sending rank
    has the server load it (``/update_weights_from_disk``) and removes the older versions, which the
    server no longer reads. ``root`` must be on a file system the server can read."""

    def __init__(self, client: SGLangClient | None, root: str):
        self.client, self.root = client, root

    def sync(self, weights: PolicyWeights, version: int) -> None:
        path = weights.write_hf(os.path.join(self.root, f"v{version:07d}"))
        if self.client is None:
            return
        self.client.update_weights(path, version)
        for old in os.listdir(self.root):
            if old.startswith("v") and old != os.path.basename(path):
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def close(self) -> None:
        pass


class StreamedWeightSync:
    """The trainer's HF tensors gathered to rank 0 and streamed bucket by bucket to the server's workers
    (``/update_weights_from_distributed``, :class:`DistributedWeightSender`); the group is opened on the
    first sync and kept."""

    def __init__(self, client: SGLangClient | None, config: WeightSyncConfig):
        self.client, self.config = client, config
        self._sender: DistributedWeightSender | None = None

    def sync(self, weights: PolicyWeights, version: int) -> None:
        tensors = weights.hf_tensors(dst=0)
        if self.client is None:
            for _ in tensors:  # the gathers are collective
                pass
            return
        if self._sender is None:
            self._sender = DistributedWeightSender(self.client, self.config)
            self._sender.open()
        self._sender.send(tensors, version)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


def make_weight_sync(config: WeightSyncConfig, client: SGLangClient | None, *, root: str):
    """The strategy `config.mode` names. `client` is None on the ranks that only take part in the export
    (every rank but the sender)."""
    if config.mode == "distributed":
        return StreamedWeightSync(client, config)
    return DiskWeightSync(client, root)
