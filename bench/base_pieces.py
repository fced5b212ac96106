"""The testbed's SFT base as pieces small enough to carry to the device: pack here, unpack there.

A device call carries the tracked tree, the wheels and the base in 64 MiB. The round-8 base is an fp32
safetensors file of 53.7 MB; gzip takes it to 49.8 MB, because the low three bytes of an fp32 weight look
random to it. Stored byte plane by byte plane (every 4th byte together: the planes of the exponent and sign
compress to ~40 %), the same base gzips to 45.7 MB. The transform is exact: unpack gives the tar back bit for
bit (a 16-byte header holds the magic and the tar's length). fp32 fields stay 4-byte aligned in the tar because
tar puts each file at a multiple of 512 and safetensors pads its header to a multiple of 8.

    python bench/base_pieces.py pack <base dir> <out dir>     # <out dir>/sft_base.planes.gz.part-aa, -ab, ...
    python bench/base_pieces.py unpack <pieces dir> <base dir>
    python bench/base_pieces.py carried .gpuwhl .gpubase      # MiB a device call carries: tracked tree + these

`bench/run_gpu_testbed.sh` unpacks `.gpubase/sft_base.planes.gz.part-*` this way (and the older plain or gzipped
tar pieces as they are).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile

import numpy as np

MAGIC = b"VBPLANES"
STEM = "sft_base.planes.gz.part-"
PIECE_BYTES = 15 * 1024 * 1024


def to_planes(data: bytes) -> bytes:
    """Header (magic, length) + the bytes regrouped by their position modulo 4 (the tail padded with zeros)."""
    pad = (-len(data)) % 4
    arr = np.frombuffer(data + b"\0" * pad, dtype=np.uint8).reshape(-1, 4)
    return MAGIC + struct.pack("<Q", len(data)) + arr.T.tobytes()


def from_planes(blob: bytes) -> bytes:
    if blob[:8] != MAGIC:
        raise ValueError(f"base pieces: expected the magic {MAGIC!r} at the start, got {blob[:8]!r}")
    (length,) = struct.unpack("<Q", blob[8:16])
    body = np.frombuffer(blob[16:], dtype=np.uint8)
    if body.size % 4 or body.size < length:
        raise ValueError(f"base pieces: expected 4 planes holding at least {length} bytes, got {body.size} bytes")
    return body.reshape(4, -1).T.tobytes()[:length]


def pack(base_dir: str, out_dir: str) -> list[str]:
    """tar of base_dir's `hf/` and `sft.json` -> planes -> gzip -> pieces of 15 MiB; returns their paths."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name in ("hf", "sft.json"):
            path = os.path.join(base_dir, name)
            if not os.path.exists(path):
                raise ValueError(f"base_dir: expected {path} (a testbed base: hf/ and sft.json), not found")
            t.add(path, arcname=name)
    blob = gzip.compress(to_planes(buf.getvalue()), compresslevel=6, mtime=0)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(0, len(blob), PIECE_BYTES):
        k = i // PIECE_BYTES
        path = os.path.join(out_dir, STEM + chr(ord("a") + k // 26) + chr(ord("a") + k % 26))
        with open(path, "wb") as f:
            f.write(blob[i : i + PIECE_BYTES])
        paths.append(path)
    return paths


def unpack(pieces_dir: str, base_dir: str) -> None:
    paths = sorted(glob.glob(os.path.join(pieces_dir, STEM + "*")))
    if not paths:
        raise ValueError(f"pieces_dir: expected {STEM}* files in {pieces_dir}, found none")
    blob = b"".join(open(p, "rb").read() for p in paths)
    data = from_planes(gzip.decompress(blob))
    os.makedirs(base_dir, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as t:
        t.extractall(base_dir, filter="data")


def carried_bytes(repo: str, carry: list[str]) -> dict[str, int]:
    """Bytes a device call carries from `repo`: its tracked files (`git ls-files`; untracked files that git does
    not ignore travel too, and are counted) and each carried path (a file or a folder, walked)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True).stdout.split(b"\0")
    tree = sum(os.path.getsize(os.path.join(repo, f.decode())) for f in listed
               if f and os.path.isfile(os.path.join(repo, f.decode())))
    sizes = {"tree": tree}
    for path in carry:
        full = os.path.join(repo, path)
        if os.path.isfile(full):
            sizes[path] = os.path.getsize(full)
        else:
            sizes[path] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(full) for f in fs)
    return sizes


def main(argv: list[str]) -> int:
    if argv[:1] == ["carried"]:
        sizes = carried_bytes(os.getcwd(), argv[1:])
        for name, n in sizes.items():
            print(f"{name}: {n / 2**20:.1f} MiB")
        print(f"total: {sum(sizes.values()) / 2**20:.1f} MiB (a call carries at most 64 MiB)")
        return 0
    if len(argv) != 3 or argv[0] not in ("pack", "unpack"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "pack":
        for p in pack(argv[1], argv[2]):
            print(p, os.path.getsize(p))
    else:
        unpack(argv[1], argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
