"""The env service: N real desktops behind an authenticated HTTP API (FastAPI + uvicorn).

    agentenv serve-envs --num 4 --host 127.0.0.1 --port 8100 [--token T]

Modules, by concern: ``api`` (our routes), ``osworld`` (OSWorld's in-VM routes, per desktop, with
``inside`` and ``recording``: what they run in the desktop), ``app`` (the ASGI app, its error
answers, ``serve``), ``host`` (``DesktopHost``: the desktops, their OSWorld ports, metrics),
``deps`` (the routes' dependencies: auth, host, limits, the desktop a path names), ``middleware``
(body limit, OSWorld ports) and ``limits`` (``ServiceLimits``). The requests and replies are in
``agentenv.envs.wire``, shared with the client.

Routes (all but /health need ``Authorization: Bearer <token>``):

    GET  /health                         liveness, desktop count
    GET  /metrics                        Prometheus metrics
    GET  /envs                           list desktops
    POST /envs                           create one          DELETE /envs/{id}   close one
    POST /envs/{id}/reset   {task, image_size?}      -> screenshot + info
    POST /envs/{id}/step    {action, image_size?}    -> screenshot + info (errors in info)
    GET  /envs/{id}/screenshot                       -> PNG
    POST /envs/{id}/evaluate {task, last_action?}    -> reward
    GET  /envs/{id}/alive

Per desktop, the OSWorld in-VM server paths used by OSWorld-style clients and task configs, under
``/envs/{id}`` (and at OSWorld's own paths on the desktop's OSWorld port): /screenshot, /execute,
/setup/execute, /setup/launch, /setup/open_file, /setup/activate_window, /setup/upload, /file,
/screen_size, /platform, /cursor_position, /list_directory, /desktop_path, /wallpaper,
/start_recording, /end_recording, /setup/close_window, /setup/change_wallpaper, and on sandboxed
desktops only /terminal (the terminal's text over AT-SPI), /accessibility (the AT-SPI tree as
OSWorld's XML, ``{"AT": xml}``; bounded, see sandbox.A11yLimits), /run_python and /run_bash_script
(plain desktops: 501 for the first two, 403 for the others). OSWorld routes not served answer 501
with the reason (``osworld.UNSUPPORTED``); unknown paths 404 with the list of those served.
"""

from agentenv.envs.service.app import create_app, is_loopback, serve, write_secret
from agentenv.envs.service.host import DesktopHost, UnknownDesktop
from agentenv.config import ServiceLimits

__all__ = ["DesktopHost", "ServiceLimits", "UnknownDesktop", "create_app", "is_loopback", "serve", "write_secret"]
