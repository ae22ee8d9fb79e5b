"""Hosts and URLs from the configuration, checked when it loads (issue 19: a malformed value
is refused with a line that says why, not found out at the first connection)."""

import ipaddress
import re
from urllib.parse import urlsplit


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: one label of a host name (RFC 1123; ``_`` as well, which some internal names carry)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def host_problem(host: str) -> str | None:
    """What makes ``host`` unusable as a host to connect to or bind, or None: a name or an
    IP address, without a scheme, a port or a path (issue 19: a malformed value is refused
    when the configuration loads, not found out at the first connection)."""
    if not host:
        return "is empty"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if "://" in host:
        return "is a URL: give the host name alone (the port has its own key)"
    if ":" in host or "/" in host or "@" in host:
        return "must be a host name or IP address alone, without port, path or user"
    try:
        name = host.encode("idna").decode("ascii").removesuffix(".")
    except UnicodeError:
        return "is not a host name"
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return "is not a host name or IP address"
    return None


def url_problem(url: str, schemes: tuple[str, ...], *, path: bool = True) -> str | None:
    """What makes ``url`` unusable, or None: one of ``schemes``, a valid host and port, no
    spaces or control characters; without ``path``, no path, query or fragment either.
    Never repeats the URL itself: some carry a password."""
    expected = " or ".join(f"{scheme}://" for scheme in schemes)
    if url.lstrip().startswith("["):
        return f"is a list, not one {expected} URL"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "has spaces or control characters"
    parts = urlsplit(url)
    if parts.scheme.lower() not in schemes or not url[len(parts.scheme) :].startswith("://"):
        return f"must start with {expected}"
    try:
        port = parts.port
    except ValueError:
        return "has a port that is not a number from 1 to 65535"
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    if not parts.hostname:
        return "names no host"
    if (problem := host_problem(parts.hostname)) is not None:
        return f"host {problem}"
    if not path and (parts.path.strip("/") or parts.query or parts.fragment):
        return "must be scheme and host only (with a port if need be): no path or query"
    return None


def checked_url(value: str | None, schemes: tuple[str, ...], *, path: bool = True) -> str | None:
    if value is not None and (problem := url_problem(value, schemes, path=path)) is not None:
        raise ValueError(problem)
    return value


def checked_host(value: str) -> str:
    if (problem := host_problem(value)) is not None:
        raise ValueError(f"{value[:60]!r} {problem}")
    return value
