"""README's `deepspeed --hostfile` command for real: DeepSpeed's pdsh runner starts one rank per
"node" through ssh (two host names of this machine, `localhost` and `127.0.0.1`), trains,
checkpoints, and a second launch resumes.

The test runs its own sshd on a free port bound to 127.0.0.1 (own host key, own client key, own
config) and stops it at the end; an `ssh` wrapper first in PATH points DeepSpeed's ssh check and
pdsh at it. The ranks get DS_ACCELERATOR/TORCH_EXTENSIONS_DIR through a DeepSpeed env file
(`DS_ENV_FILE`, README "Multi-node"). Needs `sshd`, `ssh`, `ssh-keygen` and `pdsh` (Debian
openssh-server, openssh-client, pdsh; `.ci/run` installs them): skipped without them, except under
CI=true, where that is a failure.
"""

import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from tests.helpers.launch import (
    BIN,
    REPO,
    TINY,
    check,
    deepspeed_cmd,
    free_port,
    launch_env,
    run_cmd,
)

CONFIG = os.path.join(REPO, "configs", "synthetic_tiny.yaml")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TOOLS = {"sshd": SSHD, "ssh": "ssh", "ssh-keygen": "ssh-keygen", "pdsh": "pdsh"}
PDSH_PREFIX = re.compile(r"^(localhost|127\.0\.0\.1): ", re.M)
STEP = re.compile(r"^Step (\d+)/\d+ Epoch \d+ Loss (\S+)", re.M)


def _require_tools():
    missing = [name for name, tool in TOOLS.items() if not shutil.which(tool)]
    if not missing:
        return
    msg = f"multi-node test needs {', '.join(missing)} (apt-get install openssh-server pdsh)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _tail(path: str) -> str:
    with open(path) as f:
        return f.read()[-2000:]


def _wait_port(port: int, proc: subprocess.Popen, log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}: {_tail(log)}")


@pytest.fixture
def ssh_hosts(tmp_path):
    """Own sshd on 127.0.0.1:<free port>; yields a PATH directory whose `ssh` reaches it."""
    _require_tools()
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for key in ("host_key", "id_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    shutil.copy(d / "id_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
    )
    (d / "config").write_text(
        f"Host localhost 127.0.0.1\n  Port {port}\n  IdentityFile {d}/id_key\n"
        "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        "  BatchMode yes\n  LogLevel ERROR\n"
    )
    bindir = d / "bin"
    bindir.mkdir()
    wrapper = bindir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d}/config "$@"\n')
    wrapper.chmod(0o755)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    log = str(d / "sshd.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=out, stderr=out
        )
    try:
        _wait_port(port, proc, log)
        yield str(bindir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _deepspeed(hostfile, env, overrides):
    extra = ["--hostfile", str(hostfile), "--master_addr", "127.0.0.1"]
    out = check(run_cmd(deepspeed_cmd(CONFIG, overrides, extra), env=env))
    return PDSH_PREFIX.sub("", out)


def test_deepspeed_hostfile_over_ssh_trains_and_resumes(ssh_hosts, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    base = launch_env()
    ds_env = tmp_path / "deepspeed_env"  # what every rank gets (README "Multi-node")
    keep = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "PYTHONPATH")
    ds_env.write_text("".join(f"{k}={base[k]}\n" for k in keep if k in base))
    env = dict(base, DS_ENV_FILE=str(ds_env), PATH=f"{ssh_hosts}{os.pathsep}{BIN}{os.pathsep}")
    env["PATH"] += base.get("PATH", "")
    out = tmp_path / "run"
    common = [*TINY, f"output={out}", "data.num_classes=16", "data.num_image=256"]
    first = _deepspeed(hostfile, env, [*common, "schedule.max_steps=4", "checkpoint.every=2"])
    assert "world size 2" in first
    assert [int(s) for s, _ in STEP.findall(first)] == [1, 2, 3, 4]
    assert os.path.isfile(out / "checkpoints" / "step_4" / "meta.json")
    second = _deepspeed(hostfile, env, [*common, "schedule.max_steps=6", "checkpoint.resume=true"])
    assert "at step 4" in second
    assert [int(s) for s, _ in STEP.findall(second)] == [5, 6]
    assert os.path.isfile(out / "backbone.pt")
