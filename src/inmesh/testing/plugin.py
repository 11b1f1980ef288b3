"""The pytest plugin: fault injection and registry folders for tests of meshed code.

- ``mesh_faults`` fixture: install faults for calls to any host, in every Mesh of the
  process, and see every call the mesh made (``.calls``); all undone when the test ends,
  pass or fail.
- ``@pytest.mark.mesh_fault("ratings", http_status=503, ...)``: the same faults,
  declared; in force while the test function runs.
- ``mesh_registry`` fixture: write a registry folder from YAML text and rewrite it later
  (a watching Mesh reloads).
- ``--inmesh-seed=N``: the seed of ``percent`` draws (default 0: every run draws alike).

Installed with the package as the ``pytest11`` entry point ``inmesh``; ``-p no:inmesh``
switches it off. Importing this module must stay cheap — it loads in every pytest run of
a project that has inmesh installed — so it imports ``inmesh.testing.faults`` (pure) and
nothing of httpx, grpc, YAML or the file watcher.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Final

import pytest

from inmesh.exceptions import ConfigError
from inmesh.testing.faults import OVERLAY, FaultRule, MeshFaults

__all__ = ["DEFAULT_SEED", "RegistryFolder", "mesh_faults", "mesh_registry"]

#: The seed of the ``percent`` draws when ``--inmesh-seed`` is not given.
DEFAULT_SEED: Final = 0

_SUFFIXES: Final = (".yaml", ".yml", ".json")  # what the file registry reads
_MARKER_KEYWORDS: Final = frozenset(
    {
        "http_status",
        "grpc_status",
        "delay",
        "percent",
        "first",
        "method",
        "path_prefix",
        "headers",
        "subset",
    }
)

_FAULTS = pytest.StashKey[MeshFaults]()  # the test's overlay session, once one is started
_MARKED = pytest.StashKey[list[FaultRule]]()  # the test's marker rules, validated at setup


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("inmesh", "inmesh fault injection")
    group.addoption(
        "--inmesh-seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="N",
        help=(
            "seed of the percent draws of mesh faults; every test starts from it "
            f"(default {DEFAULT_SEED}, so runs repeat)"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mesh_fault(host, *, http_status=None, grpc_status=None, delay=None, percent=100, "
        "first=None, method=None, path_prefix=None, headers=None, subset=None): "
        "inject an inmesh fault into calls to host while the test runs (several allowed)",
    )


# ---------------------------------------------------------------------- faults


def _start(item: pytest.Item, *, record: bool) -> MeshFaults:
    faults = item.stash.get(_FAULTS, None)
    if faults is None:
        seed: int = item.config.getoption("inmesh_seed")
        faults = MeshFaults(OVERLAY, seed=seed, record=record).start()
        item.stash[_FAULTS] = faults
    elif record:
        faults.overlay.recording = True
    return faults


def _close(item: pytest.Item) -> None:
    faults = item.stash.get(_FAULTS, None)
    if faults is not None:
        del item.stash[_FAULTS]
        faults.close()


def _marker_rule(mark: pytest.Mark) -> FaultRule:
    if len(mark.args) != 1 or not isinstance(mark.args[0], str):
        raise TypeError(f"takes one positional argument, the host, not {mark.args!r}")
    unknown = sorted(set(mark.kwargs) - _MARKER_KEYWORDS)
    if unknown:
        known = ", ".join(sorted(_MARKER_KEYWORDS))
        raise TypeError(f"unknown keyword {', '.join(unknown)} (known: {known})")
    return FaultRule.of(mark.args[0], **mark.kwargs)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Validate the markers before any fixture runs: a bad one is a setup error.
    rules = []
    for mark in item.iter_markers("mesh_fault"):
        try:
            rules.append(_marker_rule(mark))
        except (TypeError, ConfigError) as exc:
            pytest.fail(f"@pytest.mark.mesh_fault on {item.nodeid}: {exc}", pytrace=False)
    if rules:
        item.stash[_MARKED] = rules


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    rules = item.stash.get(_MARKED, None)
    if not rules:
        return (yield)
    faults = _start(item, record=False)
    installed = [faults.add(rule) for rule in rules]
    try:
        return (yield)
    finally:
        for fault in installed:
            faults.remove(fault)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        _close(item)  # whatever the fixtures did, the next test starts clean


@pytest.fixture
def mesh_faults(request: pytest.FixtureRequest) -> Iterator[MeshFaults]:
    """Inject faults into mesh calls and see every call the mesh made during this test.

    ``mesh_faults.abort("ratings", http_status=503)``, ``mesh_faults.delay("reviews",
    seconds=0.2, percent=50)``, ...; ``mesh_faults.calls`` lists what happened. Every rule
    applies to every Mesh of the process, and all is undone when the test ends.
    """
    faults = _start(request.node, record=True)
    try:
        yield faults
    finally:
        _close(request.node)


# ---------------------------------------------------------------------- registry folders


class RegistryFolder:
    """A registry folder for one test; call it with YAML text to (re)write its files.

    ``folder("...yaml...")`` writes ``mesh.yaml``; ``folder({"reviews.yaml": "...",
    "routes/v1.yaml": "..."})`` writes those files, and a ``None`` text removes a file;
    files not named stay as they are. Texts are dedented, so triple-quoted strings may be
    indented with the code. Each file is replaced atomically (written aside, then
    renamed), so a watching Mesh never reads half a file. Returns the folder's path, for
    ``inmesh.Mesh(path)``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, files: str | Mapping[str, str | None] | None = None) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        if files is None:
            return self.path
        if isinstance(files, str):
            files = {"mesh.yaml": files}
        writes: list[tuple[Path, Path]] = []
        removals: list[Path] = []
        for name, text in files.items():
            target = self._target(name)
            if text is None:
                removals.append(target)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # A hidden name: the registry skips it while it is being written.
            aside = target.with_name(f".{target.name}.inmesh-tmp")
            aside.write_text(textwrap.dedent(text), encoding="utf-8")
            writes.append((aside, target))
        # All written first, then renamed together: a reload in between sees few mixtures.
        for aside, target in writes:
            os.replace(aside, target)
        for target in removals:
            target.unlink(missing_ok=True)
        return self.path

    def _target(self, name: str) -> Path:
        relative = PurePosixPath(name)
        if relative.is_absolute() or not relative.parts or ".." in relative.parts:
            raise ValueError(f"a registry file name is a relative path inside the folder: {name!r}")
        if any(part.startswith(".") for part in relative.parts):
            raise ValueError(f"the registry skips hidden files and folders: {name!r}")
        if relative.suffix not in _SUFFIXES:
            raise ValueError(f"the registry reads only {', '.join(_SUFFIXES)} files, not {name!r}")
        return self.path.joinpath(*relative.parts)

    def __repr__(self) -> str:
        return f"<RegistryFolder {self.path}>"


@pytest.fixture
def mesh_registry(tmp_path: Path) -> RegistryFolder:
    """Write a registry folder from YAML for this test: ``inmesh.Mesh(mesh_registry(yaml))``.

    Call it again to rewrite files; a Mesh watching the folder picks the change up.
    """
    return RegistryFolder(tmp_path / "mesh.d")
