"""OpenAI-compatible gateway in front of vLLM servers: think shown, hidden or inline.

Importing this package never imports torch (the gateway image has none).
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from gateway.app import create_app

        return create_app
    raise AttributeError(name)
