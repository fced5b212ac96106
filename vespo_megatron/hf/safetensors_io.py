"""Reading and writing sharded safetensors checkpoints in the Hugging Face layout.

Reading: `CheckpointReader` resolves every tensor name through `model.safetensors.index.json` (or the single
`model.safetensors`), checks up front that every shard the index names exists (a missing shard is an error
that lists the missing files, not a `KeyError` halfway through loading), and opens shards lazily.

Writing: `ShardWriter` streams `(name, tensor)` pairs into numbered part files of at most `max_shard_bytes`;
`finalize_checkpoint` renames the parts of every writing rank into `model-0000i-of-0000n.safetensors`,
writes the index (`metadata.total_size`, `weight_map`) and the config, and moves the directory into place
in one rename, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointReader", "ShardWriter", "finalize_checkpoint", "INDEX_FILE", "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a checkpoint directory carries besides the weights; copied from the source checkpoint on save.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class CheckpointReader:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    self.weight_map: dict[str, str] = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{index}: expected JSON with a 'weight_map', got an unreadable file ({e!r})") from None
        elif os.path.isfile(os.path.join(self.path, SINGLE_FILE)):
            with safe_open(os.path.join(self.path, SINGLE_FILE), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            found = sorted(os.listdir(self.path)) if os.path.isdir(self.path) else "no such directory"
            raise FileNotFoundError(f"hf checkpoint {self.path!r}: expected {INDEX_FILE} or {SINGLE_FILE}, "
                                    f"found {found}")
        missing = sorted({s for s in self.weight_map.values() if not os.path.isfile(os.path.join(self.path, s))})
        if missing:
            raise FileNotFoundError(f"hf checkpoint {self.path!r}: {len(missing)} shard(s) named in {INDEX_FILE} "
                                    f"are missing: {missing}")
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise KeyError(f"hf checkpoint {self.path!r}: tensor {name!r} is not in the checkpoint "
                           f"({len(self.weight_map)} tensors; is it the right model?)")
        if shard not in self._open:
            self._open[shard] = safe_open(os.path.join(self.path, shard), framework="pt", device="cpu")
        return self._open[shard].get_tensor(name)

    def close(self) -> None:
        self._open.clear()


class ShardWriter:
    """Writes `(name, tensor)` pairs into `<directory>/<prefix>-<k>.safetensors` parts of bounded size."""

    def __init__(self, directory: str, prefix: str, max_shard_bytes: int = 5 * 2**30):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes: expected >= 1, got {max_shard_bytes}")
        self.directory, self.prefix, self.max_shard_bytes = directory, prefix, max_shard_bytes
        self.parts: list[tuple[str, list[str], int]] = []  # (file name, tensor names, bytes)
        self._pending: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._bytes + size > self.max_shard_bytes:
            self.flush()
        # safetensors refuses views that share storage; a contiguous CPU copy is what lands on disk anyway.
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._bytes += size

    def flush(self) -> None:
        if not self._pending:
            return
        file = f"{self.prefix}-{len(self.parts):05d}.safetensors"
        save_file(self._pending, os.path.join(self.directory, file), metadata={"format": "pt"})
        self.parts.append((file, list(self._pending), self._bytes))
        self._pending, self._bytes = {}, 0


def finalize_checkpoint(tmp_dir: str, out_dir: str, parts: Iterable[tuple[str, list[str], int]],
                        hf_config: dict, source_dir: str | None = None) -> None:
    """Rename `parts` (from every writer, in order) to HF shard names, write index and config, move into place."""
    parts = list(parts)
    n = len(parts)
    weight_map, total = {}, 0
    for i, (file, names, size) in enumerate(parts):
        final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(tmp_dir, file), os.path.join(tmp_dir, final))
        for name in names:
            if name in weight_map:
                raise RuntimeError(f"hf export: tensor {name!r} was written twice")
            weight_map[name] = final
        total += size
    if n > 1:
        with open(os.path.join(tmp_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(tmp_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if source_dir is not None:
        for side in SIDE_FILES:
            if os.path.isfile(os.path.join(source_dir, side)):
                shutil.copy2(os.path.join(source_dir, side), os.path.join(tmp_dir, side))
    if os.path.exists(out_dir):
        old = out_dir.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)
