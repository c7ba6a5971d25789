"""The one Lua script loader: scripts ship as resource files and run by their SHA-1.

A :class:`Script` is read once from its package (``oncely/stores/lua/claim.lua``,
``oncely/locks/lua/acquire.lua``, ...). :func:`evalsha` / :func:`aevalsha` send ``EVALSHA``, and
if the server answers ``NOSCRIPT`` (a restart, ``SCRIPT FLUSH``, another node) send ``EVAL``
once, which also puts the script back into the server's cache: one round trip in the steady
state, as the ``limits`` library does. Both take any redis-py client (sync or asyncio); this
module imports redis-py only when a ``NOSCRIPT`` answer has to be recognised.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, Protocol

__all__ = [
    "Script",
    "aevalsha",
    "command",
    "evalsha",
    "is_noscript",
    "is_wrongtype",
    "script_source",
]

_INCLUDE = b"--#include "


def script_source(folder: Any, name: str) -> bytes:
    """The whole text of ``<folder>/<name>.lua`` (``folder``: a path or an importlib
    resource), each ``--#include other.lua`` line replaced by that file's text (functions
    several scripts share; a script sent to Redis must be whole)."""
    lines = (folder / f"{name}.lua").read_bytes().split(b"\n")
    return b"\n".join(
        (folder / line[len(_INCLUDE) :].strip().decode()).read_bytes().rstrip(b"\n")
        if line.startswith(_INCLUDE)
        else line
        for line in lines
    )


class Script:
    """A Lua script shipped as ``<package>/lua/<name>.lua``, called by its SHA-1."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, package: str, name: str) -> None:
        self.name = name
        self.source = script_source(resources.files(package) / "lua", name)
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r})"


class _SyncClient(Protocol):
    def execute_command(self, *args: Any) -> Any: ...


class _AsyncClient(Protocol):
    async def execute_command(self, *args: Any) -> Any: ...


def command(
    script: Script, numkeys: int, keys_and_args: Any, *, source: bool = False
) -> tuple[Any, ...]:
    """The ``EVALSHA`` command of ``script`` as arguments, for a caller that writes it itself
    (``EVAL`` with the script's source if ``source``: after a ``NOSCRIPT`` reply, see
    :func:`is_noscript`)."""
    if source:
        return ("EVAL", script.source, numkeys, *keys_and_args)
    return ("EVALSHA", script.sha, numkeys, *keys_and_args)


def is_noscript(exc: BaseException) -> bool:
    """True for the server's ``NOSCRIPT`` reply (the script is not in its cache)."""
    from redis.exceptions import NoScriptError

    return isinstance(exc, NoScriptError)


def is_wrongtype(exc: BaseException) -> bool:
    """True for the server's ``WRONGTYPE`` reply (a command on a key of another type: ``HGET``
    on a string), or an error raised from one."""
    from redis.exceptions import ResponseError

    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, ResponseError) and str(seen).startswith("WRONGTYPE"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def evalsha(client: _SyncClient, script: Script, numkeys: int, *keys_and_args: Any) -> Any:
    """Run ``script`` on ``client`` (a :class:`redis.Redis`): ``EVALSHA``, or ``EVAL`` once if
    the server does not know the script. Driver errors propagate unchanged."""
    try:
        return client.execute_command("EVALSHA", script.sha, numkeys, *keys_and_args)
    except Exception as exc:
        if not is_noscript(exc):
            raise
    return client.execute_command("EVAL", script.source, numkeys, *keys_and_args)


async def aevalsha(client: _AsyncClient, script: Script, numkeys: int, *keys_and_args: Any) -> Any:
    """The async face of :func:`evalsha`, for a :class:`redis.asyncio.Redis`."""
    try:
        return await client.execute_command("EVALSHA", script.sha, numkeys, *keys_and_args)
    except Exception as exc:
        if not is_noscript(exc):
            raise
    return await client.execute_command("EVAL", script.source, numkeys, *keys_and_args)
