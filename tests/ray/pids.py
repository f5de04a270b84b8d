"""Processes remembered by (PID, start time), so a PID the kernel reuses later is not taken for ours."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

from agentenv.procs import alive


def ident(pid: int) -> tuple[int, str] | None:
    try:
        return pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def idents(pids) -> set[tuple[int, str]]:
    return {i for p in pids if (i := ident(p))}


def still_running(ids: set[tuple[int, str]]) -> list[int]:
    return [pid for pid, start in ids if alive(pid) and ident(pid) == (pid, start)]


def wait_gone(ids: set[tuple[int, str]], timeout_s: float = 30.0) -> list[int]:
    """The ones still running after ``timeout_s`` (empty: all gone)."""
    deadline = time.monotonic() + timeout_s
    while (left := still_running(ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def listening_addresses(pids) -> set[str]:
    """The addresses (no ports) the given processes listen on over TCP, from /proc/net and their fds."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                raw = bytes.fromhex(f[1].split(":")[0])
                # /proc/net stores each 32-bit word of the address in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                out.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # ::ffff:127.0.0.1 -> 127.0.0.1
    return out


def all_loopback(addresses) -> bool:
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
