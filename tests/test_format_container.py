"""The .kqat container: round trip, and every way a file can be bad."""

from __future__ import annotations

import os
import struct

import pytest

from keras_qat.format import container

pytestmark = pytest.mark.api

MANIFEST = {"format": "kqat", "layers": [{"name": "conv", "op": "conv2d"}]}
PAYLOAD = bytes(range(256)) * 3


def test_round_trip_through_a_file(tmp_path):
    path = container.write_atomically(tmp_path / "m.kqat", container.encode(MANIFEST, PAYLOAD))
    assert container.read(path) == (MANIFEST, PAYLOAD)
    assert [p.name for p in tmp_path.iterdir()] == ["m.kqat"]


@pytest.mark.parametrize("cut", [5, 21, 60, -1])
def test_a_truncated_file_is_rejected(cut):
    data = container.encode(MANIFEST, PAYLOAD)
    with pytest.raises(container.ArtifactError, match="truncated|not a .kqat"):
        container.decode(data[:cut])


@pytest.mark.parametrize("where", ["manifest", "payload"])
def test_a_flipped_byte_is_caught_by_the_checksum(where):
    data = bytearray(container.encode(MANIFEST, PAYLOAD))
    index = 30 if where == "manifest" else len(data) - 100
    data[index] ^= 0x01
    with pytest.raises(container.ArtifactError, match="checksum"):
        container.decode(bytes(data))


def test_an_unknown_version_says_which_versions_are_read():
    data = bytearray(container.encode(MANIFEST, PAYLOAD))
    struct.pack_into("<I", data, 8, container.FORMAT_VERSION + 1)
    with pytest.raises(container.ArtifactError, match=f"version {container.FORMAT_VERSION + 1} is unknown"):
        container.decode(bytes(data))


def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        container.write_atomically(tmp_path / "m.kqat", b"data")
    assert list(tmp_path.iterdir()) == []
