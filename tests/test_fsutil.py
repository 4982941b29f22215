"""fsutil.replace_folder: the one folder replacement (downloads, exports, carried runs)."""

import os

import pytest

from resnet_graph import fsutil


def folder(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_folder_with_files_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    old = folder(tmp_path / "target", a="old a", b="old b")
    new = folder(tmp_path / "new", a="new a")
    fsutil.replace_folder(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert {p.name: p.read_text() for p in old.iterdir()} == {"a": "new a"}


def test_an_absent_target_is_created(tmp_path):
    new = folder(tmp_path / "new", a="x")
    fsutil.replace_folder(new, tmp_path / "target")
    assert (tmp_path / "target" / "a").read_text() == "x"
    assert not new.exists()


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    old = folder(tmp_path / "target", a="old a")
    new = folder(tmp_path / "new", a="new a")
    real = os.replace

    def fail_into_place(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(OSError):
        fsutil.replace_folder(new, old)
    assert (old / "a").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "target"]


def test_replacing_folder_removes_what_a_failed_block_wrote(tmp_path):
    old = folder(tmp_path / "target", a="old a")
    with pytest.raises(RuntimeError), fsutil.replacing_folder(old) as tmp:
        folder(tmp, a="half")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (old / "a").read_text() == "old a"
