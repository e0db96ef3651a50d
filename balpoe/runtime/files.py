"""Files: one atomic writer, output-path checks, the run-folder lock and bounded readers.

* Writing (:func:`atomic_write`): every result file (checkpoints, JSON, ``metrics.jsonl``,
  ``recipe.yaml``, ``report.html``, PNGs, predictions, exports) is written to a temporary file with
  an unpredictable name created exclusively in the destination's folder (``tempfile.mkstemp``:
  ``O_CREAT | O_EXCL``, never through a link), flushed, fsynced and renamed over the destination,
  so an interrupted write leaves the previous file intact and a planted link at a predictable
  temporary name is never written through.  A destination that is a symbolic link is refused:
  results are never written through links.  Temporary files are named ``.NAME.tmp-PID-XXXXXXXX``
  (plus the destination's suffix); those of dead processes are removed by
  :func:`remove_stale_temporaries` (the next write of the same file, and every training start).
* Output paths (:func:`check_output_path`): an output never replaces a file the command reads, nor
  a run's own files (:data:`RUN_FILES`) unless the command is the one that writes that file in
  that run folder.
* The run-folder lock (:class:`RunLock`): ``fcntl.flock`` on ``RUN/.balpoe.lock`` for the lifetime
  of a training run; a second run into the same folder is refused, and a lock held by a process
  that died is released by the kernel.
* Reading (:func:`read_text`, :func:`parse_json`, :func:`parse_yaml`): regular files only (not
  through links where asked), bounded in size, UTF-8, strict JSON (no NaN / Infinity), YAML without
  duplicate keys and with a bounded number of values (YAML aliases counted per use) and depth.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from balpoe.errors import BalpoeError, OutputExists, clip, short_path

# ------------------------------------------------------------------------------------------------
# Run folders

#: the files a run folder holds (training, evaluation, label-shift evaluation, report)
RUN_FILES = ("last.pt", "best.pt", "recipe.yaml", "metrics.jsonl", "metrics.csv", "eval.json", "eval_best.json",
             "shift_eval.json", "shift_eval.md", "report.html")
#: files whose presence makes a folder a run folder
RUN_MARKERS = ("last.pt", "best.pt", "recipe.yaml", "metrics.jsonl")
#: the lock file of a training run (:class:`RunLock`)
LOCK_NAME = ".balpoe.lock"


def _p(path: str | Path) -> str:
    return short_path(path)


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a run (any of :data:`RUN_MARKERS`, as a file or a link)."""
    folder = Path(folder)
    return any(os.path.lexists(folder / name) for name in RUN_MARKERS)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return a.resolve() == b.resolve()
        except (OSError, RuntimeError, ValueError):
            return False


def check_output_path(path: str | Path, what: str = "output file", *, inputs: Iterable[str | Path] = (),
                      own_run: str | Path | None = None, writes: Iterable[str] = (), create: bool = True,
                      overwrite: bool = True) -> Path:
    """Check, before any work, that writing ``path`` destroys nothing; returns ``path``.

    Refused with one line naming the path: a directory, a symbolic link, one of ``inputs`` (the
    files the command reads), or a run's own file (:data:`RUN_FILES`) in a run folder, except the
    files named in ``writes`` when that folder is ``own_run`` (``balpoe eval RUN/last.pt`` writes
    ``RUN/eval.json``).  The folder is created and checked writable (:func:`ensure_writable_file`);
    ``create=False`` creates nothing (the nearest existing folder must be writable): for a first
    check before the inputs are read.  ``overwrite=False``: an existing file (that passes the checks
    above) is refused too, with :class:`~balpoe.errors.OutputExists`."""
    path = Path(path)
    _check_name(path, what)
    for given in inputs:
        if given is not None and os.path.lexists(path) and _same_file(path, Path(given)):
            raise BalpoeError(f"{what} '{_p(path)}' is a file this command reads; choose another path")
    if path.name in RUN_FILES and is_run_folder(path.parent):
        own = own_run is not None and _same_file(path.parent, Path(own_run))
        if not (own and path.name in set(writes)):
            raise BalpoeError(f"{what} '{_p(path)}' is a run's own {path.name}; it is never overwritten by this "
                              "command: choose another path")
    if not overwrite and os.path.lexists(path) and not path.is_symlink() and not path.is_dir():
        raise OutputExists(_p(path), what)
    return ensure_writable_file(path, what, create=create)


