"""The command blocks of the README and docs/ run as written.

Every shell block (```bash, ```sh, ```shell, ```console) in README.md and docs/*.md carries a marker
on the line just before its fence:

    <!-- doc-test: run NAME (what the test changes, if anything) -->
    <!-- doc-test: skip (why it cannot run in the suite) -->

A ``run`` block is run by this file with bash from the repository's root, through the runner of
that NAME; a runner changes a block only through ``substitute``, which fails when the text it
replaces is not there, so a block that changes is never silently replaced by something else.
Every marked ``run`` has a runner and every runner a block.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import VLLM_PORT, wait_for

ROOT = Path(__file__).resolve().parents[2]
SHELL = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"^<!--\s*doc-test:\s*(run|skip)\b\s*([\w-]*)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")
# The services a block's own exports point at: never the caller's.
SERVICE_VARS = ("ENV_SERVER_URL", "ENV_TOKEN", "VLLM_SERVER_URL", "VLLM_MODEL_NAME")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str
    kind: str | None  # run | skip | None (no marker)
    name: str
    reason: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        mark = MARK.match(lines[start - 1]) if start > 0 else None
        out.append(Block(path, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                         mark.group(1) if mark else None, mark.group(2) if mark else "",
                         mark.group(3) if mark else ""))
        i = j + 1
    return out


def shell_blocks() -> list[Block]:
    return [b for p in doc_files() for b in blocks(p) if b.lang in SHELL]


def block(name: str) -> Block:
    found = [b for b in shell_blocks() if b.kind == "run" and b.name == name]
    assert len(found) == 1, f"{len(found)} blocks marked 'doc-test: run {name}'"
    return found[0]


def substitute(text: str, *pairs: tuple[str, str], count: dict[str, int] | None = None) -> str:
    """Replace each ``old`` (which must be there, ``count[old]`` times when given) by ``new``."""
    for old, new in pairs:
        n = text.count(old)
        assert n and (count is None or old not in count or n == count[old]), \
            f"{old!r} is {n} times in the block: the README changed, update its runner"
        text = text.replace(old, new)
    return text


def uses_this_python(text: str) -> str:
    """The blocks name the Python environment scripts/install.sh makes; the test runs with that
    environment's Python, wherever $AGENTENV_HOME put it."""
    return text.replace("PY=~/.cache/agentenv/venv/bin/python", f"PY={sys.executable}")


def block_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS and k != "PYTHONPATH"}
    return env


