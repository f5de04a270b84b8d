"""The pure parts of ``code`` on a sandboxed desktop (agentenv/envs/sandbox_code.py): the address that
opens a task's paths in VS Code, and whether the desktop has a network of its own."""

from __future__ import annotations

import json
import urllib.parse

from agentenv.envs.sandbox_code import PORT, private_network, url_for


def query(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def test_url_opens_a_folder_a_workspace_or_a_file_as_code_does():
    assert url_for([], "/home/user", {}) == f"http://127.0.0.1:{PORT}/"  # the last folder
    assert query(url_for(["proj/"], "/home/user", {"/home/user/proj": True})) == {"folder": "/home/user/proj"}
    assert query(url_for(["/home/user/project.code-workspace"], "/", {})) == \
        {"workspace": "/home/user/project.code-workspace"}
    q = query(url_for(["Desktop/test.py"], "/home/user", {}))
    assert q["ew"] == "true" and json.loads(q["payload"]) == \
        [["openFile", f"vscode-remote://127.0.0.1:{PORT}/home/user/Desktop/test.py"]]
    q = query(url_for(["/p", "/p/a.py"], "/", {"/p": True}))  # a folder and a file in it
    assert q["folder"] == "/p" and "ew" not in q and json.loads(q["payload"])[0][1].endswith("/p/a.py")


def test_only_a_loopback_only_network_is_private():
    head = "Inter-|   Receive\n face |bytes    packets\n"
    assert private_network(head + "    lo:       0       0\n")
    assert not private_network(head + "    lo:       0       0\n  eth0: 1 2\n")
