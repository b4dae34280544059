"""Accelerator hosts: the CPU-only malloc re-exec rule of main.py, and the TPU VM install script."""

import os
import re
import shlex
import shutil
import stat
import subprocess

import pytest

from normguard_jax import main

from conftest import REPO

SCRIPTS = [REPO / "experiments" / "tpu_vm.sh", REPO / "experiments" / "tpu_vm_install.sh"]


def _globber(existing):
    """A fake ``glob.glob`` over a set of existing paths (shell patterns, fnmatch rules)."""
    import fnmatch  # noqa: PLC0415
    return lambda pattern: [p for p in existing if fnmatch.fnmatch(p, pattern)]


@pytest.mark.parametrize("environ, devices, expected", [
    ({}, [], True),                                          # a plain CPU machine
    ({}, ["/dev/accel0", "/dev/accel1"], False),             # TPU v4 VM
    ({}, ["/dev/vfio/0", "/dev/vfio/vfio"], False),          # TPU v5e / v6e VM
    ({}, ["/dev/vfio/vfio"], True),                          # VFIO without a device group
    ({}, ["/dev/nvidia0", "/dev/nvidiactl"], False),         # a CUDA machine
    ({}, ["/dev/nvidiactl"], True),                          # the driver without a GPU
    ({"JAX_PLATFORMS": "cpu"}, ["/dev/accel0"], True),       # the user forces CPU
    ({"JAX_PLATFORMS": " CPU , tpu"}, ["/dev/accel0"], True),
    ({"JAX_PLATFORMS": "tpu,cpu"}, [], False),               # the first entry decides
    ({"JAX_PLATFORMS": "cuda"}, [], False),
    ({"JAX_PLATFORMS": ""}, ["/dev/accel0"], False),         # empty = unset
])
def test_malloc_reexec_happens_only_on_cpu(environ, devices, expected):
    assert main.runs_on_cpu(environ, _globber(devices)) is expected


def test_the_default_device_check_uses_the_real_file_system(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    import glob  # noqa: PLC0415
    present = any(glob.glob(p) for p in main.ACCELERATOR_DEVICE_GLOBS)
    assert main.runs_on_cpu() is (not present)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert main.runs_on_cpu() is False


# ---------------------------------------------------------------------------------------------
# experiments/tpu_vm.sh and tpu_vm_install.sh
# ---------------------------------------------------------------------------------------------


def _commands(path):
    """The script's lines without comments, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_tpu_scripts_parse_and_install_only_pinned_versions(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        subprocess.run([shellcheck, str(path)], check=True)
    installs = [c for c in _commands(path) if re.search(r"\bpip\b.*\binstall\b", c)]
    for command in installs:
        words = shlex.split(command.strip().rstrip("\\").replace("||", " "), comments=False)
        assert "-U" not in words and "--upgrade" not in words, command
        assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", command
    if path.name == "tpu_vm_install.sh":
        assert len(installs) == 1 and '".[tpu]"' in installs[0]
    else:   # tpu_vm.sh installs only through the install script
        assert installs == []
        assert "tpu_vm_install.sh" in path.read_text()


def _fake_bin(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _install_run(tmp_path, python_version_ok: bool):
    """Runs tpu_vm_install.sh in a fake checkout with fake pythons; returns the process."""
    checkout = tmp_path / "checkout"
    (checkout / "experiments").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "experiments" / "tpu_vm_install.sh", checkout / "experiments")
    for name in ("setup.py", "constraints.txt"):
        (checkout / name).touch()
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    # A venv python that records its pip calls and passes the version check.
    venv_python = ('echo "venv-python $*" >> "%s"\n' % log
                   + 'case "$1" in -c) exit 0;; esac\n')
    # The system pythons: "-c <version check>" answers python_version_ok; "-m venv D" makes D.
    system = ('echo "$(basename "$0") $*" >> "%s"\n' % log
              + 'if [ "$1" = -c ]; then exit %d; fi\n' % (0 if python_version_ok else 1)
              + 'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
              + "printf '%s' '#!/bin/bash\n" + venv_python.replace("'", "'\\''")
              + "' > \"$3/bin/python\"; chmod +x \"$3/bin/python\"; fi\n")
    for name in ("python3.13", "python3.12", "python3.11", "python3"):
        _fake_bin(fake, name, system)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "NORMGUARD_SKIP_TPU_CHECK": "1",
           "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(checkout / "experiments" / "tpu_vm_install.sh")],
                          env=env, capture_output=True, text=True, timeout=60)
    return proc, (log.read_text().splitlines() if log.exists() else []), checkout


def test_tpu_install_refuses_an_old_python_in_one_line(tmp_path):
    proc, calls, checkout = _install_run(tmp_path, python_version_ok=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: no Python >= 3.11 found")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (checkout / ".venv").exists()
    assert not any("pip" in c for c in calls)


def test_tpu_install_makes_one_venv_and_is_idempotent(tmp_path):
    proc, calls, checkout = _install_run(tmp_path, python_version_ok=True)
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if "-m venv" in c] == ["python3.13 -m venv .venv"]
    pip = [c for c in calls if "-m pip" in c]
    assert pip == ["venv-python -m pip install -q -c constraints.txt -e .[tpu]"]
    proc, calls, _ = _install_run(tmp_path, python_version_ok=True)   # a second run
    assert proc.returncode == 0, proc.stderr
    assert sum("-m venv" in c for c in calls) == 1        # the venv was not made again
    assert sum("-m pip" in c for c in calls) == 2         # pip ran again (only checks)
    # A venv of a too old Python is refused, naming it.
    (checkout / ".venv" / "bin" / "python").write_text(
        "#!/bin/bash\ncase \"$1\" in -c) exit 1;; -V) echo Python 3.10.12;; esac\n")
    proc, _, _ = _install_run(tmp_path, python_version_ok=True)
    assert proc.returncode == 1
    assert "has Python 3.10.12" in proc.stderr and "remove .venv" in proc.stderr
