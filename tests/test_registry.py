"""Registries: reading files and folders, watching them, the memory registry, dispatch."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import watchfiles
from watchfiles import Change

from inmesh.config.document import Document
from inmesh.exceptions import ConfigError, RegistryError
from inmesh.registry import FileRegistry, MemoryRegistry, Registry, open_registry

DEADLINE = 5.0  # seconds to wait for a change to arrive; it takes ~20 ms


class Changes:
    """An on_change listener that counts its calls and lets a test wait for them."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.count = 0
        self.threads: set[str] = set()

    def __call__(self) -> None:
        with self._condition:
            self.count += 1
            self.threads.add(threading.current_thread().name)
            self._condition.notify_all()

    def wait_for_call(self, after: int, timeout: float = DEADLINE) -> bool:
        """Wait until there has been a call since the count was ``after``."""
        with self._condition:
            return self._condition.wait_for(lambda: self.count > after, timeout)

    def after(
        self, change: Callable[[], object], condition: Callable[[], bool], timeout: float = DEADLINE
    ) -> bool:
        """Make ``change``, then wait for a call after which ``condition()`` holds.

        The condition alone would not do: it reads the files, which show the change at
        once; what is tested is that the listener hears of it.
        """
        deadline = time.monotonic() + timeout
        seen = self.count
        change()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_for_call(seen, remaining):
                return False
            seen = self.count
            if condition():
                return True


def bodies(registry: Registry) -> list[tuple[str, Any]]:
    """(source, body) of every document, or [] while the registry cannot be read."""
    try:
        return [(document.source, document.body) for document in registry.read()]
    except (ConfigError, RegistryError):
        return []


def write(path: Path, text: str) -> None:
    """Write in place, as `echo > file` or most editors' plain save do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def save_atomically(path: Path, text: str) -> None:
    """Write a hidden temporary file beside ``path`` and rename it over, as vim and deploys do."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty registry folder, with the working directory beside it (for relative names)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mesh.d"
    path.mkdir()
    return path


@pytest.fixture
def watched(folder: Path) -> Iterator[tuple[FileRegistry, Changes]]:
    """A FileRegistry over ``mesh.d`` with a listener registered; closed after the test."""
    with FileRegistry("mesh.d") as registry:
        changes = Changes()
        registry.watch(changes)
        yield registry, changes


def watcher_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("inmesh-registry-watch")]


# -- reading ------------------------------------------------------------------------------


def test_folder_is_read_in_sorted_order_with_subfolders(folder: Path) -> None:
    """Files are read recursively, ordered by relative path, named as given + relative path."""
    write(folder / "reviews.yaml", "kind: VirtualService\n---\nkind: DestinationRule\n")
    write(folder / "b" / "ratings.yml", "kind: ServiceEntry\n")
    write(folder / "a.json", '{"kind": "MeshConfig"}')
    write(folder / "b" / "deeper" / "x.yaml", "kind: X\n")
    registry = FileRegistry("mesh.d/")
    documents = registry.read()
    assert [(d.source, d.index, d.body["kind"]) for d in documents] == [
        ("mesh.d/a.json", 0, "MeshConfig"),
        ("mesh.d/b/deeper/x.yaml", 0, "X"),
        ("mesh.d/b/ratings.yml", 0, "ServiceEntry"),
        ("mesh.d/reviews.yaml", 0, "VirtualService"),
        ("mesh.d/reviews.yaml", 1, "DestinationRule"),
    ]
    assert registry.files() == [
        "mesh.d/a.json",
        "mesh.d/b/deeper/x.yaml",
        "mesh.d/b/ratings.yml",
        "mesh.d/reviews.yaml",
    ]
    assert documents == sorted(documents, key=lambda d: (d.source, d.index))
    assert registry.name == "mesh.d/"


def test_hidden_temporary_and_other_files_are_skipped(folder: Path) -> None:
    """Hidden files and folders, editors' temporary and backup files, non-YAML are not read."""
    write(folder / "real.yaml", "kind: Real\n")
    for name in [
        ".hidden.yaml",
        ".#real.yaml",
        "real.yaml~",
        "#real.yaml#",
        ".real.yaml.swp",
        "real.yaml.swp",
        "real.yaml.bak",
        "notes.txt",
        "README.md",
        ".git/config.yaml",
        "..data/real.yaml",
        ".cache/sub/x.yml",
    ]:
        write(folder / name, "kind: Ignored\n")
    assert bodies(FileRegistry(folder)) == [(f"{folder}/real.yaml", {"kind": "Real"})]


