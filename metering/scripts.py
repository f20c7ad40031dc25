"""The Redis Lua scripts, each in its own ``.lua`` file (KEYS/ARGV contract at its top), with ``bignum.lua``'s exact
decimal-string arithmetic prepended, registered once per Redis client."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

_registered: dict[tuple[int, str, str], Any] = {}


@cache
def source(package: str, name: str) -> str:
    """The script ``<package>/lua/<name>.lua`` with the shared arithmetic in front of it."""
    arithmetic = files("metering").joinpath("lua/bignum.lua").read_text(encoding="utf-8")
    return arithmetic + "\n" + files(package).joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")


def script(redis: Any, package: str, name: str) -> Any:
    """The registered script (redis-py sends EVALSHA, and the source once when the server lacks it)."""
    key = (id(redis), package, name)
    registered = _registered.get(key)
    if registered is None:
        registered = _registered[key] = redis.register_script(source(package, name))
    return registered
