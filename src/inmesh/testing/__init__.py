"""Test helpers that ship with inmesh: real loopback upstreams (and, later, the pytest plugin)."""
