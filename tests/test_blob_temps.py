"""A blob store shared by several processes: each clears only the temp files of processes that are gone,
and none replaces a blob another one published."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fcl_server.blobs import BlobStore


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_starting_process_keeps_the_temps_of_live_ones_and_drops_those_of_the_dead(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    live = BlobStore(root)
    in_flight = live.new_temp()
    in_flight.write_bytes(b"an upload being sealed by a live process")
    host = live.tmp.name.split("-")[0]
    dead = root / "tmp" / f"{host}-{_dead_pid()}-deadbeef"
    dead.mkdir()
    (dead / "x.part").write_bytes(b"left by a crash")
    remote_recent = root / "tmp" / "otherhost-123-cafe0001"  # another host: its pid means nothing here
    remote_recent.mkdir()
    (remote_recent / "y.part").write_bytes(b"in flight on another front-end")
    remote_stale = root / "tmp" / "otherhost-456-cafe0002"
    remote_stale.mkdir()
    (remote_stale / "z.part").write_bytes(b"untouched for two hours")
    two_hours_ago = time.time() - 7200
    for path in (remote_stale / "z.part", remote_stale):
        os.utime(path, (two_hours_ago, two_hours_ago))

    starting = BlobStore(root)
    assert starting.clear_temp() == 2  # the dead process's file and the stale remote one
    assert in_flight.read_bytes().startswith(b"an upload")
    assert (remote_recent / "y.part").exists()
    assert not dead.exists() and not remote_stale.exists()
    # the live store still publishes what it wrote
    digest = live.put_bytes(b"published after the other process started")
    assert starting.read(digest) == b"published after the other process started"


def test_a_temp_dir_swept_while_idle_comes_back(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    store.close()  # as a sweep by another process would
    path = store.new_temp()
    path.write_bytes(b"x")
    assert path.parent == store.tmp and path.exists()
    store.close()
    assert not store.tmp.exists()


def test_a_blob_a_concurrent_writer_published_first_is_kept_not_replaced(tmp_path: Path) -> None:
    """Two processes write the same bytes at once (the FM archive, at a simultaneous start), each
    having found no blob: the later one publishes onto the blob of the first."""
    first, second = BlobStore(tmp_path / "blobs"), BlobStore(tmp_path / "blobs")
    data = b"the FM archive"
    late = second.new_temp()
    late.write_bytes(data)
    digest = first.put_bytes(data)
    kept = first.path(digest).stat().st_ino
    with first.path(digest).open("rb") as download:  # a reader of the published blob
        second._publish(late, digest)  # past put_file's exists() check, as in the race
        assert download.read() == data
    assert first.path(digest).stat().st_ino == kept and not late.exists()
    assert second.read(digest) == data