def test_symlinked_files_and_folders_are_followed_without_loops(folder: Path) -> None:
    """Links are read through (as Kubernetes mounts ConfigMaps), and a link loop ends."""
    write(folder.parent / "elsewhere" / "shared.yaml", "kind: Shared\n")
    (folder / "shared.yaml").symlink_to(folder.parent / "elsewhere" / "shared.yaml")
    (folder / "linked").symlink_to(folder.parent / "elsewhere", target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    assert [source for source, _ in bodies(FileRegistry("mesh.d"))] == [
        "mesh.d/linked/shared.yaml",
        "mesh.d/shared.yaml",
    ]


def test_single_file(folder: Path) -> None:
    """A file path reads that file, whatever its extension, named as given."""
    write(folder / "mesh.conf", "kind: A\n---\nkind: B\n")
    registry = FileRegistry("mesh.d/mesh.conf")
    assert bodies(registry) == [
        ("mesh.d/mesh.conf", {"kind": "A"}),
        ("mesh.d/mesh.conf", {"kind": "B"}),
    ]
    assert registry.files() == ["mesh.d/mesh.conf"]


def test_syntax_problems_of_all_files_are_collected(folder: Path) -> None:
    """One ConfigError carries the problems of every file, each with file:line."""
    write(folder / "a.yaml", "kind: A\nspec: {x: 1, x: 2}\n")
    write(folder / "b.yaml", "kind: B\n")
    write(folder / "c.yaml", "kind: C\nspec:\n  hosts: a: b\n")
    with pytest.raises(ConfigError) as caught:
        FileRegistry("mesh.d").read()
    assert [(p.source, p.line) for p in caught.value.problems] == [
        ("mesh.d/a.yaml", 2),
        ("mesh.d/c.yaml", 3),
    ]
    assert (
        str(caught.value).splitlines()[0]
        == "mesh.d/a.yaml:2 spec.x: duplicate key (first at line 2)"
    )


def test_text_that_is_not_utf8_is_a_problem(folder: Path) -> None:
    """Bytes that are not UTF-8 are reported with their file and line; a BOM is fine."""
    (folder / "latin1.yaml").write_bytes(b"kind: A\nname: caf\xe9\n")
    (folder / "bom.yaml").write_bytes(b"\xef\xbb\xbfkind: B\n")
    with pytest.raises(ConfigError) as caught:
        FileRegistry("mesh.d").read()
    (problem,) = caught.value.problems
    assert (problem.source, problem.line) == ("mesh.d/latin1.yaml", 2)
    (folder / "latin1.yaml").unlink()
    assert bodies(FileRegistry("mesh.d")) == [("mesh.d/bom.yaml", {"kind": "B"})]


def test_empty_folder_reads_nothing(folder: Path) -> None:
    """A folder without configuration files is an empty registry, not an error."""
    assert FileRegistry(folder).read() == []


def test_missing_paths_are_registry_errors(folder: Path) -> None:
    """A path that does not exist is refused up front, and named; so is one that vanishes."""
    with pytest.raises(RegistryError, match=r"'nowhere\.yaml' does not exist"):
        FileRegistry("nowhere.yaml")
    with pytest.raises(OSError, match="nowhere"):
        open_registry(Path("nowhere"))
    write(folder / "mesh.yaml", "kind: A\n")
    registry = FileRegistry("mesh.d/mesh.yaml")
    (folder / "mesh.yaml").unlink()
    with pytest.raises(RegistryError, match=r"'mesh\.d/mesh\.yaml' does not exist"):
        registry.read()
    vanishing = FileRegistry("mesh.d")
    shutil.rmtree(folder)
    with pytest.raises(RegistryError, match=r"'mesh\.d'"):
        vanishing.read()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_is_a_registry_error(folder: Path) -> None:  # pragma: no cover
    """A file that cannot be opened makes read() fail with a RegistryError naming it."""
    write(folder / "secret.yaml", "kind: A\n")
    (folder / "secret.yaml").chmod(0)
    with pytest.raises(RegistryError, match=r"secret\.yaml"):
        FileRegistry("mesh.d").read()


# -- open_registry ------------------------------------------------------------------------


def test_open_registry_dispatch(folder: Path) -> None:
    """A Registry passes through, a path opens a FileRegistry, etcd:// is not there yet."""
    memory = MemoryRegistry()
    assert open_registry(memory) is memory
    registry = open_registry(folder)
    assert isinstance(registry, FileRegistry)
    assert registry.name == str(folder)
    assert open_registry("mesh.d").name == "mesh.d"
    with pytest.raises(RegistryError, match="etcd registry is not available yet"):
        open_registry("etcd://127.0.0.1:2379/mesh")


# -- watching -----------------------------------------------------------------------------


def test_watch_sees_create_modify_delete(
    folder: Path, watched: tuple[FileRegistry, Changes]
) -> None:
    """Creating, modifying and deleting a file each reach the listener, from its thread."""
    registry, changes = watched
    a = folder / "a.yaml"
    assert changes.after(
        lambda: write(a, "kind: A\n"),
        lambda: bodies(registry) == [("mesh.d/a.yaml", {"kind": "A"})],
    )
    assert changes.after(
        lambda: write(a, "kind: A2\n"),
        lambda: bodies(registry) == [("mesh.d/a.yaml", {"kind": "A2"})],
    )
    assert changes.after(a.unlink, lambda: bodies(registry) == [])
    assert changes.threads == {"inmesh-registry-watch:mesh.d"}


def test_watch_sees_atomic_saves(folder: Path, watched: tuple[FileRegistry, Changes]) -> None:
    """A save by rename over the old file is seen, and its temporary file never read."""
    registry, changes = watched
    a = folder / "a.yaml"
    write(a, "kind: A\n")
    for version in range(3):
        expected = [("mesh.d/a.yaml", {"kind": "A", "version": version})]
        assert changes.after(
            lambda version=version: save_atomically(a, f"kind: A\nversion: {version}\n"),
            lambda expected=expected: bodies(registry) == expected,
        )


def test_watch_sees_subfolders(folder: Path, watched: tuple[FileRegistry, Changes]) -> None:
    """A new subfolder with a file, a change in it, and the subfolder's removal are seen."""
    registry, changes = watched
    x = folder / "team" / "new" / "x.yaml"
    assert changes.after(
        lambda: write(x, "kind: X\n"),
        lambda: bodies(registry) == [("mesh.d/team/new/x.yaml", {"kind": "X"})],
    )
    assert changes.after(
        lambda: write(x, "kind: X2\n"),
        lambda: bodies(registry) == [("mesh.d/team/new/x.yaml", {"kind": "X2"})],
    )
    assert changes.after(
        lambda: shutil.move(folder / "team", folder.parent / "moved-away"),
        lambda: bodies(registry) == [],
    )


def test_watch_sees_a_folder_moved_in(folder: Path, watched: tuple[FileRegistry, Changes]) -> None:
    """A whole folder moved in at once (one event, for the folder only) is seen."""
    registry, changes = watched
    write(folder.parent / "staging" / "x.yaml", "kind: X\n")
    assert changes.after(
        lambda: os.rename(folder.parent / "staging", folder / "staging"),
        lambda: bodies(registry) == [("mesh.d/staging/x.yaml", {"kind": "X"})],
    )


def test_several_saves_may_be_coalesced(
    folder: Path, watched: tuple[FileRegistry, Changes]
) -> None:
    """Many quick saves give at least one call, after which the last content is read."""
    registry, changes = watched

    def save_many() -> None:
        for version in range(20):
            write(folder / f"f{version % 3}.yaml", f"v: {version}\n")

    assert changes.after(
        save_many,
        lambda: [body for _, body in bodies(registry)] == [{"v": 18}, {"v": 19}, {"v": 17}],
    )
    assert 1 <= changes.count <= 20


def test_single_file_watch(folder: Path) -> None:
    """A watched file's in-place writes, atomic saves, removal and return are all seen."""
    path = folder / "mesh.yaml"
    write(path, "kind: A\n")
    with FileRegistry("mesh.d/mesh.yaml") as registry:
        changes = Changes()
        registry.watch(changes)
        assert changes.after(
            lambda: write(path, "kind: B\n"),
            lambda: bodies(registry) == [("mesh.d/mesh.yaml", {"kind": "B"})],
        )
        assert changes.after(
            lambda: save_atomically(path, "kind: C\n"),
            lambda: bodies(registry) == [("mesh.d/mesh.yaml", {"kind": "C"})],
        )
        assert changes.after(path.unlink, lambda: bodies(registry) == [])
        with pytest.raises(RegistryError, match="does not exist"):
            registry.read()
        assert changes.after(
            lambda: write(path, "kind: D\n"),
            lambda: bodies(registry) == [("mesh.d/mesh.yaml", {"kind": "D"})],
        )


def test_single_file_ignores_its_neighbours(folder: Path) -> None:
    """Changes to other files beside a watched file do not call its listeners."""
    path = folder / "mesh.yaml"
    write(path, "kind: A\n")
    with FileRegistry(path) as registry:
        changes = Changes()
        registry.watch(changes)
        write(folder / "other.yaml", "kind: Other\n")
        # The neighbour is written first, so a call for it would come before this one.
        assert changes.after(lambda: write(path, "kind: B\n"), lambda: True)
        assert changes.count == 1


def test_polling_watch(folder: Path) -> None:
    """Where the OS gives no notifications, polling sees changes too."""
    a = folder / "a.yaml"
    with FileRegistry("mesh.d", force_polling=True) as registry:
        changes = Changes()
        registry.watch(changes)
        assert changes.after(
            lambda: write(a, "kind: A\n"),
            lambda: bodies(registry) == [("mesh.d/a.yaml", {"kind": "A"})],
        )
        assert changes.after(
            lambda: save_atomically(a, "kind: B\n"),
            lambda: bodies(registry) == [("mesh.d/a.yaml", {"kind": "B"})],
        )


def test_polling_sees_quick_same_size_rewrites(folder: Path) -> None:
    """Saves within one tick of the clock, of the same size, are still told apart."""
    a = folder / "a.yaml"
    write(a, "v: 0\n")
    with FileRegistry("mesh.d", force_polling=True) as registry:
        changes = Changes()
        registry.watch(changes)
        for version in range(1, 4):
            expected = [("mesh.d/a.yaml", {"v": version})]
            assert changes.after(
                lambda version=version: write(a, f"v: {version}\n"),
                lambda expected=expected: bodies(registry) == expected,
            )


def test_falls_back_to_polling_without_notifications(
    folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the OS watch cannot be had (inotify's limit, say), the registry polls instead."""

    def no_notifications(*_args: object, **_kwargs: object) -> Iterator[set[Any]]:
        raise OSError("OS file watch limit reached")
        yield set()  # pragma: no cover  # (a generator, like the real one)

    monkeypatch.delenv("WATCHFILES_FORCE_POLLING", raising=False)
    monkeypatch.setattr(watchfiles, "watch", no_notifications)
    with FileRegistry("mesh.d") as registry, caplog.at_level(logging.WARNING):
        changes = Changes()
        registry.watch(changes)
        assert changes.after(
            lambda: write(folder / "a.yaml", "kind: A\n"),
            lambda: bodies(registry) == [("mesh.d/a.yaml", {"kind": "A"})],
        )
    assert "polling every 50 ms instead" in caplog.text
    with FileRegistry("mesh.d", force_polling=False) as registry:
        with pytest.raises(RegistryError, match="watch limit"):
            registry.watch(Changes())
        assert "inmesh-registry-watch:mesh.d" not in watcher_threads()


def test_watcher_restarts_after_an_error(
    folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error of the watcher is logged, the watch restarts, and listeners are called."""
    real_watch = watchfiles.watch
    generations: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Iterator[set[Any]]:
        generations.append(len(generations))
        if len(generations) == 1:
            kwargs["stop_event"].is_set()  # in force, as the real watch would be...
            raise RuntimeError("event queue overflowed")  # ...then broken
        yield from real_watch(*args, **kwargs)

    monkeypatch.setattr(watchfiles, "watch", flaky)
    with FileRegistry("mesh.d") as registry, caplog.at_level(logging.ERROR):
        changes = Changes()
        registry.watch(changes)
        # The restarted watch calls the listeners once: changes may have been missed.
        assert changes.wait_for_call(0)
        assert changes.after(
            lambda: write(folder / "a.yaml", "kind: A\n"),
            lambda: bodies(registry) == [("mesh.d/a.yaml", {"kind": "A"})],
        )
    assert len(generations) == 2
    assert "restarting it" in caplog.text
    assert "event queue overflowed" in caplog.text


def swap_configmap(folder: Path, version: str, text: str) -> None:
    """What kubelet's atomic writer does: a new hidden folder, a new link renamed over ..data."""
    write(folder / version / "mesh.yaml", text)
    (folder / "..data_tmp").symlink_to(version)
    os.replace(folder / "..data_tmp", folder / "..data")


def test_kubernetes_configmap_update(folder: Path) -> None:
    """A ConfigMap volume's update (swapping the hidden ..data link) is seen."""
    write(folder / "..2024_01" / "mesh.yaml", "kind: A\n")
    (folder / "..data").symlink_to("..2024_01")
    (folder / "mesh.yaml").symlink_to("..data/mesh.yaml")
    with FileRegistry("mesh.d") as registry:
        changes = Changes()
        registry.watch(changes)
        assert bodies(registry) == [("mesh.d/mesh.yaml", {"kind": "A"})]
        assert changes.after(
            lambda: swap_configmap(folder, "..2024_02", "kind: B\n"),
            lambda: bodies(registry) == [("mesh.d/mesh.yaml", {"kind": "B"})],
        )


def test_single_file_configmap_update(folder: Path) -> None:
    """A single file mounted from a ConfigMap is seen to change when ..data is swapped."""
    write(folder / "..2024_01" / "mesh.yaml", "kind: A\n")
    (folder / "..data").symlink_to("..2024_01")
    (folder / "mesh.yaml").symlink_to("..data/mesh.yaml")
    with FileRegistry(folder / "mesh.yaml") as registry:
        changes = Changes()
        registry.watch(changes)
        assert changes.after(
            lambda: swap_configmap(folder, "..2024_02", "kind: B\n"),
            lambda: [body for _, body in bodies(registry)] == [{"kind": "B"}],
        )


def test_watched_folder_removed_and_recreated(
    folder: Path, watched: tuple[FileRegistry, Changes]
) -> None:
    """A folder deleted and made again (a crude deploy) is watched again, new files seen."""
    registry, changes = watched
    write(folder / "a.yaml", "kind: A\n")
    assert changes.after(lambda: shutil.rmtree(folder), lambda: bodies(registry) == [])

    def recreate() -> None:
        folder.mkdir()
        write(folder / "b.yaml", "kind: B\n")

    assert changes.after(recreate, lambda: bodies(registry) == [("mesh.d/b.yaml", {"kind": "B"})])
    # And the new folder is really watched, not merely read once.
    assert changes.after(
        lambda: write(folder / "b.yaml", "kind: B2\n"),
        lambda: bodies(registry) == [("mesh.d/b.yaml", {"kind": "B2"})],
    )


def test_several_listeners_and_one_thread(folder: Path) -> None:
    """Every listener hears every change; a registry has one watcher thread however many."""
    with FileRegistry("mesh.d") as registry:
        first, second = Changes(), Changes()
        registry.watch(first)
        registry.watch(second)
        assert watcher_threads().count("inmesh-registry-watch:mesh.d") == 1
        assert first.after(lambda: write(folder / "a.yaml", "kind: A\n"), lambda: True)
        assert second.wait_for_call(0)
        registry.unwatch(first)
        calls = first.count
        assert second.after(
            lambda: write(folder / "b.yaml", "kind: B\n"), lambda: len(bodies(registry)) == 2
        )
        assert first.count == calls


def test_failing_listener_is_logged_and_others_still_called(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that raises is logged on inmesh.registry; the others and the thread go on."""

    def broken() -> None:
        raise RuntimeError("listener bug")

    with FileRegistry("mesh.d") as registry:
        changes = Changes()
        registry.watch(broken)
        registry.watch(changes)
        with caplog.at_level(logging.ERROR, logger="inmesh.registry"):
            assert changes.after(lambda: write(folder / "a.yaml", "kind: A\n"), lambda: True)
            assert changes.after(lambda: write(folder / "b.yaml", "kind: B\n"), lambda: True)
    assert any(r.exc_info and "listener bug" in str(r.exc_info[1]) for r in caplog.records)
    assert {r.name for r in caplog.records} == {"inmesh.registry"}


def test_irrelevant_changes_are_filtered(folder: Path) -> None:
    """Only changes that can alter what read() returns pass the watcher's filter."""
    registry = FileRegistry(folder)

    def relevant(path: str, change: Change = Change.modified) -> bool:
        return registry._relevant(change, str(folder / path))

    assert relevant("a.yaml")
    assert relevant("a.yml")
    assert relevant("b/a.JSON")
    assert relevant("..data", Change.added)  # Kubernetes' ConfigMap swap
    assert relevant("gone-folder", Change.deleted)
    (folder / "new-folder").mkdir()
    assert relevant("new-folder", Change.added)
    assert registry._relevant(Change.deleted, str(folder))  # the folder itself
    assert not relevant("notes.txt")
    assert not relevant("notes.txt", Change.deleted)
    assert not relevant(".a.yaml.tmp123")
    assert not relevant(".hidden.yaml")
    assert not relevant(".git/x.yaml")
    assert not relevant("a.yaml~")
    assert not relevant(".#a.yaml")
    assert not relevant("#a.yaml#")
    assert not relevant("a.yaml.swp")
    assert not relevant("4913")  # vim's probe file: not a folder, so not relevant
    write(folder / "mesh.yaml", "kind: A\n")
    single = FileRegistry(folder / "mesh.yaml")
    assert single._relevant(Change.modified, str(folder / "mesh.yaml"))
    assert not single._relevant(Change.modified, str(folder / "other.yaml"))
    assert single._relevant(Change.added, str(folder / "..data"))


def test_watch_is_in_force_when_it_returns(folder: Path) -> None:
    """A change made right after watch() returns is always seen (no start-up race)."""
    for attempt in range(5):
        with FileRegistry("mesh.d") as registry:
            changes = Changes()
            registry.watch(changes)
            write(folder / f"r{attempt}.yaml", "kind: A\n")
            assert changes.wait_for_call(0)  # made right after watch(), so it must be heard


def test_close_stops_the_thread_promptly_and_is_idempotent(folder: Path) -> None:
    """close() ends the watcher thread within a fraction of a second; closing again is fine."""
    registry = FileRegistry("mesh.d")
    changes = Changes()
    registry.watch(changes)
    assert "inmesh-registry-watch:mesh.d" in watcher_threads()
    started = time.monotonic()
    registry.close()
    assert time.monotonic() - started < 1.0
    assert "inmesh-registry-watch:mesh.d" not in watcher_threads()
    registry.close()
    with pytest.raises(RegistryError, match="closed"):
        registry.watch(changes)
    assert registry.read() == []  # reading still works


def test_close_from_a_listener(folder: Path) -> None:
    """A listener may close its registry (from the watcher thread) without a deadlock."""
    registry = FileRegistry("mesh.d")
    closed = threading.Event()

    def close_now() -> None:
        registry.close()
        closed.set()

    registry.watch(close_now)
    write(folder / "a.yaml", "kind: A\n")
    assert closed.wait(DEADLINE)
    registry.close()  # joins the thread, which ends by itself


def test_close_without_watch_and_context_manager(folder: Path) -> None:
    """A registry never watched closes at once, also as a context manager."""
    with FileRegistry("mesh.d") as registry:
        assert registry.read() == []
    registry.close()


def test_watch_of_a_vanished_folder_fails(folder: Path) -> None:
    """watch() raises RegistryError when the folder is gone, and the listener is not kept."""
    registry = FileRegistry("mesh.d")
    folder.rmdir()
    with pytest.raises(RegistryError, match="cannot watch"):
        registry.watch(Changes())
    registry.close()
    assert "inmesh-registry-watch:mesh.d" not in watcher_threads()


# -- memory -------------------------------------------------------------------------------


def test_memory_registry_put_remove_clear_notify() -> None:
    """Each change calls the listeners synchronously, after the change is in place."""
    registry = MemoryRegistry({"b.yaml": "kind: B\n", "a.yaml": "kind: A\n---\nkind: A2\n"})
    seen: list[list[tuple[str, Any]]] = []
    registry.watch(lambda: seen.append(bodies(registry)))
    assert bodies(registry) == [
        ("a.yaml", {"kind": "A"}),
        ("a.yaml", {"kind": "A2"}),
        ("b.yaml", {"kind": "B"}),
    ]
    registry.put("c.yaml", "kind: C\n")
    assert seen[-1][-1] == ("c.yaml", {"kind": "C"})
    registry.remove("a.yaml")
    assert seen[-1] == [("b.yaml", {"kind": "B"}), ("c.yaml", {"kind": "C"})]
    registry.clear()
    assert seen[-1] == []
    assert len(seen) == 3
    with pytest.raises(KeyError):
        registry.remove("a.yaml")
    assert len(seen) == 3


def test_memory_registry_parsed_resources() -> None:
    """Parsed resources are copied to plain values; their documents have no lines."""
    resource = {"kind": "ServiceEntry", "spec": {"hosts": ("a", "b")}}
    registry = MemoryRegistry({"entries": [resource]})
    registry.put("one", {"kind": "Single"})
    resource["kind"] = "Changed"
    documents = registry.read()
    assert [(d.source, d.index, d.body) for d in documents] == [
        ("entries", 0, {"kind": "ServiceEntry", "spec": {"hosts": ["a", "b"]}}),
        ("one", 0, {"kind": "Single"}),
    ]
    assert documents[0].line is None
    assert dict(documents[0].lines) == {}
    with pytest.raises(TypeError, match="not a mapping"):
        registry.put("bad", ["kind: A"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a YAML value"):
        registry.put("bad", [{"when": object()}])


def test_memory_registry_text_has_lines_and_problems() -> None:
    """Text is parsed as a file would be: lines kept, syntax problems of all sources raised."""
    registry = MemoryRegistry({"good.yaml": "kind: A\nspec:\n  x: 1\n"})
    (document,) = registry.read()
    assert document.lines[("spec", "x")] == 3
    registry.put("bad1.yaml", "a: [1\n")
    registry.put("bad2.yaml", "a: 1\na: 2\n")
    with pytest.raises(ConfigError) as caught:
        registry.read()
    assert [p.source for p in caught.value.problems] == ["bad1.yaml", "bad2.yaml"]
    registry.remove("bad1.yaml")
    registry.put("bad2.yaml", "a: 2\n")
    assert len(registry.read()) == 2


def test_memory_registry_is_thread_safe() -> None:
    """Concurrent puts and reads neither fail nor lose a change."""
    registry = MemoryRegistry()
    changes = Changes()
    registry.watch(changes)
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            for version in range(50):
                registry.put(f"w{number}", f"v: {version}\n")
                registry.read()
        except BaseException as error:  # pragma: no cover
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert changes.count == 200
    assert [d.body for d in registry.read()] == [{"v": 49}] * 4


def test_memory_registry_close() -> None:
    """After close() no listener is called and none can be added; reading still works."""
    registry = MemoryRegistry({"a": "kind: A\n"})
    changes = Changes()
    registry.watch(changes)
    with registry:
        pass
    registry.close()
    registry.put("b", "kind: B\n")
    assert changes.count == 0
    with pytest.raises(RegistryError):
        registry.watch(changes)
    assert len(registry.read()) == 2


def test_unchanged_files_are_not_parsed_again(folder: Path) -> None:
    """A file whose bytes did not change gives the same documents without a new parse."""
    write(folder / "a.yaml", "kind: A\nspec: {x: [1, 2]}\n")
    write(folder / "b.yaml", "kind: B\n")
    registry = FileRegistry("mesh.d")
    a, _ = registry.read()
    assert isinstance(a, Document)
    save_atomically(folder / "a.yaml", "kind: A\nspec: {x: [1, 2]}\n")  # same bytes
    write(folder / "b.yaml", "kind: B2\n")
    again_a, new_b = registry.read()
    assert again_a is a
    assert new_b.body == {"kind": "B2"}
    write(folder / "b.yaml", "kind: [\n")
    with pytest.raises(ConfigError):
        registry.read()
    with pytest.raises(ConfigError):  # a cached problem is still a problem
        registry.read()
    (folder / "b.yaml").unlink()
    assert registry.read() == [a]