def _check_name(path: Path, what: str) -> None:
    """Each component of ``path`` fits the file system's name limit (255 bytes)."""
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise BalpoeError(f"{what} '{_p(path)}' has a name component longer than 255 bytes")


def ensure_writable_dir(folder: str | Path, what: str = "output directory", create: bool = True) -> Path:
    """Create ``folder`` if needed and check that files can be written in it (before any work
    starts, so that nothing computed is lost at the end); one-line errors otherwise.
    ``create=False``: nothing is created; the nearest existing folder must be a writable folder."""
    folder = Path(folder)
    _check_name(folder, what)
    try:
        if folder.exists() and not folder.is_dir():
            raise BalpoeError(f"{what} '{_p(folder)}' is a file, not a directory")
        if not create:
            existing = next((f for f in (folder, *folder.absolute().parents) if f.exists()), Path("/"))
            if not existing.is_dir():
                raise BalpoeError(f"cannot create {what} '{_p(folder)}': a parent is a file")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise BalpoeError(f"{what} '{_p(folder)}' is not writable (Permission denied)")
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = _temporary(folder, "write-test")
        os.close(fd)
        os.unlink(probe)
    except (NotADirectoryError, FileExistsError):
        raise BalpoeError(f"cannot create {what} '{_p(folder)}': a parent is a file") from None
    except OSError as e:
        raise BalpoeError(f"{what} '{_p(folder)}' is not writable ({e.strerror or type(e).__name__})") from None
    return folder


def ensure_writable_file(path: str | Path, what: str = "output file", create: bool = True) -> Path:
    """Check that ``path`` can be written (its folder is created and writable; ``path`` itself is
    neither a directory nor a symbolic link) before any work starts."""
    path = Path(path)
    _check_name(path, what)
    if os.path.islink(path):
        raise BalpoeError(f"{what} '{_p(path)}' is a symbolic link; results are never written through links: "
                          "remove it or choose another path")
    if path.is_dir():
        raise BalpoeError(f"{what} '{_p(path)}' is a directory; give a file path")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), what=f"folder of the {what}", create=create)
    if path.exists() and not os.access(path, os.W_OK):
        raise BalpoeError(f"{what} '{_p(path)}' is not writable")
    return path


# ------------------------------------------------------------------------------------------------
# Atomic writes

#: ``.NAME.tmp-PID-RANDOM[.suffix]`` (and ``.NAME.tmp-PID`` / ``.STEM.tmp-PID.suffix`` of older versions)
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[A-Za-z0-9_]{8})?(?:\.[A-Za-z0-9]{1,16})?$")


