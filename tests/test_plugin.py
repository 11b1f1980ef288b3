"""The pytest plugin (``mesh_faults``, ``mesh_fault``, ``mesh_registry``, ``--inmesh-seed``)
and the fault overlay under it.

The plugin is exercised the way a user meets it: pytester writes a test project whose
tests start real loopback upstreams and call them through a real Mesh over a
``mesh_registry`` folder, and runs pytest on it — in this process with only this plugin
loaded, or, where the installed plugins matter (the entry point, ``-p no:inmesh``), in a
subprocess. The overlay itself is tested directly on private instances; this suite's own
tests never touch the process-wide ``OVERLAY`` (the inner tests reset it as users' do).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from inmesh.exceptions import ConfigError
from inmesh.testing.faults import (
    OVERLAY,
    CallRecord,
    FaultOverlay,
    FaultRule,
    Injection,
    MeshFaults,
)
from inmesh.testing.plugin import RegistryFolder

pytest_plugins = ["pytester"]


def _entry_point_installed() -> bool:
    return any(ep.value == "inmesh.testing.plugin" for ep in entry_points(group="pytest11"))


INNER_CONFTEST = '''
"""Real upstreams for ratings, reviews and details, and a Mesh over a mesh_registry folder."""
import pytest

from inmesh import Mesh
from inmesh.testing.upstream import Upstream


def service_yaml(host, upstreams, labels=None):
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: ServiceEntry",
        f"metadata: {{name: {host}}}",
        "spec:",
        f"  hosts: [{host}]",
        "  ports: [{number: 9080, name: http, protocol: HTTP}]",
        "  resolution: STATIC",
        "  endpoints:",
    ]
    for i, upstream in enumerate(upstreams):
        label = (labels or [{"name": upstream.name}] * len(upstreams))[i]
        rendered = ", ".join(f"{k}: {v}" for k, v in label.items())
        lines.append(
            f"  - {{address: {upstream.address}, ports: {{http: {upstream.port}}}, "
            f"labels: {{{rendered}}}}}"
        )
    return "\\n".join(lines) + "\\n"


@pytest.fixture
def upstreams():
    started = {name: Upstream(name).start() for name in ("ratings", "reviews", "details")}
    yield started
    for upstream in started.values():
        upstream.stop()


@pytest.fixture
def mesh(mesh_registry, upstreams):
    files = {f"{name}.yaml": service_yaml(name, [u]) for name, u in upstreams.items()}
    with Mesh(mesh_registry(files), watch=False) as mesh:
        yield mesh


@pytest.fixture
def http(mesh):
    with mesh.client() as client:
        yield client
'''


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester project whose runs load this plugin and no other installed one.

    Inner runs happen in this process (fast), so a warning another plugin raises while
    configuring would meet this suite's warnings-as-errors; and naming the module with
    ``-p`` while its entry point also loads it would register it twice. Autoload off
    avoids both, before and after the entry point is installed.
    """
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return pytester


