"""The set-up's install commands: uv when it is on PATH, pip otherwise; the venv made only once."""

import sys
from pathlib import Path

from mlx_lora import bootstrap


def test_uv_is_used_when_present(tmp_path):
    python = tmp_path / "missing" / "bin" / "python"
    commands = bootstrap.install_commands(python, ".[test]", "/usr/bin/uv")
    assert commands[0][:2] == ["/usr/bin/uv", "venv"]
    assert commands[1][:3] == ["/usr/bin/uv", "pip", "install"] and commands[1][-2:] == ["-e", ".[test]"]
    assert str(python) in commands[1]


def test_pip_otherwise_and_no_new_venv_when_one_exists(tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    commands = bootstrap.install_commands(python, ".", None)
    assert all("venv" not in c for c in commands)  # the environment exists already
    assert commands[-1] == [str(python), "-m", "pip", "install", "--quiet", "-e", "."]
    fresh = bootstrap.install_commands(Path(tmp_path / "none" / "python"), ".", None)
    assert fresh[0] == [sys.executable, "-m", "venv", str(bootstrap.VENV)]