def _temporary(folder: Path, name: str, suffix: str = "") -> tuple[int, Path]:
    """A fresh temporary file for ``name`` in ``folder``: ``.NAME.tmp-PID-XXXXXXXX[suffix]``, created
    exclusively with an unpredictable name (``tempfile.mkstemp``); the only temporary name the
    project creates, so that :func:`remove_stale_temporaries` knows every one."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.tmp-{os.getpid()}-", suffix=suffix, dir=folder)
    return fd, Path(tmp_name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files (:func:`atomic_write`'s ``.NAME.tmp-PID-...``, and the
    ``.write-test.tmp-PID-...`` probes of :func:`ensure_writable_dir`) that dead processes left in
    ``folder`` (all of them, or those of the destination ``name``); returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        if m is None or (name is not None and m.group("name") not in (name, Path(name).stem)):
            continue
        if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(folder / entry.name)
    return removed


def _write_error(path: Path, e: OSError) -> BalpoeError:
    reason = e.strerror or clip(e, 80) or type(e).__name__
    return BalpoeError(f"cannot write '{_p(path)}' ({reason}); the previous file, if any, is unchanged")


def atomic_write(path: str | Path, write: Callable[[Any], Any], *, check: Callable[[Path], Any] | None = None
                 ) -> Path:
    """Write ``path`` atomically: ``write(f)`` into a binary file object on a fresh temporary file
    in the same folder (unpredictable name, created exclusively), flush and fsync it, optionally
    ``check(temporary path)`` it (an exception leaves no file under the final name), then rename it
    over ``path``.  A symbolic link at ``path`` is refused; file-system errors (no space left, ...)
    are one line naming the file; the temporary file never survives."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if os.path.islink(path):
        raise BalpoeError(f"'{_p(path)}' is a symbolic link; results are never written through links: remove it or "
                          "choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from None
    remove_stale_temporaries(folder, path.name)
    try:
        fd, tmp = _temporary(folder, path.name, path.suffix[:17])
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # what open() would have given; mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        if os.path.lexists(tmp):
            try:
                tmp.unlink()
            except OSError:
                pass
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the process's umask, read once (reading it means setting it)
_UMASK = _umask()


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` (UTF-8) to the regular file ``path`` (never through a link)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BalpoeError(f"'{_p(path)}' is a symbolic link; results are never written through links") from None
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "ab") as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        raise _write_error(path, e) from None


# ------------------------------------------------------------------------------------------------
# The run-folder lock


class RunInUse(BalpoeError):
    """Another process holds the run folder's lock."""

    def __init__(self, folder: Path, pid: str):
        self.folder = folder
        holder = f" (process {pid})" if pid else ""
        super().__init__(f"output directory '{_p(folder)}' is in use by another training run{holder}; wait for it to "
                         "finish or choose another output directory")


class RunLock:
    """An exclusive ``fcntl.flock`` on ``FOLDER/.balpoe.lock``, held until :meth:`release` (or the
    process ends: the kernel releases the lock of a process that died, however it died).  The lock
    file holds the holder's process id and is removed on release; acquiring checks that the file
    locked is still the one at the path (a releasing holder may have just removed it)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise BalpoeError(f"lock file '{_p(self.path)}' is a symbolic link; remove it") from None
                raise BalpoeError(f"cannot create the lock file '{_p(self.path)}' "
                                  f"({e.strerror or type(e).__name__})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_small(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunInUse(self.folder, holder) from None
                raise BalpoeError(f"cannot lock '{_p(self.path)}' ({e.strerror or type(e).__name__})") from None
            try:
                st = os.stat(self.path, follow_symlinks=False)
                mine = os.fstat(fd)
                same = (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)  # the previous holder removed the file between our open and our lock: again
        raise BalpoeError(f"cannot lock '{_p(self.path)}': the lock file keeps changing")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_small(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


# ------------------------------------------------------------------------------------------------
# Reading


#: the largest JSON / YAML / JSONL file a run folder holds that balpoe reads (eval.json of 8k classes
#: with a confusion matrix is ~ 300 MB as text at worst; metrics.jsonl of 100k epochs ~ 20 MB)
MAX_RUN_FILE_BYTES = 1 << 30
#: a recipe file (or a run's recipe.yaml) is a few hundred bytes; anything absurdly large is refused before parsing
MAX_RECIPE_BYTES = 1 << 20
#: JSON / YAML nesting a run file never needs
MAX_DEPTH = 64
#: values a YAML document may expand to (each use of an alias counts)
MAX_YAML_VALUES = 100_000


def read_text(path: str | Path, what: str, *, max_bytes: int = MAX_RUN_FILE_BYTES, follow_links: bool = True,
              kind: str = "a file", limit: str | None = None) -> str:
    """The UTF-8 text of the regular file ``path``; one line naming ``what`` and the path when it is
    missing, a directory (``is a directory, not <kind>``), not a regular file, a link
    (``follow_links=False``), larger than ``max_bytes`` (``limit``: what the message says of the
    bound, default ``at most <max_bytes> are read``), unreadable or not UTF-8.  Special files are
    opened without blocking (a FIFO without a writer is refused, not waited on)."""
    path = Path(path)
    name = f"{what} '{_p(path)}'"
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise BalpoeError(f"{name} not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_links:
            raise BalpoeError(f"{name} is a symbolic link; run files are not read through links") from None
        if e.errno == errno.EISDIR:
            raise BalpoeError(f"{name} is a directory, not {kind}") from None
        raise BalpoeError(f"{name} cannot be read ({clip(e.strerror or type(e).__name__, 80)})") from None
    except ValueError as e:  # a NUL byte in the name
        raise BalpoeError(f"{name} cannot be read ({clip(e, 80)})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BalpoeError(f"{name} is a directory, not {kind}")
        if not stat.S_ISREG(st.st_mode):
            raise BalpoeError(f"{name} is not a regular file")
        if st.st_size > max_bytes:
            raise BalpoeError(f"{name} is {st.st_size} bytes; {limit or f'at most {max_bytes} are read'}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(min(st.st_size, max_bytes) + 1)   # the size the file has (a read allocates it)
    except OSError as e:
        raise BalpoeError(f"{name} cannot be read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BalpoeError(f"{name} is larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BalpoeError(f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, where: str) -> Any:
    """Strict JSON (``NaN`` / ``Infinity`` refused) nested at most :data:`MAX_DEPTH` deep; one line
    naming ``where`` otherwise."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise BalpoeError(f"{where}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    except ValueError as e:
        raise BalpoeError(f"{where}: {clip(e, 80)} (strict JSON has no NaN or Infinity)") from None
    except RecursionError:
        raise BalpoeError(f"{where}: JSON nested too deeply") from None
    check_size(value, where, max_values=None)
    return value


def check_size(value: Any, where: str, *, max_values: int | None = MAX_YAML_VALUES, max_depth: int = MAX_DEPTH,
               counted: str = "values") -> None:
    """``value`` (plain data) holds at most ``max_values`` values (a container reached twice, as
    through a YAML alias, counts twice; ``None``: no bound) nested at most ``max_depth`` deep."""
    count, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if max_values is not None and count > max_values:
            raise BalpoeError(f"{where} holds more than {max_values} {counted} (each use of a YAML alias counts)")
        if depth > max_depth:
            raise BalpoeError(f"{where} is nested more than {max_depth} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node if isinstance(k, (tuple, frozenset)))
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in node)


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping names a key twice."""

    def __init__(self, key: Any, mark):
        self.key = key
        super().__init__(None, None, f"the key {key!r} appears twice in one mapping", mark)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming a key twice (the YAML spec requires
    unique keys; PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    new = key not in seen
                except TypeError:  # unhashable: PyYAML's own message follows
                    break
                if not new:
                    raise DuplicateKey(key, key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class YamlTooDeep(yaml.YAMLError):
    """YAML nested too deeply for the parser."""


def parse_yaml(text: str, where: str | None = None) -> Any:
    """YAML -> plain data with :class:`UniqueKeyLoader`; nesting too deep for the parser raises
    :class:`YamlTooDeep` (a ``yaml.YAMLError``).  With ``where``, the result is also bounded
    (:func:`check_size`) and every YAML error is one :class:`BalpoeError` line naming ``where``."""
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        if where is None:
            raise YamlTooDeep("nested too deeply") from None
        raise BalpoeError(f"{where} is not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        if where is None:
            raise
        raise BalpoeError(f"{where} is not valid YAML ({yaml_problem(e)})") from None
    if where is not None:
        check_size(value, where)
    return value


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, for a one-line message: ``line 3: found unexpected end of stream``."""
    if isinstance(e, YamlTooDeep):
        return "nested too deeply"
    if isinstance(e, yaml.reader.ReaderError):
        code = e.character if isinstance(e.character, int) else ord(e.character)
        return f"character U+{code:04X} at offset {e.position} is not allowed"
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if isinstance(e, DuplicateKey):
        key = e.key if isinstance(e.key, str) else repr(e.key)
        return f"line {mark.line + 1}: the key '{clip(key, 80)}' appears twice in one mapping"
    parts = [f"line {mark.line + 1}" if mark is not None else "", clip(problem, 100) if problem else ""]
    return ": ".join(p for p in parts if p)
