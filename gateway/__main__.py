"""``distill-gateway`` / ``python -m gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import sys


def main() -> None:
    """Read ``GATEWAY_*`` settings and serve (uvloop + httptools, no uvicorn access log)."""
    import uvicorn
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
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=settings.log_level,
        server_header=False,
        date_header=False,
        backlog=4096,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
