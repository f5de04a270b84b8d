"""FastAPI dependencies of the env service's routes: the host, the limits, the bearer token, and
the desktop a path names (``/envs/{did}/...``). The app (``service.app``) puts the first three in
``app.state``."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from agentenv.envs.service.host import DesktopHost
from agentenv.config import ServiceLimits
from agentenv.envs.desktop import Desktop as DesktopObject


def host_of(request: Request) -> DesktopHost:
    return request.app.state.host


def limits_of(request: Request) -> ServiceLimits:
    return request.app.state.limits


def authorized(request: Request) -> None:
    """The request carries ``Authorization: Bearer <token>`` (when the service has a token)."""
    token = request.app.state.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def desktop_of(did: str, request: Request) -> DesktopObject:
    """The desktop ``did`` (``UnknownDesktop``, answered 404, when this service has none)."""
    return host_of(request).get(did)


Host = Annotated[DesktopHost, Depends(host_of)]
Limits = Annotated[ServiceLimits, Depends(limits_of)]
Desktop = Annotated[DesktopObject, Depends(desktop_of)]
