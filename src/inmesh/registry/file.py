"""The file registry: one YAML/JSON file, or a folder of them, watched for changes.

A folder's ``*.yaml``, ``*.yml`` and ``*.json`` files are read recursively in sorted
order of their relative paths; hidden files and folders (``.git``, Kubernetes'
``..data``) and editors' temporary and backup files (``.#x``, ``x~``, ``x.swp``) are
skipped. A document's source is the path as given joined with the file's relative path
(``mesh.d/reviews.yaml``), so problems read ``mesh.d/reviews.yaml:14 spec.http[0]...``.
Each read re-reads every file but parses only those whose bytes changed.

Theory of operation of the watcher. One daemon thread per registry runs
``watchfiles.watch`` over the folder (for a single file: over its parent folder,
filtered to that file's name), because editors and deploy tools save by writing a
temporary file and renaming it over the old one, which a watch on the file itself would
lose. A change is reported after ``_STEP_MS`` of quiet (at most ``_DEBOUNCE_MS`` after
it began), so a save reaches the listeners in 10-30 ms, well inside the 200 ms budget of
"saved, then in effect in every Mesh". The thread

- tells ``watch()`` when the OS watch is in force (see ``_ArmingProbe``), so a change
  made after ``watch()`` returns is never missed;
- notices every second whether the folder it watches was removed or replaced (a deploy
  that swaps the folder, or the symlink to it) and then watches the new one;
- survives errors of the watcher (an overflowed event queue, say): it logs them,
  restarts, and calls the listeners once, since changes may have been missed meanwhile;
- polls instead, every ``_POLL_DELAY_MS``, where the OS gives no notifications (some
  network and container filesystems, WSL; ``force_polling=True`` or
  ``WATCHFILES_FORCE_POLLING=1``), or cannot give more (inotify's watch limit reached).
  The polling is done here, not by watchfiles, whose poller can lose a save (see
  ``FileRegistry._poll``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import stat
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Final, TypeAlias

from inmesh.config.document import Document
from inmesh.config.yaml import documents_from_text
from inmesh.exceptions import ConfigError, Problem, RegistryError
from inmesh.registry.base import Listeners, Registry

if TYPE_CHECKING:
    from watchfiles import Change

__all__ = ["FileRegistry", "is_config_file"]

logger = logging.getLogger("inmesh.registry")

SUFFIXES: Final = frozenset({".yaml", ".yml", ".json"})

# watchfiles parameters. A batch is yielded after one step without new events, so a save
# takes one to two steps; 10 ms costs a wake-up of the Rust loop 100 times a second,
# which is nothing, and leaves the Mesh ~170 ms of the 200 ms budget to reload.
_STEP_MS: Final = 10
# The most a burst (a `git checkout`, a deploy copying many files) is held back for.
_DEBOUNCE_MS: Final = 100
# Where polling is used: the delay between two scans of the folder (watchfiles'
# default, 300 ms, would alone break the 200 ms budget). A scan of a config folder is
# a stat per file: well under a millisecond for dozens of files.
_POLL_DELAY_MS: Final = 50
# How often the thread wakes with no events, to check that the folder is still the one
# watched. Also bounds how long a replaced folder goes unnoticed.
_IDLE_CHECK_MS: Final = 1_000

# A file whose modification time is this recent may be written again within the same
# tick of the filesystem's clock (coarse on many), so the poller also compares content.
_RACY_NS: Final = 2_000_000_000

_ARM_TIMEOUT_S: Final = 10.0
_JOIN_TIMEOUT_S: Final = 2.0
_RESTART_DELAYS_S: Final = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_FOLDER_POLL_S: Final = 0.05

# Kubernetes mounts a ConfigMap as symlinks into a hidden ``..data`` folder and updates
# it by swapping that one symlink; its change is the only sign that the files changed.
_KUBERNETES_DATA: Final = "..data"

_TEMPORARY_PREFIXES: Final = (".", "#", "~")
_TEMPORARY_SUFFIXES: Final = ("~", "#", ".swp", ".swo", ".swx", ".tmp", ".bak", ".orig")


def _skipped(name: str) -> bool:
    """Whether a file or folder name is hidden or an editor's temporary or backup file."""
    return name.startswith(_TEMPORARY_PREFIXES) or name.endswith(_TEMPORARY_SUFFIXES)


def is_config_file(name: str) -> bool:
    """Whether a file of this name in a registry folder is read (by its name alone)."""
    return not _skipped(name) and os.path.splitext(name)[1].lower() in SUFFIXES