@pytest.fixture
def project(inner: pytest.Pytester) -> pytest.Pytester:
    """An inner project with the conftest above (upstreams, a mesh, an http client)."""
    inner.makeconftest(INNER_CONFTEST)
    return inner


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest with the plugin on an ``inner`` project, in this process."""
    return pytester.runpytest("-p", "inmesh.testing.plugin", "-p", "no:cacheprovider", *args)


def run_installed(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest as a user's project would, with whatever plugins are installed, in a
    process of its own (away from this suite's warning filters)."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


# --------------------------------------------------------------------------- the plugin


def test_abort_answers_locally_in_every_mesh_and_calls_are_recorded(
    project: pytest.Pytester,
) -> None:
    """An abort answers 503 "fault filter abort" without reaching the upstream, in every
    Mesh of the process, and ``calls`` records each call with its endpoint and status."""
    project.makepyfile(
        """
        from inmesh import Mesh

        def test_abort(mesh_faults, mesh, http, upstreams, mesh_registry):
            mesh_faults.abort("ratings", http_status=503)
            r = http.get("http://ratings:9080/ratings/1")
            assert (r.status_code, r.text.strip()) == (503, "fault filter abort")
            assert upstreams["ratings"].received == []
            assert http.get("http://reviews:9080/reviews/1").status_code == 200

            with Mesh(mesh_registry(), watch=False) as other, other.client() as client:
                assert client.get("http://RATINGS:9080/").status_code == 503

            reviews = upstreams["reviews"]
            calls = mesh_faults.calls
            assert [(c.host, c.path, c.status, c.injected, c.endpoint) for c in calls] == [
                ("ratings", "/ratings/1", 503, True, None),
                ("reviews", "/reviews/1", 200, False, f"{reviews.address}:{reviews.port}"),
                ("ratings", "/", 503, True, None),
            ]
            assert calls[1].attempts == 1 and calls[1].error is None
        """
    )
    run(project).assert_outcomes(passed=1)


def test_faults_never_leak_into_the_next_test(project: pytest.Pytester) -> None:
    """Whether a test passes, fails or errors in setup, and whether its faults came from
    the fixture or a marker, the next test starts with no rules, no calls, no recording."""
    project.makepyfile(
        """
        import pytest
        from inmesh.testing.faults import OVERLAY

        def clean(http):
            assert not OVERLAY.active and OVERLAY.faults == () and OVERLAY.calls == []
            assert not OVERLAY.recording
            assert http.get("http://ratings:9080/").status_code == 200

        def test_1_fixture_then_fails(mesh_faults, http):
            mesh_faults.abort("ratings", http_status=503)
            mesh_faults.delay("ratings", seconds=0.01)
            assert http.get("http://ratings:9080/").status_code == 503
            raise AssertionError("deliberate")

        def test_2_clean(http):
            clean(http)

        @pytest.mark.mesh_fault("ratings", http_status=503)
        def test_3_marker_then_fails(http):
            assert http.get("http://ratings:9080/").status_code == 503
            raise AssertionError("deliberate")

        def test_4_clean(http):
            clean(http)

        @pytest.fixture
        def broken(mesh_faults):
            mesh_faults.abort("ratings", http_status=500)
            raise RuntimeError("deliberate")

        def test_5_setup_error(broken):
            pass

        def test_6_clean(http):
            clean(http)

        def test_7_passes(mesh_faults, http):
            mesh_faults.abort("ratings", http_status=502)
            assert http.get("http://ratings:9080/").status_code == 502

        def test_8_clean(http):
            clean(http)
        """
    )
    result = run(project)
    result.assert_outcomes(passed=5, failed=2, errors=1)
    result.stdout.fnmatch_lines(["ERROR *::test_5_setup_error*"])


def test_marker_applies_for_the_marked_test_and_passes_strict_markers(
    project: pytest.Pytester,
) -> None:
    """``@pytest.mark.mesh_fault`` (several allowed, class markers included) is in force
    while the test runs, also visible to ``mesh_faults``; the marker is registered, so
    ``--strict-markers`` accepts it and ``--markers`` lists it."""
    project.makepyfile(
        """
        import pytest
        from inmesh.testing.faults import OVERLAY

        @pytest.mark.mesh_fault("details", http_status=500, first=1)
        @pytest.mark.mesh_fault("ratings", http_status=503, headers={"end-user": "jason"})
        def test_markers(http):
            jason = {"end-user": "jason"}
            assert http.get("http://ratings:9080/", headers=jason).status_code == 503
            assert http.get("http://ratings:9080/").status_code == 200
            assert [http.get("http://details:9080/").status_code for _ in range(2)] == [500, 200]

        @pytest.mark.mesh_fault("reviews", http_status=504)
        class TestClass:
            @pytest.mark.mesh_fault("ratings", http_status=429)
            def test_with_fixture(self, mesh_faults, http):
                assert [str(f.rule) for f in mesh_faults.rules] == [
                    "fault('ratings', http_status=429)",
                    "fault('reviews', http_status=504)",
                ]
                mesh_faults.abort("details", http_status=502)
                assert http.get("http://ratings:9080/").status_code == 429
                assert http.get("http://reviews:9080/").status_code == 504
                assert http.get("http://details:9080/").status_code == 502
                assert [c.status for c in mesh_faults.calls] == [429, 504, 502]

        def test_unmarked(http):
            assert not OVERLAY.active
            assert http.get("http://reviews:9080/").status_code == 200
        """
    )
    run(project, "--strict-markers").assert_outcomes(passed=3)
    markers = run(project, "--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.mesh_fault(host, *, http_status=None, *"])


def test_bad_marker_is_a_setup_error_that_names_the_problem(project: pytest.Pytester) -> None:
    """A marker with a bad value or an unknown keyword errors in setup, naming the test,
    the field and what is wrong; the test body never runs."""
    project.makepyfile(
        """
        import pytest

        @pytest.mark.mesh_fault("ratings", http_status=99)
        def test_bad_status():
            raise AssertionError("never runs")

        @pytest.mark.mesh_fault("ratings", http_stauts=503)
        def test_typo():
            raise AssertionError("never runs")

        @pytest.mark.mesh_fault(http_status=503)
        def test_no_host():
            raise AssertionError("never runs")
        """
    )
    result = run(project)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*mesh_fault on test_bad_marker*::test_bad_status: fault rule for 'ratings' "
            "http_status: must be an HTTP status from 200 to 599, not 99*",
            "*::test_typo: unknown keyword http_stauts (known: *",
            "*::test_no_host: takes one positional argument, the host*",
        ]
    )
    assert "never runs" not in result.stdout.str()


def test_first_filters_remove_and_clear(project: pytest.Pytester) -> None:
    """``first=N`` faults only the first N matching calls; method, path prefix and header
    filters narrow a rule; ``remove`` ends one fault and ``clear`` all of them (and the
    calls recorded so far)."""
    project.makepyfile(
        """
        def test_first(mesh_faults, http):
            fault = mesh_faults.abort("details", http_status=500, first=2)
            statuses = [http.get("http://details:9080/").status_code for _ in range(4)]
            assert statuses == [500, 500, 200, 200]
            assert (fault.hits, fault.remaining) == (2, 0)

        def test_filters(mesh_faults, http):
            mesh_faults.abort(
                "reviews", http_status=500, method="get", path_prefix="/reviews/1",
                headers={"End-User": "jason"},
            )
            jason = {"end-user": "jason"}
            assert http.get("http://reviews:9080/reviews/1?x=1", headers=jason).status_code == 500
            assert http.get("http://reviews:9080/reviews/12", headers=jason).status_code == 500
            assert http.get("http://reviews:9080/reviews/1").status_code == 200
            assert http.get("http://reviews:9080/reviews/2", headers=jason).status_code == 200
            assert http.post("http://reviews:9080/reviews/1", headers=jason).status_code == 200
            other = {"end-user": "json"}
            assert http.get("http://reviews:9080/reviews/1", headers=other).status_code == 200

        def test_remove_and_clear(mesh_faults, http):
            outage = mesh_faults.abort("ratings", http_status=503)
            mesh_faults.abort("details", http_status=503)
            assert http.get("http://ratings:9080/").status_code == 503
            mesh_faults.remove(outage)
            mesh_faults.remove(outage)  # a no-op
            assert http.get("http://ratings:9080/").status_code == 200
            assert http.get("http://details:9080/").status_code == 503
            assert len(mesh_faults.calls) == 3
            mesh_faults.clear()
            assert mesh_faults.rules == () and mesh_faults.calls == []
            assert http.get("http://details:9080/").status_code == 200
            assert [c.status for c in mesh_faults.calls] == [200]
        """
    )
    run(project).assert_outcomes(passed=3)


def test_subset_filter_sees_the_subset_routing_chose(project: pytest.Pytester) -> None:
    """``subset=`` faults only calls that routing sent to that DestinationRule subset, and
    the recorded calls carry the subset."""
    project.makepyfile(
        """
        from conftest import service_yaml
        from inmesh import Mesh
        from inmesh.testing.upstream import Upstream

        ROUTES = '''
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - match: [{headers: {end-user: {exact: jason}}}]
            route: [{destination: {host: reviews, subset: v2}}]
          - route: [{destination: {host: reviews, subset: v1}}]
        '''

        def test_subset(mesh_faults, mesh_registry):
            with Upstream("v1") as v1, Upstream("v2") as v2:
                labels = [{"version": "v1"}, {"version": "v2"}]
                path = mesh_registry(
                    {"reviews.yaml": service_yaml("reviews", [v1, v2], labels),
                     "routes.yaml": ROUTES}
                )
                mesh_faults.abort("reviews", http_status=503, subset="v2")
                with Mesh(path, watch=False) as mesh, mesh.client() as http:
                    url = "http://reviews:9080/reviews/0"
                    assert http.get(url, headers={"end-user": "jason"}).status_code == 503
                    assert http.get(url).status_code == 200
                assert v2.received == [] and len(v1.received) == 1
            assert [(c.subset, c.status) for c in mesh_faults.calls] == [("v2", 503), ("v1", 200)]
        """
    )
    run(project).assert_outcomes(passed=1)


def test_delays_hold_sync_and_async_calls(project: pytest.Pytester) -> None:
    """A delay holds the call for at least its seconds before it reaches the upstream, in
    the sync and the async client; a delayed call is recorded as injected."""
    project.makepyfile(
        """
        import asyncio
        import time

        def test_sync(mesh_faults, http, upstreams):
            mesh_faults.delay("ratings", seconds=0.2)
            started = time.monotonic()
            assert http.get("http://ratings:9080/").status_code == 200
            assert time.monotonic() - started >= 0.2
            assert len(upstreams["ratings"].received) == 1
            assert [(c.status, c.injected) for c in mesh_faults.calls] == [(200, True)]

        def test_async(mesh_faults, mesh):
            mesh_faults.delay("ratings", seconds=0.2)
            mesh_faults.abort("details", http_status=503, delay=0.1)

            async def main():
                async with mesh.async_client() as http:
                    started = time.monotonic()
                    ratings = await http.get("http://ratings:9080/")
                    middle = time.monotonic()
                    details = await http.get("http://details:9080/")
                    return ratings.status_code, details.status_code, middle - started, (
                        time.monotonic() - middle
                    )

            ratings, details, first, second = asyncio.run(main())
            assert (ratings, details) == (200, 503)
            assert first >= 0.2 and second >= 0.1
        """
    )
    run(project).assert_outcomes(passed=2)


def test_percent_draws_repeat_under_a_seed(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which calls a ``percent`` fault hits is the same run after run and test after test
    (every test starts from the seed); ``--inmesh-seed`` and ``mesh_faults.seed`` change
    it alike."""
    project.makepyfile(
        """
        import json, os, pathlib

        def statuses(mesh_faults, http):
            mesh_faults.abort("ratings", http_status=503, percent=50)
            return [http.get("http://ratings:9080/").status_code for _ in range(40)]

        def test_a(mesh_faults, http):
            result = statuses(mesh_faults, http)
            assert 5 < result.count(503) < 35
            pathlib.Path(os.environ["OUT"]).write_text(json.dumps(result))

        def test_b_same_in_the_next_test(mesh_faults, http):
            first = json.loads(pathlib.Path(os.environ["OUT"]).read_text())
            assert statuses(mesh_faults, http) == first

        def test_c_seed_method(mesh_faults, http):
            mesh_faults.seed(1)
            pathlib.Path(os.environ["OUT"] + ".seed1").write_text(
                json.dumps(statuses(mesh_faults, http))
            )
        """
    )
    out = project.path / "statuses.json"
    monkeypatch.setenv("OUT", str(out))
    seen = {}
    for name, args in {"default": (), "again": (), "zero": ("--inmesh-seed=0",),
                       "one": ("--inmesh-seed=1",)}.items():  # fmt: skip
        run(project, *args).assert_outcomes(passed=3)
        seen[name] = out.read_text()
        seen[f"{name} seed(1)"] = Path(f"{out}.seed1").read_text()
    assert seen["default"] == seen["again"] == seen["zero"]
    assert seen["one"] != seen["default"]
    assert seen["default seed(1)"] == seen["one"] == seen["one seed(1)"]


