"""Durable file operations (evd.core.files): files replaced atomically, one at a time
or several with one fsync per directory."""

from __future__ import annotations

from pathlib import Path

from evd.core.files import write_atomic, write_atomic_all


def test_write_atomic_all_replaces_every_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "0000.json", tmp_path / "b" / "0001.json"
    for path in (a, b):
        path.parent.mkdir()
    write_atomic(a, b"old")
    write_atomic_all([(a, b"new a"), (b, b"new b"), (tmp_path / "c.json", b"c")])
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")
    assert (tmp_path / "c.json").read_bytes() == b"c"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "0000.json", "0001.json", "c.json",
    ]
    write_atomic_all([])  # nothing to do
