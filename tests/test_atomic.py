"""The one atomic file writer: a reader sees the old file or the new one, never a torn one."""

import os

import pytest

from megatron_lora.atomic import write_file_atomically, write_synced


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest.txt"
    write_file_atomically(path, "1\n")
    write_file_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["latest.txt"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_file_atomically(path, "old")

    def no_rename(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        write_file_atomically(path, "new")
    assert path.read_text() == "old"


def test_synced_write_takes_text_as_utf8(tmp_path):
    write_synced(tmp_path / "a", "é")
    assert (tmp_path / "a").read_bytes() == "é".encode("utf-8")
