"""`agentenv run` as a new user meets it (issue 16, sections 5 and 6): a typo fails before anything
starts and consumes no task; whatever ends the run while it starts, the processes it started end
too; and the env service's token never reaches the unprivileged desktop user.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ENV_PORT, ROOT, VLLM_PORT
from tests.faults.test_fault_suite import assert_gone, record

from agentenv.config import AGENTENV_HOME
from agentenv.envs.service import write_secret
from agentenv.envs.desktop_types import DESKTOP_USER
from agentenv.procs import descendants

pytestmark = pytest.mark.slow
PORT = ENV_PORT + 20  # this module's own services
LOCAL_VLLM_PORT = VLLM_PORT + 20
RUN = [sys.executable, "-m", "agentenv", "run", "--set", "progress=false"]


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(RUN + args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **kw.pop("env", {})},
                          capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def test_a_bad_task_source_is_reported_before_any_service_starts(tmp_path):
    log = AGENTENV_HOME / "run" / f"vllm-{LOCAL_VLLM_PORT}.log"
    log.unlink(missing_ok=True)
    broken = tmp_path / "broken.json"
    broken.write_text('{"id": "x", "instruction": ')
    cases = {
        "does not exist": ["--set", f"tasks.source={tmp_path / 'nope.json'}"],
        "every task of": ["--set", f"tasks.source={broken}"],
        "does not have": ["--set", "tasks.ids=[no-such-task]"],
    }
    for message, args in cases.items():  # no llm.url: a good source would start vLLM here
        r = _run(args + ["--set", f"llm.port={LOCAL_VLLM_PORT}"], tmp_path)
        assert r.returncode == 2 and message in r.stderr, (message, r.stderr[-2000:])
    assert not log.exists(), "the model server was started for a run that could not run"
    assert not (tmp_path / "runs").exists()


def test_a_dead_or_wrong_model_server_fails_fast_and_consumes_no_task(vllm_server, tmp_path):
    r = _run(["--set", f"env.local_port={PORT}"], tmp_path,
             env={"VLLM_SERVER_URL": "http://127.0.0.1:9/v1"})  # a typo: nothing listens there
    assert r.returncode == 2 and "no model server answers at http://127.0.0.1:9/v1" in r.stderr, r.stderr[-2000:]
    assert "env pool" not in r.stderr and not (tmp_path / "runs").exists()  # no desktop, no run dir
    r = _run(["--set", f"llm.url={vllm_server.url}", "--set", "llm.model=tiny-uitras"], tmp_path)
    assert r.returncode == 2 and "does not serve 'tiny-uitras'" in r.stderr, r.stderr[-2000:]


def _start_and_wait_for_vllm(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`agentenv run` starting the tiny model itself; returns once the vLLM server process exists."""
    p = subprocess.Popen(RUN + ["--set", f"llm.port={LOCAL_VLLM_PORT}", "--set", f"env.local_port={PORT}"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    tree: list[int] = []
    while time.monotonic() < deadline and p.poll() is None:
        tree = descendants(p.pid)
        cmdlines = [Path(f"/proc/{c}/cmdline").read_bytes() for c in tree if Path(f"/proc/{c}").exists()]
        if any(b"vllm.entrypoints" in c for c in cmdlines) and len(tree) >= 2:
            return p, tree
        time.sleep(0.2)
    p.kill()
    raise AssertionError(f"vLLM did not start under agentenv run: {p.stderr.read()[-2000:] if p.stderr else ''}")


def test_sigterm_or_sigkill_while_starting_leaves_no_process_behind(tmp_path):
    p, _ = _start_and_wait_for_vllm(tmp_path)
    time.sleep(3)  # let the server start its engine process too
    tree = descendants(p.pid)
    p.send_signal(signal.SIGTERM)
    record(faults=1)
    _, err = p.communicate(timeout=90)
    assert p.returncode == 130 and "SIGTERM while starting" in err.decode(), err[-2000:]
    assert_gone(tree)

    p, _ = _start_and_wait_for_vllm(tmp_path)
    time.sleep(3)
    tree = descendants(p.pid)
    p.kill()  # nothing runs in agentenv run after this: only the kernel can end its children
    record(faults=1)
    p.communicate(timeout=30)
    assert_gone(tree, timeout=60)


def _readable_by_desktop_user(paths: list[Path]) -> bytes:
    """Everything the desktop user can read under ``paths`` (files up to 20 MB) and in every
    process's environment and command line, concatenated."""
    script = r'''
for root in "$@"; do
  find "$root" -xdev -type f -readable -size -20M -print0 2>/dev/null | xargs -0 -r cat 2>/dev/null
done
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do cat "$f" 2>/dev/null; done
exit 0
'''
    user = pwd.getpwnam(DESKTOP_USER)
    r = subprocess.run(["bash", "-c", script, "search", *map(str, paths)], capture_output=True, timeout=300,
                       user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/")
    return r.stdout


def test_the_desktop_user_cannot_obtain_the_token(vllm_server):
    """`agentenv run` starts its env service (which generates a token) with the run folder under a
    path everyone can read. Mid-run, the desktop user reads every file it can in the run folder,
    the desktops' scratch space, /tmp and the services' folder, and every process's environment
    and command line: the token is in none of them. A canary string planted the same way is found,
    so the search does look."""
    try:
        pwd.getpwnam(DESKTOP_USER)
    except KeyError:
        pytest.skip(f"no {DESKTOP_USER} user (scripts/install.sh creates it)")
    base = Path(tempfile.mkdtemp(prefix="agentenv-secret-"))
    base.chmod(0o755)
    out = base / "run"
    cmd = RUN + ["--set", f"llm.url={vllm_server.url}", "--set", f"llm.model={vllm_server.model}",
                 "--set", "tasks.ids=[editor-type-hello, terminal-mkdir]", "--set", "loop.max_steps=8", "--set", "env.local_desktops=1",
                 "--set", f"env.local_port={PORT + 1}", "--set", f"output.dir={out}"]
    p = subprocess.Popen(cmd, cwd=base, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "parts").glob("*.parquet")) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read()[-2000:]
        service = next(c for c in descendants(p.pid) if b"serve-envs" in Path(f"/proc/{c}/cmdline").read_bytes())
        environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{service}/environ").read_bytes().split(b"\0") if kv)
        token = environ[b"ENV_TOKEN"]
        assert len(token) >= 16
        (out / "canary.txt").write_text("canary-" + "q" * 20)
        (out / "canary.txt").chmod(0o644)
        seen = _readable_by_desktop_user([base, Path("/tmp"), Path("/dev/shm"), AGENTENV_HOME / "run"])
        assert b"canary-" + b"q" * 20 in seen, "the search found nothing: it proves nothing"
        assert token not in seen, "the desktop user can read the env service's token"
        log = out / "env-service.log"
        assert log.stat().st_mode & 0o077 == 0 and token not in log.read_bytes()
    finally:
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    assert token not in stdout and token not in stderr


def test_a_token_file_replaces_what_someone_planted_there(tmp_path):
    """``serve-envs --token-file /tmp/x``: a file (or symlink) another user planted at that path is
    replaced by a new file only we can read, never written through."""
    user = pwd.getpwnam(DESKTOP_USER)
    shared = Path(tempfile.mkdtemp(prefix="agentenv-tok-"))
    shared.chmod(0o1777)
    try:
        planted = shared / "envtoken"
        decoy = shared / "decoy"
        for f in (planted, decoy):
            f.write_text("planted")
            os.chown(f, user.pw_uid, user.pw_gid)
            f.chmod(0o666)
        write_secret(planted, "s3cret")
        st = planted.stat()
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600 and planted.read_text() == "s3cret"
        link = shared / "linked"
        link.symlink_to(decoy)
        write_secret(link, "s3cret")
        assert not link.is_symlink() and decoy.read_text() == "planted"
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)
