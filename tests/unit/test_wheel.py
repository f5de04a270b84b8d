"""A wheel built from the repository works on its own: installed into a fresh folder and run from
elsewhere (no checkout on the path), `agentenv run` finds what it needs (the vLLM start script,
the tiny model's builder, the built-in tasks, the report's templates, the Ray integration), and an
ImportError is not swallowed by the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The distribution's name on the package index: "agentenv" there is an unrelated project. The import
# name stays agentenv.
DISTRIBUTION = "gui-agentenv"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        p = ROOT / f.decode()
        if p.is_file() or p.is_symlink():
            (src / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / f.decode(), follow_symlinks=False)
    dist = work / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob(DISTRIBUTION.replace("-", "_") + "-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert f"Name: {DISTRIBUTION}\n" in zipfile.ZipFile(wheel).read(meta).decode()
    for need in ("agentenv/start_vllm_service.sh", "agentenv/tiny_model.py", "agentenv/integrations/ray.py",
                 "agentenv/envs/tasks/builtin/suite.json", "agentenv/envs/tasks/builtin/assets/budget.ods"):
        assert need in names, f"{need} is not in the wheel"
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


def _run(target: Path, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)  # the installed copy only: no checkout on the path
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_the_installed_wheel_has_what_agentenv_run_needs(installed, tmp_path):
    r = _run(installed, ["-c", "import agentenv, agentenv.services as s, agentenv.integrations.ray\n"
                               "from agentenv.envs.tasks import builtin_tasks\n"
                               "from agentenv.view.report import HERE; assert (HERE / 'templates').is_dir()\n"
                               f"import importlib.metadata as m; assert m.distribution({DISTRIBUTION!r}).files\n"
                               "print(agentenv.__file__); print(s.START_VLLM); print(len(builtin_tasks()))"],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pkg, script, n = r.stdout.split()
    assert pkg.startswith(str(installed)) and script.startswith(str(installed)) and Path(script).is_file()
    assert int(n) >= 29
    r = _run(installed, ["-m", "agentenv", "run", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "--ray" in r.stdout, r.stderr
    r = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--foreground" in r.stdout
    # the tiny model builds from the installed package (what start_vllm_service.sh runs)
    r = _run(installed, ["-m", "agentenv.tiny_model", "--out", str(tmp_path / "tiny"), "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "tiny" / "agentenv_tiny.json").exists() and (tmp_path / "tiny" / "config.json").exists()


def test_the_cli_does_not_swallow_an_import_error(installed, tmp_path):
    broken = tmp_path / "site"
    shutil.copytree(installed / "agentenv", broken / "agentenv")
    (broken / "agentenv" / "run.py").write_text("import a_module_that_is_not_installed\n")
    r = _run(broken, ["-m", "agentenv", "run", "--help"], cwd=tmp_path)
    assert r.returncode != 0 and "a_module_that_is_not_installed" in r.stderr
