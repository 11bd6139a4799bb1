"""``distill-gateway`` / ``python -m gateway``: serve the gateway (see :mod:`gateway.server`)."""

from __future__ import annotations

import ipaddress
import resource
import sys


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _raise_fd_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` descriptors if the hard limit allows (clients,
    upstream connections and files all need one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main() -> None:
    """Read ``GATEWAY_*`` settings and serve; bad settings are a one-line error, exit 2."""
    from pydantic import ValidationError

    from gateway.auth import KeysFileError
    from gateway.settings import Settings

    try:
        settings = Settings()
        from gateway.app import create_app

        app = create_app(settings)
    except (ValidationError, KeysFileError) as e:
        print(f"distill-gateway: bad settings: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not app.state.gateway.auth.enabled and not (
        settings.allow_anonymous or is_loopback(settings.host)
    ):
        print(
            f"distill-gateway: refusing to listen on {settings.host} without API keys: set "
            "GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE, or GATEWAY_ALLOW_ANONYMOUS=true",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from gateway.server import build_server, freeze_heap

    # each client connection may hold an upstream connection too, plus files and sockets
    _raise_fd_limit(2 * (settings.max_connections + 256))
    server = build_server(settings, app)
    freeze_heap()
    server.run()


if __name__ == "__main__":
    main()
