"""The env service, by its old name: the code is in ``agentenv.envs.service`` (by concern) and the
requests and replies in ``agentenv.envs.wire``."""

from agentenv.envs.service import (DesktopHost, ServiceLimits, UnknownDesktop, create_app, is_loopback, serve,
                                   write_secret)

__all__ = ["DesktopHost", "ServiceLimits", "UnknownDesktop", "create_app", "is_loopback", "serve", "write_secret"]
