"""The `inmesh` command: check, explain and demo, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inmesh.cli import main

GOOD = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}, locality: us-west/zone1}
---
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
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v2}, weight: 25}
"""


def test_check_accepts_a_valid_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid folder exits 0 and summarises what it holds."""
    (tmp_path / "reviews.yaml").write_text(GOOD)
    assert main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok (1 DestinationRule, 1 ServiceEntry, 1 VirtualService)" in out


def test_check_lists_every_problem_with_file_line_and_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem is printed as file:line path: message, and the exit code is 1."""
    broken = GOOD.replace("weight: 25", "weight: -25").replace(
        "name: v2, labels", "name: V_2, labels"
    )
    (tmp_path / "reviews.yaml").write_text(broken)
    (tmp_path / "other.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n"
    )
    assert main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}/reviews.yaml:33 spec.http[1].route[1].weight:" in out
    assert f"{tmp_path}/reviews.yaml:18 spec.subsets[1].name:" in out
    assert f"{tmp_path}/other.yaml:2 kind:" in out


def test_check_reports_yaml_syntax_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A YAML syntax error is reported with its file and line."""
    (tmp_path / "bad.yaml").write_text("kind: ServiceEntry\nspec:\n  hosts: [a\n  ports: 1\n")
    assert main(["check", str(tmp_path)]) == 1
    assert f"{tmp_path}/bad.yaml:" in capsys.readouterr().out


def test_explain_shows_rule_destinations_and_endpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain names the matching rule, why earlier ones failed, shares, cluster and endpoints."""
    path = tmp_path / "reviews.yaml"
    path.write_text(GOOD)
    assert (
        main(
            ["explain", str(path), "--url", "http://reviews:9080/reviews/0", "-H", "end-user: mike"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "spec.http[0] 'jason': skipped — match[0] headers.end-user does not match" in out
    assert "spec.http[1]: matches (no match conditions)" in out
    assert "75.0%  weight 75   reviews subset v1" in out
    assert "25.0%  weight 25   reviews subset v2" in out
    assert "LEAST_REQUEST" in out

    assert (
        main(["explain", str(path), "--url", "http://reviews:9080/", "-H", "end-user: jason"]) == 0
    )
    out = capsys.readouterr().out
    assert "spec.http[0] 'jason': matches (match[0])" in out
    assert "cluster: outbound|9080|v2|reviews" in out
    assert "10.0.0.2:9080" in out and "locality us-west/zone1" in out


def test_explain_unknown_host_and_no_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain says when a host passes through and when no rule matches (404)."""
    path = tmp_path / "reviews.yaml"
    path.write_text(GOOD.split("  - route:\n", maxsplit=1)[0])
    assert main(["explain", str(path), "--url", "http://elsewhere/"]) == 0
    assert "passed through" in capsys.readouterr().out
    assert main(["explain", str(path), "--url", "http://reviews:9080/"]) == 0
    assert "answered by the mesh: 404" in capsys.readouterr().out


def test_console_script_runs_the_demo() -> None:
    """`inmesh demo` starts local services and shows header routing, a split and a live edit."""
    out = subprocess.run(
        [sys.executable, "-m", "inmesh.cli", "demo", "--requests", "50"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "end-user: jason  →  reviews-v2" in out
    assert "reviews-v1:" in out and "reviews-v3:" in out
    assert "20 requests → {'reviews-v3': 20}" in out
    assert "rejected:" in out and "routes.yaml:18 spec.http[1].route[1].weight" in out
    assert "still serves: a request goes to reviews-v3" in out