class FileRegistry(Registry):
    """Documents from a YAML/JSON file or a folder of them, watched for changes.

    ``force_polling``: ``None`` uses the OS's file notifications, falling back to polling
    if they cannot be had (and polling where watchfiles would: if
    ``WATCHFILES_FORCE_POLLING`` says so, or on WSL); ``True`` always polls, ``False``
    never does.
    """

    def __init__(self, path: str | os.PathLike[str], *, force_polling: bool | None = None) -> None:
        self.name = os.fspath(path)
        self._path = os.path.abspath(self.name)
        try:
            mode = os.stat(self._path).st_mode
        except FileNotFoundError:
            raise RegistryError(f"registry path {self.name!r} does not exist") from None
        except OSError as error:
            raise RegistryError(f"cannot read registry path {self.name!r}: {error}") from error
        self._folder = stat.S_ISDIR(mode)
        # What the OS is asked to watch: the folder, or the folder holding the file.
        self._watched = self._path if self._folder else os.path.dirname(self._path)
        self._file_name = None if self._folder else os.path.basename(self._path)
        self._watched_prefixes = _prefixes(self._watched)
        self._force_polling = force_polling
        self._listeners = Listeners()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._armed = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._parsed: dict[str, tuple[bytes, _Parsed]] = {}  # by source: digest, result

    # -- reading ------------------------------------------------------------------------

    def read(self) -> list[Document]:
        """Every document of the file, or of every file of the folder in sorted order.

        Raises ``ConfigError`` with the syntax problems of all files together, and
        ``RegistryError`` if the path (or a file or folder in it) cannot be read.

        A file whose bytes are those of the previous read is not parsed again: its
        documents (values, not to be mutated) are reused, so a save of one file in a
        large folder costs the parse of that file only.
        """
        files = self._files() if self._folder else [(self.name, self._path)]
        with self._lock:
            previous = self._parsed
        parsed: dict[str, tuple[bytes, _Parsed]] = {}
        documents: list[Document] = []
        problems: list[Problem] = []
        for source, path in files:
            try:
                with open(path, "rb") as stream:
                    data = stream.read()
            except FileNotFoundError:
                if self._folder:
                    continue  # deleted since it was listed: a save in progress
                raise RegistryError(f"registry file {self.name!r} does not exist") from None
            except OSError as error:
                raise RegistryError(f"cannot read registry file {source!r}: {error}") from error
            digest = hashlib.blake2b(data, digest_size=16).digest()
            known = previous.get(source)
            result = known[1] if known is not None and known[0] == digest else _parse(data, source)
            parsed[source] = (digest, result)
            if isinstance(result, ConfigError):
                problems.extend(result.problems)
            else:
                documents.extend(result)
        with self._lock:
            self._parsed = parsed  # also forgets the files that are gone
        if problems:
            raise ConfigError(problems)
        return documents

    def files(self) -> list[str]:
        """The source names of the files that ``read()`` reads, in its order."""
        return [source for source, _ in self._files()] if self._folder else [self.name]

    def _files(self) -> list[tuple[str, str]]:
        """(source name, absolute path) of every configuration file of the folder."""

        def fail(error: OSError) -> None:
            if isinstance(error, FileNotFoundError) and error.filename != self._path:
                return  # a subfolder removed while we walk: as if it had never been there
            shown = os.path.relpath(error.filename, self._path) if error.filename else ""
            where = os.path.join(self.name, shown) if shown not in ("", ".") else self.name
            raise RegistryError(f"cannot read registry folder {where!r}: {error}") from error

        found: list[tuple[str, str]] = []
        visited: set[tuple[int, int]] = set()
        for folder, subfolders, names in os.walk(self._path, onerror=fail, followlinks=True):
            # Symlinked folders are followed (a config folder assembled from links is
            # common), so guard against a link that points back up the tree.
            try:
                info = os.stat(folder)
            except FileNotFoundError:
                subfolders[:] = []
                continue
            if (info.st_dev, info.st_ino) in visited:
                subfolders[:] = []
                continue
            visited.add((info.st_dev, info.st_ino))
            subfolders[:] = [name for name in subfolders if not _skipped(name)]
            relative = os.path.relpath(folder, self._path)
            for name in names:
                if is_config_file(name):
                    path = name if relative == os.curdir else os.path.join(relative, name)
                    found.append((path, os.path.join(folder, name)))
        # By the source name as a string, the order read() promises ("by source").
        found.sort(key=lambda item: item[0].replace(os.sep, "/"))
        return [(os.path.join(self.name, path), absolute) for path, absolute in found]

    # -- watching -----------------------------------------------------------------------

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change()`` from the watcher thread after each change of the files.

        Returns once the watch is in force: a change made after this returns is seen.
        Raises ``RegistryError`` if the folder cannot be watched.
        """
        with self._lock:
            if self._closed:
                raise RegistryError(f"registry {self.name!r} is closed")
            self._listeners.add(on_change)
            if self._thread is None or not self._thread.is_alive():
                self._armed.clear()
                self._start_error = None
                self._thread = threading.Thread(
                    target=self._run, name=f"inmesh-registry-watch:{self.name}", daemon=True
                )
                self._thread.start()
            thread = self._thread
        if not self._armed.wait(_ARM_TIMEOUT_S):
            logger.warning(
                "registry %s: the file watcher took over %.0f s to start; changes made "
                "until it does are not seen",
                self.name,
                _ARM_TIMEOUT_S,
            )
            return
        error = self._start_error
        if error is not None:
            thread.join(_JOIN_TIMEOUT_S)
            with self._lock:
                if self._thread is thread:
                    self._thread = None
                self._listeners.remove(on_change)
            raise RegistryError(f"cannot watch registry {self.name!r}: {error}") from error

    def unwatch(self, on_change: Callable[[], None]) -> None:
        """Stop calling ``on_change`` (the watcher thread runs on until ``close()``)."""
        self._listeners.remove(on_change)

    def close(self) -> None:
        """Stop the watcher thread and wait for it (briefly). Closing twice is harmless."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._stop.set()
        self._listeners.clear()
        if thread is None or thread is threading.current_thread():
            return  # closed from a listener: the thread ends by itself after it returns
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("registry %s: the file watcher did not stop in time", self.name)

    def _run(self) -> None:
        try:
            self._watch_until_closed()
        except BaseException as error:  # not even a bug here may end the watch unseen
            logger.critical("registry %s: the file watcher died", self.name, exc_info=True)
            if not self._armed.is_set():
                self._start_error = error
            raise
        finally:
            self._armed.set()  # never leave watch() waiting

    def _watch_until_closed(self) -> None:
        polling = _polling_wanted(self._force_polling)
        first = True
        failures = 0
        while not self._stop.is_set():
            if not os.path.isdir(self._watched):
                if first:
                    self._start_error = FileNotFoundError(f"{self._watched} does not exist")
                    return
                logger.info("registry %s: waiting for %s to exist", self.name, self._watched)
                while not os.path.isdir(self._watched):
                    if self._stop.wait(_FOLDER_POLL_S):
                        return
            # The first watch tells watch() it is in force; a later one (after an error
            # or a replaced folder) stands for whatever changed while nothing watched.
            on_armed: Callable[[], None] = (
                self._armed.set if first else partial(self._listeners.notify, self.name)
            )
            probe = _ArmingProbe(self._stop, on_armed)
            began = time.monotonic()
            try:
                if polling:
                    self._poll(probe)
                else:
                    self._follow_notifications(probe)
            except Exception as error:
                if first and not probe.armed:
                    if (
                        self._force_polling is None
                        and not polling
                        and not isinstance(error, FileNotFoundError)
                    ):
                        logger.warning(
                            "registry %s: no file notifications for %s (%s); "
                            "polling every %d ms instead",
                            self.name,
                            self._watched,
                            error,
                            _POLL_DELAY_MS,
                        )
                        polling = True
                        continue
                    self._start_error = error
                    return
                if time.monotonic() - began > 10 * _RESTART_DELAYS_S[-1]:
                    failures = 0
                delay = _RESTART_DELAYS_S[min(failures, len(_RESTART_DELAYS_S) - 1)]
                failures += 1
                logger.error(
                    "registry %s: the file watcher failed; restarting it in %.2f s",
                    self.name,
                    delay,
                    exc_info=True,
                )
                first = first and not probe.armed
                if self._stop.wait(delay):
                    return
                continue
            first = first and not probe.armed

    def _follow_notifications(self, probe: _ArmingProbe) -> None:
        """Relay the OS's change notifications until closed or the folder is replaced."""
        import watchfiles  # only a registry that is watched pays for it

        identity = _identity(self._watched)
        batches = watchfiles.watch(
            self._watched,
            watch_filter=self._relevant,
            debounce=_DEBOUNCE_MS,
            step=_STEP_MS,
            stop_event=probe,
            rust_timeout=_IDLE_CHECK_MS,
            yield_on_timeout=True,
            raise_interrupt=False,
            force_polling=False,
            recursive=self._folder,
        )
        try:
            for changes in batches:
                if changes:
                    self._listeners.notify(self.name)
                if _identity(self._watched) != identity:
                    self._replaced()
                    return
        finally:
            batches.close()  # ends watchfiles' OS watch now, not when collected

    def _poll(self, probe: _ArmingProbe) -> None:
        """Compare the files' state every ``_POLL_DELAY_MS`` until closed or replaced.

        Not watchfiles' polling: notify's poll watcher compares modification times in
        whole seconds, so a save within the second of the one before is lost for good.
        Here the state of a file is its inode, size and times in nanoseconds, and, while
        its time is too recent to tell two writes apart, a digest of its content.
        """
        identity = _identity(self._watched)
        state = self._state()
        while not probe.is_set():  # the first question arms: the state is known
            if self._stop.wait(_POLL_DELAY_MS / 1000):
                return
            if _identity(self._watched) != identity:
                self._replaced()
                return
            current = self._state()
            if current != state:
                state = current
                self._listeners.notify(self.name)

    def _state(self) -> dict[str, tuple[object, ...]] | None:
        """What the poller compares: a signature per file read, None if unreadable."""
        try:
            files = self._files() if self._folder else [(self.name, self._path)]
        except RegistryError:
            return None
        now = time.time_ns()
        state: dict[str, tuple[object, ...]] = {}
        for source, path in files:
            try:
                info = os.stat(path)
                digest = None
                if now - info.st_mtime_ns < _RACY_NS:
                    with open(path, "rb") as stream:
                        digest = hashlib.blake2b(stream.read(), digest_size=16).digest()
            except OSError:
                continue  # gone: its absence is the change
            state[source] = (
                info.st_dev,
                info.st_ino,
                info.st_size,
                info.st_mtime_ns,
                info.st_ctime_ns,
                digest,
            )
        return state

    def _replaced(self) -> None:
        logger.info(
            "registry %s: %s was removed or replaced; watching it anew", self.name, self._watched
        )

    def _relevant(self, change: Change, path: str) -> bool:
        """Whether a change can alter what ``read()`` returns (the filter given to watchfiles)."""
        name = os.path.basename(path)
        if name == _KUBERNETES_DATA:
            return True
        if self._file_name is not None:
            return name == self._file_name
        parts = _relative_parts(path, self._watched_prefixes)
        if parts is None or not parts:
            return True  # the folder itself, or a path we cannot place: better read again
        if any(_skipped(part) for part in parts):
            return False
        if os.path.splitext(name)[1].lower() in SUFFIXES:
            return True
        # A folder appearing or vanishing adds or removes the files in it, and the OS may
        # report only the folder. A deleted folder cannot be asked whether it was one, but
        # folders seldom have a dot in their name and configuration files always do.
        if change.name == "deleted":
            return "." not in name
        return os.path.isdir(path)

    def __repr__(self) -> str:
        return f"FileRegistry({self.name!r})"