def run_bash(text: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The block under ``bash -e`` in a process group of its own; whatever it left running in the
    background is ended with the group (SIGTERM, then SIGKILL), by its id."""
    proc = subprocess.Popen(["bash", "-e", "-c", text], cwd=ROOT, env=env or block_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the block did not end in {timeout} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    finally:
        _end_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _end_group(pgid: int) -> None:
    if wait_for(lambda: not _group_alive(pgid), timeout=60):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if wait_for(lambda: not _group_alive(pgid), timeout=30):
            return


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- every block is run or marked

def test_every_shell_block_is_run_or_marked():
    found = shell_blocks()
    assert found, "no shell block found: the parser is broken"
    unmarked = [b.where() for b in found if b.kind is None]
    assert not unmarked, f"shell blocks without a doc-test marker: {unmarked}"
    no_reason = [b.where() for b in found if b.kind == "skip" and not b.reason.startswith("(")]
    assert not no_reason, f"skipped blocks must say why, in parentheses: {no_reason}"
    names = [b.name for b in found if b.kind == "run"]
    assert len(names) == len(set(names)), f"a runner name is used twice: {names}"
    assert set(names) == set(RUNNERS), f"blocks without a runner: {set(names) - set(RUNNERS)}; " \
                                       f"runners without a block: {set(RUNNERS) - set(names)}"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first = blocks(ROOT / "README.md")[0]
    assert first.name == "quickstart" and first.text.startswith("scripts/run.sh")
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", text):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w./-]+\.(?:md|png))\)", page.read_text()):
            assert (page.parent / link).is_file(), f"{page.name} links to {link}, which does not exist"


# ---------------------------------------------------------------- the runners

def run_quickstart():
    b = block("quickstart")
    # Each script with --help: the install it does first is the real one (idempotent), then
    # `agentenv run --help` / `pytest --help` instead of the main job / the suite that runs this.
    text = substitute(b.text, ("scripts/run.sh ", "scripts/run.sh --help "), ("scripts/test.sh ", "scripts/test.sh --help "),
                      count={"scripts/run.sh ": 1, "scripts/test.sh ": 1})
    out = ok(run_bash(text, timeout=600))
    assert "usage: agentenv run" in out and "--resume" in out  # run.sh reached agentenv run
    assert "pytest" in out and "--timeout" in out              # test.sh reached pytest with its plugins


def run_more_commands():
    out = ok(run_bash(uses_this_python(block("more-commands").text), timeout=300))
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"files"')))
    assert summary["tasks"] >= 7 and summary["runs"] >= 3 and summary["broken"] == 0, summary
    assert "usage: agentenv view" in out and "usage: agentenv replay" in out


def run_config_help():
    out = ok(run_bash(uses_this_python(block("config-help").text), timeout=300))
    assert "usage: agentenv run" in out and "usage: agentenv serve-envs" in out


def run_vllm_script_help():
    out = ok(run_bash(block("vllm-script-help").text, timeout=60))
    assert "--model" in out and "--stop" in out


def run_serve_envs_help():
    out = ok(run_bash(uses_this_python(block("serve-envs-help").text), timeout=300))
    assert "--token-file" in out and "--osworld-port" in out


def run_osworld_samples():
    out = ok(run_bash(uses_this_python(block("osworld-samples").text), timeout=300))
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith('{"files"')]
    assert len(summaries) == 2
    sandboxed, plain = summaries
    samples = len(list((ROOT / "tests" / "tasks" / "samples").rglob("*.json")))
    assert sandboxed["files"] == samples and sandboxed["broken"] == 0 and sandboxed["runs"] >= 3
    assert plain["tasks"] == sandboxed["tasks"] and plain["runs"] <= sandboxed["runs"]


CHEAP = {"quickstart": run_quickstart, "more-commands": run_more_commands, "config-help": run_config_help,
         "vllm-script-help": run_vllm_script_help, "serve-envs-help": run_serve_envs_help,
         "osworld-samples": run_osworld_samples}
RUNNERS = {*CHEAP, "first-way"}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_block_runs(name):
    CHEAP[name]()


@pytest.mark.slow
def test_the_first_way_to_use_it_runs_as_written(vllm_server, tmp_path):
    """The README's first way, against the session's vLLM server (the same tiny model the script
    starts) instead of a second one; its own ports, token file and output folder; a smaller run."""
    b = block("first-way")
    port, token_file, out = free_port(), tmp_path / "envtoken", tmp_path / "demo"
    lines = b.text.splitlines(keepends=True)
    starts = [ln for ln in lines if ln.startswith("scripts/start_vllm_service.sh")]
    assert len(starts) == 2, "the block starts and stops the model server: the test uses its own instead"
    text = "".join(ln for ln in lines if ln not in starts)
    text = substitute(uses_this_python(text),
                      ("127.0.0.1:8000", f"127.0.0.1:{VLLM_PORT}"),
                      ("--num 4", "--num 2"),
                      ("8100", str(port)),
                      ("~/.envtoken", str(token_file)),
                      ("tasks.limit=6", "tasks.limit=2 --set loop.max_steps=3 --set progress=false"),
                      ("output.dir=runs/demo", f"output.dir={out}"),
                      count={"8100": 3, "~/.envtoken": 2})
    r = run_bash(text, timeout=600)
    stdout = ok(r)
    assert f"export ENV_SERVER_URL=http://127.0.0.1:{port} ENV_TOKEN=$(cat {token_file})" in stdout  # serve-envs said it
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["trajectories"] == 4 and summary["groups"] == 2 and "error" not in summary, summary
    assert "401" not in r.stderr
    assert list(out.glob("**/*.parquet")), "no trajectory on disk"
    assert token_file.read_text() not in r.stdout + r.stderr  # the token itself is never printed


@pytest.mark.slow
def test_without_the_exports_a_taken_port_is_an_error_naming_it(vllm_server, tmp_path):
    """The first way as it used to fail: an env service already on env.local_port and no
    ENV_SERVER_URL/ENV_TOKEN. `agentenv run` must not attach to it (its readiness check would pass
    and every request would get 401): it stops, naming the port and what to set."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):  # answers /health as a 2-desktop env service would
        def do_GET(self):  # noqa: N802
            body = b'{"status": "ok", "desktops": 2}' if self.path == "/health" else b"{}"
            self.send_response(200 if self.path == "/health" else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        port = server.server_address[1]
        env = {**block_env(), "VLLM_SERVER_URL": vllm_server.url, "VLLM_MODEL_NAME": vllm_server.model}
        r = subprocess.run([sys.executable, "scripts/run_scheduler.py", "--set", "tasks.limit=1",
                            "--set", "env.local_desktops=2", "--set", f"env.local_port={port}",
                            "--set", f"output.dir={tmp_path / 'out'}", "--set", "progress=false"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"127.0.0.1:{port}" in r.stderr and "already taken" in r.stderr and "ENV_SERVER_URL" in r.stderr
    assert "401" not in r.stderr
