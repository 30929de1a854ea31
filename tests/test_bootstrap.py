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


def _record_installs(monkeypatch, tmp_path, fail_uv=False):
    import subprocess

    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    monkeypatch.setattr(bootstrap, "VENV", venv)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)
    monkeypatch.setattr(bootstrap, "venv_uv", lambda python: str(venv / "bin" / "uv"))
    monkeypatch.delenv("MLX_LORA_PYTHON", raising=False)
    ran = []

    def run(command, check=False, **kwargs):
        ran.append(command)
        if fail_uv and command[0].endswith("uv"):
            raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(bootstrap.subprocess, "run", run)
    monkeypatch.setattr(bootstrap.sys, "prefix", bootstrap.sys.base_prefix)  # not an activated env
    return venv, ran


def test_uv_is_fetched_into_the_venv_unless_torch_is_needed(monkeypatch, tmp_path):
    venv, ran = _record_installs(monkeypatch, tmp_path)
    bootstrap.ensure_environment([])
    assert ran == [[str(venv / "bin" / "uv"), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "-e", "."]]
    ran.clear()
    bootstrap.ensure_environment(["test"])  # torch: pip, which honours the machine's pip configuration
    assert ran[-1] == [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", ".[test]"]


def test_pip_takes_over_when_uv_fails(monkeypatch, tmp_path):
    venv, ran = _record_installs(monkeypatch, tmp_path, fail_uv=True)
    assert bootstrap.ensure_environment([]) == str(venv / "bin" / "python")
    assert ran[0][0].endswith("uv") and ran[-1][-2:] == ["-e", "."] and ran[-1][1:4] == ["-m", "pip", "install"]
    assert (venv / ".mlx-lora-installed").exists()


def test_no_uv_where_pip_uses_another_index(monkeypatch, tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert bootstrap.pip_index_configured(python)
    assert bootstrap.venv_uv(python) is None


def test_a_venv_set_up_for_the_tests_serves_the_scripts_without_reinstalling(monkeypatch, tmp_path):
    # tests/run.sh installs the test extras, train_by_mlx.sh asks for none: the second must not
    # reinstall (it did, and the next tests/run.sh reinstalled again, back and forth)
    venv, ran = _record_installs(monkeypatch, tmp_path)
    bootstrap.ensure_environment(["test"])
    assert ran and ran[-1][-1] == ".[test]"
    ran.clear()
    assert bootstrap.ensure_environment([]) == str(venv / "bin" / "python") and ran == []
    assert bootstrap.ensure_environment(["test"]) == str(venv / "bin" / "python") and ran == []
    bootstrap.ensure_environment(["mkl"])  # a new extra installs the union, so the tests' stay
    assert ran[-1][-1] == ".[mkl,test]"
    ran.clear()
    assert bootstrap.ensure_environment(["test"]) and ran == []


def test_a_changed_pyproject_reinstalls(monkeypatch, tmp_path):
    venv, ran = _record_installs(monkeypatch, tmp_path)
    bootstrap.ensure_environment([])
    (venv / ".mlx-lora-installed").write_text("0000000000000000 test\n")  # another pyproject.toml's
    ran.clear()
    bootstrap.ensure_environment([])
    assert ran and ran[-1][-1] == "."
