"""The CLI's argument handling and output, without privileges."""

import json
import subprocess
import sys

import pytest

from hostmesh import __version__, cli


def hostmesh(*args):
    return subprocess.run([sys.executable, "-m", "hostmesh.cli", *args], capture_output=True, text=True, timeout=60)


def test_version_json(capsys):
    assert cli.main(["version", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"version": __version__}


def test_unknown_command_exits_2_and_names_it():
    r = hostmesh("frobnicate")
    assert r.returncode == 2
    assert "frobnicate" in r.stderr


def test_unknown_flag_exits_2():
    r = hostmesh("lab", "up", "--bogus")
    assert r.returncode == 2
    assert "--bogus" in r.stderr


def test_lab_exec_without_command_is_an_error(monkeypatch, capsys):
    if __import__("os").geteuid() != 0:
        pytest.skip("lab commands check for root first")
    assert cli.main(["lab", "exec", "--name", "nosuchlab", "node1/pod-1"]) == 1
    assert "needs a command" in capsys.readouterr().err


def test_invalid_lab_name_is_rejected(capsys):
    if __import__("os").geteuid() != 0:
        pytest.skip("lab commands check for root first")
    assert cli.main(["lab", "status", "--name", "Not-Valid"]) == 1
    assert "invalid lab name 'Not-Valid'" in capsys.readouterr().err


def test_table_alignment():
    from hostmesh.output import table
    out = table(["A", "LONGER"], [["xxxx", 1], ["y", None]])
    assert out.splitlines() == ["A     LONGER", "xxxx  1", "y"]


def test_agent_dump_bpf_prints_the_final_source():
    r = hostmesh("agent", "--dump-bpf", "--node", "node1")
    assert r.returncode == 0, r.stderr
    assert "bpf/connect4.c" in r.stdout and "SPDX-License-Identifier" in r.stdout
    assert "/sys/fs/bpf/hostmesh/node1" in r.stdout
