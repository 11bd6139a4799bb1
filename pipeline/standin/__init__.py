"""The offline stand-in teacher: an OpenAI-compatible server that plays DeepSeek-R1.

``persona`` writes the reasoning and picks the label from ``lexicon.yaml``, ``faults`` draws
injected failures, ``server`` is the ASGI app, ``command`` the ``distill teacher-standin`` CLI.
"""