def test_mesh_registry_writes_a_folder_a_watching_mesh_reloads(project: pytest.Pytester) -> None:
    """``mesh_registry`` writes YAML text (one text or a mapping of files) to a folder
    under the test's tmp_path; calling it again rewrites files, and a Mesh watching the
    folder routes by the new configuration."""
    project.makepyfile(
        """
        import time
        from conftest import service_yaml
        from inmesh import Mesh
        from inmesh.testing.upstream import Upstream

        def wait_for(predicate, timeout=10.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not predicate():
                time.sleep(0.01)
            return predicate()

        def test_reload(mesh_registry, tmp_path):
            with Upstream("a") as a, Upstream("b") as b:
                path = mesh_registry(service_yaml("ratings", [a]))
                assert path.parent == tmp_path and sorted(p.name for p in path.iterdir()) == [
                    "mesh.yaml"
                ]
                with Mesh(path) as mesh, mesh.client() as http:
                    assert http.get("http://ratings:9080/").json()["name"] == "a"
                    assert mesh_registry(service_yaml("ratings", [b])) == path
                    assert wait_for(lambda: mesh.status.version == 2), mesh.status
                    assert http.get("http://ratings:9080/").json()["name"] == "b"

                    moved = {"mesh.yaml": None, "more/ratings.yml": service_yaml("ratings", [a])}
                    mesh_registry(moved)
                    assert wait_for(lambda: mesh.status.version == 3), mesh.status
                    assert mesh.status.ok
                    assert http.get("http://ratings:9080/").json()["name"] == "a"
                assert sorted(p.name for p in path.rglob("*")) == ["more", "ratings.yml"]
        """
    )
    run(project).assert_outcomes(passed=1)