class _ArmingProbe:
    """The ``stop_event`` handed to watchfiles, which also says when the watch is in force.

    ``watchfiles.watch`` creates its OS watch, which records events from then on, and
    only then asks ``stop_event.is_set()`` once per step; so the first question means
    the watch is in force. (watchfiles offers no other signal for it.) The poller asks
    it the same way, once it has taken the state of the files to compare with.
    """

    __slots__ = ("_on_armed", "_stop", "armed")

    def __init__(self, stop: threading.Event, on_armed: Callable[[], None]) -> None:
        self._stop = stop
        self._on_armed = on_armed
        self.armed = False

    def is_set(self) -> bool:
        if not self.armed:
            self.armed = True
            self._on_armed()
        return self._stop.is_set()


_Parsed: TypeAlias = tuple[Document, ...] | ConfigError


def _parse(data: bytes, source: str) -> _Parsed:
    """The documents of one file's bytes, or the error that lists its problems."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        message = "the file is not UTF-8 text"
        return ConfigError([Problem(source=source, line=line, path="", message=message)])
    try:
        return tuple(documents_from_text(text, source))
    except ConfigError as error:
        return error


def _polling_wanted(force_polling: bool | None) -> bool:
    """Whether to poll: as asked, else as watchfiles would decide (its variable, or WSL)."""
    if force_polling is not None:
        return force_polling
    variable = os.getenv("WATCHFILES_FORCE_POLLING")
    if variable:
        return variable.lower() not in {"false", "disable", "disabled"}
    # WSL's inotify misses changes made on the Windows side; watchfiles polls there too.
    uname = platform.uname()
    return "microsoft-standard" in uname.release.lower() and uname.system.lower() == "linux"


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _prefixes(folder: str) -> tuple[str, ...]:
    # Events may name paths through the folder's real path rather than the one given
    # (macOS reports /private/var/... for /var/...), so both are recognised.
    real = os.path.realpath(folder)
    return tuple(dict.fromkeys(os.path.join(p, "") for p in (folder, real)))


def _relative_parts(path: str, prefixes: tuple[str, ...]) -> list[str] | None:
    for prefix in prefixes:
        if path.startswith(prefix):
            return path[len(prefix) :].split(os.sep)
        if path == prefix[:-1]:
            return []
    return None
