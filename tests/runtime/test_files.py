"""The bounded text reader every run file and recipe file goes through (``runtime.files.read_text``)."""

import pytest

from balpoe.errors import BalpoeError
from balpoe.runtime.files import read_text


def _error(*args, **kwargs) -> str:
    with pytest.raises(BalpoeError) as e:
        read_text(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_read_text_one_line_refusals(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    # a link loop is a link only where links are refused; otherwise the file cannot be read
    assert _error(loop, "run file", follow_links=False) == \
        f"run file '{loop}' is a symbolic link; run files are not read through links"
    assert _error(loop, "recipe file") == f"recipe file '{loop}' cannot be read (Too many levels of symbolic links)"
    assert _error(tmp_path / "a\0b", "run file") == f"run file '{tmp_path}/a\\x00b' cannot be read (embedded null byte)"
    plain = tmp_path / "plain.txt"
    plain.write_text("0123456789")
    assert _error(plain / "below", "run file") == f"run file '{plain}/below' not found"   # a file as a folder
    assert _error(tmp_path, "run file") == f"run file '{tmp_path}' is a directory, not a file"
    assert _error(tmp_path, "recipe file", kind="a YAML file") == \
        f"recipe file '{tmp_path}' is a directory, not a YAML file"
    assert _error(plain, "run file", max_bytes=4) == f"run file '{plain}' is 10 bytes; at most 4 are read"
    assert _error(plain, "recipe file", max_bytes=4, limit="a recipe is at most 4 bytes") == \
        f"recipe file '{plain}' is 10 bytes; a recipe is at most 4 bytes"
    assert read_text(plain, "run file", max_bytes=10) == "0123456789"
