"""``GATEWAY_INJECT_SYSTEM_PROMPT``: give a model its task's system prompt when the client
sends none.

For students trained *with* the task prompt (``system_prompt: keep``): a bare client request
(one user message, as chat UIs send) would otherwise be served a prompt the student never saw
in training. A client's own ``system`` (or ``developer``) message always wins. Students trained
on bare requests (``drop``/``mix``) don't need it: leave it off (the default).
"""

from __future__ import annotations

from typing import Any

from distill_common.task import Task

OWN_PROMPT_ROLES = ("system", "developer")


def inject_system_prompt(body: dict[str, Any], task: Task) -> bool:
    """Put ``task.system_prompt`` first in ``body["messages"]`` unless the client sent a
    system or developer message; return whether it was added."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    if any(isinstance(m, dict) and m.get("role") in OWN_PROMPT_ROLES for m in messages):
        return False
    body["messages"] = [{"role": "system", "content": task.system_prompt}, *messages]
    return True