def test_seed_option_is_documented_in_help(inner: pytest.Pytester) -> None:
    """``--inmesh-seed`` shows in ``pytest --help`` with its default."""
    result = run(inner, "--help")
    result.stdout.fnmatch_lines(["*--inmesh-seed=N*seed of the percent draws*"])
    assert re.search(r"default\s+0", result.stdout.str())


def test_no_inmesh_switches_the_plugin_off(pytester: pytest.Pytester) -> None:
    """With ``-p no:inmesh`` the fixtures and the option do not exist (before the entry
    point is installed this holds trivially; after, it is the switch users rely on)."""
    pytester.makepyfile("def test_x(mesh_faults):\n    pass\n")
    result = run_installed(pytester, "-p", "no:inmesh")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'mesh_faults' not found*"])
    result = run_installed(pytester, "-p", "no:inmesh", "--inmesh-seed=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


@pytest.mark.skipif(
    not _entry_point_installed(),
    reason="the pytest11 entry point 'inmesh' is not installed (pip install -e . after adding it)",
)
def test_entry_point_loads_the_plugin_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed, the plugin loads by itself, and naming it again with ``-p inmesh`` (as a
    run with PYTEST_DISABLE_PLUGIN_AUTOLOAD needs) does not register it twice."""
    pytester.makepyfile("def test_x(mesh_faults):\n    assert mesh_faults.calls == []\n")
    run_installed(pytester).assert_outcomes(passed=1)
    run_installed(pytester, "-p", "inmesh").assert_outcomes(passed=1)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    run_installed(pytester, "-p", "inmesh").assert_outcomes(passed=1)


def test_importing_the_plugin_stays_cheap() -> None:
    """``import inmesh.testing.plugin`` (done by every pytest run of a project that has
    inmesh installed) loads none of httpx, grpc, YAML, the watcher, OpenTelemetry, re2."""
    heavy = {"httpx", "httpcore", "grpc", "yaml", "watchfiles", "opentelemetry", "re2"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import inmesh.testing.plugin"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "inmesh.testing.plugin" in modules
    assert sorted(m for m in modules if m.split(".")[0] in heavy) == []


# --------------------------------------------------------------------------- RegistryFolder


def test_registry_folder_writes_dedented_files_and_refuses_names_it_would_lose(
    tmp_path: Path,
) -> None:
    """The folder writer dedents texts, creates subfolders, removes files named with None,
    and refuses names the file registry would skip or that leave the folder."""
    folder = RegistryFolder(tmp_path / "mesh.d")
    path = folder(
        """
        kind: A
        spec: {x: 1}
        """
    )
    assert (path / "mesh.yaml").read_text() == "\nkind: A\nspec: {x: 1}\n"
    folder({"sub/b.json": "{}", "mesh.yaml": None})
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == ["sub", "sub/b.json"]
    for bad in ("../x.yaml", "/abs.yaml", ".hidden.yaml", "sub/.x/a.yaml", "notes.txt", "a.yaml~"):
        with pytest.raises(ValueError, match="registry"):
            folder({bad: "x"})
    assert not list(path.glob(".*"))  # no temporary file left behind


# --------------------------------------------------------------------------- FaultRule


def test_rule_normalises_names_and_reports_every_problem() -> None:
    """Host, header names, method and gRPC status are normalised; bad values raise one
    ConfigError (a ValueError) that names each field."""
    rule = FaultRule.of(
        "Ratings", grpc_status="unavailable", method="post", headers={"End-User": "Jason"}
    )
    assert (rule.host, rule.grpc_status, rule.method, rule.headers) == (
        "ratings",
        "UNAVAILABLE",
        "POST",
        (("end-user", "Jason"),),
    )
    assert FaultRule("r", delay=1).delay == 1.0
    with pytest.raises(ConfigError) as caught:
        FaultRule(
            "ratings:9080",
            http_status=600,
            grpc_status="OK",
            percent=101,
            first=0,
            path_prefix="x",
            subset="",
        )
    assert isinstance(caught.value, ValueError)
    assert sorted(p.path for p in caught.value.problems) == [
        "first",
        "grpc_status",
        "host",
        "http_status",
        "path_prefix",
        "percent",
        "subset",
    ]
    with pytest.raises(ConfigError, match="needs http_status, grpc_status or delay"):
        FaultRule("ratings")
    with pytest.raises(ConfigError, match="delay: must be a number of seconds"):
        FaultRule("ratings", delay=-1)
    with pytest.raises(ConfigError, match="http_status: must be an HTTP status"):
        FaultRule("ratings", http_status=True)


def test_mesh_faults_abort_needs_a_status() -> None:
    """``abort()`` without a status is a mistake, not a silent no-op (``delay()`` delays)."""
    with pytest.raises(TypeError, match="http_status or grpc_status"):
        MeshFaults(FaultOverlay()).abort("ratings")


# --------------------------------------------------------------------------- FaultOverlay


def _no_headers(name: str) -> str | None:
    return None


def _call(
    overlay: FaultOverlay,
    host: str = "ratings",
    *,
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
    subset: str | None = None,
    grpc: bool = False,
) -> Injection | None:
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    return overlay.match(
        host=host, method=method, path=path, header=lowered.get, subset=subset, grpc=grpc
    )


def test_first_installed_matching_rule_wins() -> None:
    """Rules are tried in installation order; the first whose filters match decides, so a
    specific rule must come before a general one to be reached."""
    overlay = FaultOverlay()
    overlay.add(FaultRule.of("reviews", http_status=500, headers={"end-user": "jason"}))
    overlay.add(FaultRule("reviews", http_status=503))
    overlay.add(FaultRule("reviews", http_status=504, path_prefix="/never"))
    assert _call(overlay, "reviews", headers={"End-User": "jason"}) == Injection(None, 500, None)
    assert _call(overlay, "Reviews", path="/never") == Injection(None, 503, None)
    assert _call(overlay, "ratings") is None


def test_filters_method_path_headers_subset() -> None:
    """Each filter narrows the rule; all of them must hold; header names ignore case and
    values are exact."""
    overlay = FaultOverlay()
    overlay.add(
        FaultRule.of(
            "reviews",
            http_status=500,
            method="GET",
            path_prefix="/reviews/",
            headers={"End-User": "jason", "x-test": "1"},
            subset="v2",
        )
    )
    hit = {"method": "GET", "path": "/reviews/7", "subset": "v2"}
    headers = {"end-user": "jason", "X-Test": "1"}
    assert _call(overlay, "reviews", headers=headers, **hit) is not None  # type: ignore[arg-type]
    for change in (
        {"method": "POST"},
        {"path": "/reviews"},
        {"subset": "v1"},
        {"subset": None},
    ):
        assert _call(overlay, "reviews", headers=headers, **{**hit, **change}) is None  # type: ignore[arg-type]
    for other in ({"end-user": "Jason", "x-test": "1"}, {"end-user": "jason"}):
        assert _call(overlay, "reviews", headers=other, **hit) is None  # type: ignore[arg-type]


def test_aborts_answer_the_protocol_they_name() -> None:
    """``http_status`` aborts HTTP calls and ``grpc_status`` gRPC calls; a rule naming one
    protocol is skipped for the other, so two rules can fail both; a delay applies to both."""
    overlay = FaultOverlay()
    overlay.add(FaultRule("ratings", http_status=503))
    overlay.add(FaultRule("ratings", grpc_status="UNAVAILABLE"))
    assert _call(overlay) == Injection(None, 503, None)
    assert _call(overlay, grpc=True) == Injection(None, None, "UNAVAILABLE")

    both = FaultOverlay()
    both.add(FaultRule("ratings", http_status=500, grpc_status="INTERNAL", delay=0.5))
    assert _call(both) == Injection(0.5, 500, None)
    assert _call(both, grpc=True) == Injection(0.5, None, "INTERNAL")

    delay = FaultOverlay()
    delay.add(FaultRule("ratings", delay=0.1))
    assert _call(delay) == _call(delay, grpc=True) == Injection(0.1, None, None)


def test_first_counts_matching_calls_then_lets_later_rules_match() -> None:
    """A ``first=N`` rule decides the first N calls that pass its filters; after that it
    no longer matches and the next rule is asked."""
    overlay = FaultOverlay()
    first = overlay.add(FaultRule("details", http_status=500, first=2, method="GET"))
    overlay.add(FaultRule("details", http_status=503))
    assert _call(overlay, "details", method="POST") == Injection(None, 503, None)
    statuses = [_call(overlay, "details") for _ in range(3)]
    assert [s.abort_status if s else None for s in statuses] == [500, 500, 503]
    assert (first.hits, first.matched, first.remaining) == (2, 2, 0)


def test_percent_draws_are_reproducible_per_rule() -> None:
    """Which calls a percent rule hits depends only on the seed, the rule's number and the
    calls: the same again under the same seed, different under another; a call the draw
    spares goes through (later rules are not asked)."""

    def hits(seed: int) -> list[bool]:
        overlay = FaultOverlay(seed=seed)
        overlay.add(FaultRule("other", http_status=500))  # rule 0: takes a number, no draws
        overlay.add(FaultRule("ratings", http_status=503, percent=30))
        overlay.add(FaultRule("ratings", http_status=500))  # never reached
        results = [_call(overlay) for _ in range(200)]
        assert {r.abort_status for r in results if r is not None} == {503}
        return [r is not None for r in results]

    again = hits(0)
    assert hits(0) == again
    assert hits(1) != again
    assert 30 < sum(again) < 90  # 30 % of 200, loosely: the draw is seeded, not checked for luck

    zero, hundred = FaultOverlay(), FaultOverlay()
    zero.add(FaultRule("ratings", http_status=503, percent=0))
    hundred.add(FaultRule("ratings", http_status=503, percent=100))
    assert all(_call(zero) is None and _call(hundred) for _ in range(50))


def test_seed_renumbers_installed_rules() -> None:
    """``seed(n)`` restarts the draws of rules already installed as if they had been
    installed after it, so seeding before or after adding rules gives the same draws."""
    before, after = FaultOverlay(), FaultOverlay()
    before.seed(7)
    for overlay in (before, after):
        overlay.add(FaultRule("a", http_status=503, percent=50))
        overlay.add(FaultRule("b", http_status=503, percent=50))
    after.seed(7)
    for host in ("a", "b"):
        assert [_call(before, host) for _ in range(50)] == [_call(after, host) for _ in range(50)]
    assert [f.number for f in after.faults] == [0, 1]
    with pytest.raises(TypeError):
        after.seed("7")  # type: ignore[arg-type]


def test_first_is_exact_under_concurrent_callers() -> None:
    """Eight threads racing through a ``first=100`` rule get exactly 100 faults between
    them: the count is taken atomically."""
    overlay = FaultOverlay()
    fault = overlay.add(FaultRule("ratings", http_status=503, first=100))
    start = threading.Barrier(8)
    counts: list[int] = []

    def caller() -> None:
        start.wait(timeout=10)
        counts.append(sum(_call(overlay) is not None for _ in range(500)))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(counts) == 8 and sum(counts) == 100
    assert (fault.hits, fault.matched, fault.remaining) == (100, 100, 0)


def test_active_tracks_rules_and_recording() -> None:
    """``active`` (read unlocked by the transports) is true exactly while a rule is
    installed or recording is on; ``record`` keeps calls only while recording."""
    overlay = FaultOverlay()
    call = CallRecord("ratings", "GET", "/", None, None, 503, None, 0, True, None)
    assert not overlay.active
    fault = overlay.add(FaultRule("ratings", http_status=503))
    assert overlay.active
    overlay.record(call)
    assert overlay.calls == []
    overlay.remove(fault)
    overlay.remove(fault)
    assert not overlay.active and not fault.installed
    assert _call(overlay) is None
    overlay.recording = True
    assert overlay.active
    overlay.record(call)
    assert overlay.calls == [call]
    overlay.add(FaultRule("ratings", http_status=503))
    overlay.clear()
    assert overlay.active and overlay.faults == () and overlay.calls == [call]
    overlay.reset()
    assert not overlay.active and not overlay.recording and overlay.calls == []


def test_mesh_faults_undoes_everything_when_the_block_fails() -> None:
    """Used as a context manager, ``MeshFaults`` starts clean and seeded, records, and
    leaves the overlay reset even when the block raises."""
    overlay = FaultOverlay()
    overlay.add(FaultRule("stale", http_status=500))
    installed = []

    def failing_block() -> None:
        with MeshFaults(overlay, seed=3) as faults:
            assert faults.rules == () and overlay.recording
            installed.append(faults.abort("ratings", http_status=503, percent=50))
            assert installed[0].number == 0
            raise RuntimeError

    with pytest.raises(RuntimeError):
        failing_block()
    assert not overlay.active and overlay.faults == ()
    assert not installed[0].installed


def test_the_process_overlay_is_idle_outside_fault_tests() -> None:
    """This test uses neither the fixture nor a marker: the process-wide overlay costs the
    transports nothing (inactive, no rules)."""
    assert not OVERLAY.active and OVERLAY.faults == ()
