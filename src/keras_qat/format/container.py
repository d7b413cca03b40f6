"""The ``.kqat`` container: a JSON manifest and a byte payload, checksummed, written atomically.

Layout (all integers little-endian)::

    offset        size  content
    0             8     magic b"KQAT\\r\\n\\x1a\\n"
    8             4     uint32 format version (FORMAT_VERSION)
    12            8     uint64 manifest length M
    20            M     manifest, UTF-8 JSON
    20 + M        8     uint64 payload length P
    28 + M        P     payload: the packed tensors, at the offsets the manifest gives
    28 + M + P    32    SHA-256 of every byte before it

A reader checks the magic, the version, the lengths (a truncated file fails there) and the
checksum (a corrupted one fails there) before it trusts anything in the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from keras_qat.format.atomic import write_atomically

MAGIC = b"KQAT\r\n\x1a\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ")
_LENGTH = struct.Struct("<Q")
_DIGEST_SIZE = 32


class ArtifactError(ValueError):
    """A ``.kqat`` file that cannot be read: truncated, corrupted, or of an unknown version."""


def encode(manifest: dict[str, Any], payload: bytes) -> bytes:
    """The container's bytes for ``manifest`` and ``payload``."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, len(text)) + text + _LENGTH.pack(len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, source: str = "artifact") -> tuple[dict[str, Any], bytes]:
    """``(manifest, payload)`` from container bytes; :class:`ArtifactError` if they are bad."""
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise ArtifactError(f"{source}: not a .kqat artifact (no KQAT header).")
    _, version, manifest_length = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{source}: format version {version} is unknown; this keras-qat reads version {FORMAT_VERSION}. "
            "Export it again with this version, or upgrade keras-qat."
        )
    payload_at = _HEADER.size + manifest_length + _LENGTH.size
    if len(data) < payload_at:
        raise ArtifactError(f"{source}: truncated (the file ends inside its manifest).")
    (payload_length,) = _LENGTH.unpack_from(data, payload_at - _LENGTH.size)
    end = payload_at + payload_length
    if len(data) != end + _DIGEST_SIZE:
        raise ArtifactError(f"{source}: truncated or padded: {len(data)} bytes, expected {end + _DIGEST_SIZE}.")
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise ArtifactError(f"{source}: corrupted (checksum mismatch); export it again.")
    manifest = json.loads(data[_HEADER.size : _HEADER.size + manifest_length].decode("utf-8"))
    return manifest, data[payload_at:end]


def read(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """``(manifest, payload)`` of the ``.kqat`` file at ``path``."""
    return decode(Path(path).read_bytes(), source=str(path))


__all__ = ["ArtifactError", "FORMAT_VERSION", "encode", "decode", "read", "write_atomically"]
