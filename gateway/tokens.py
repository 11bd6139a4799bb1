"""Reasoning and answer token counts from the upstream's ``completion_tokens``.

vLLM reports only the total. With ``GATEWAY_TOKENIZER`` (the served model's ``tokenizer.json``)
the answer is counted exactly and the reasoning is the rest of the total; without it both are
estimated from the character share of the reasoning. Either way the count is made once, at the
end, from the whole texts, so a streamed and a whole response with the same output report the
same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

from pydantic import AfterValidator, BeforeValidator

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """``GATEWAY_TOKENIZER`` does not name a loadable tokenizer (a ValueError, so that a
    pydantic validator raising it reads as a settings error)."""


class TokenCounter(Protocol):
    """Splits a completion's token total into (reasoning, answer)."""

    exact: bool

    def split(self, completion_tokens: int, choices: Sequence[tuple[str, str]]) -> tuple[int, int]:
        """(reasoning tokens, answer tokens) for the (reasoning, answer) texts of each choice,
        summed over choices."""
        ...


class EstimatingCounter:
    """The character share of the reasoning in all the reasoning and answer text, applied to
    ``completion_tokens``; the answer gets the rest."""

    exact = False

    def split(self, completion_tokens: int, choices: Sequence[tuple[str, str]]) -> tuple[int, int]:
        reasoning_chars = total_chars = 0
        for reasoning, answer in choices:
            reasoning_chars += len(reasoning)
            total_chars += len(reasoning) + len(answer)
        if not total_chars:
            return 0, completion_tokens
        reasoning_tokens = round(completion_tokens * reasoning_chars / total_chars)
        return reasoning_tokens, completion_tokens - reasoning_tokens


class ExactCounter:
    """The answer encoded with the model's tokenizer (no special tokens); the reasoning is
    what is left of ``completion_tokens`` (never negative), think tags included."""

    exact = True

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def split(self, completion_tokens: int, choices: Sequence[tuple[str, str]]) -> tuple[int, int]:
        # encode, not encode_batch: no rayon thread pool in the server process (forks stay safe)
        encode = self.tokenizer.encode
        answer_tokens = sum(
            len(encode(answer, add_special_tokens=False).ids) for _, answer in choices if answer
        )
        return max(completion_tokens - answer_tokens, 0), answer_tokens


ESTIMATE = EstimatingCounter()


def tokenizer_file(path: Path) -> Path:
    """The ``tokenizer.json`` in directory ``path`` (or ``path`` itself if it is that file)."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(
            f"GATEWAY_TOKENIZER={path}: expected a directory holding {TOKENIZER_FILE} "
            "(the served model's directory or a copy of its tokenizer files)"
        )
    return file


@lru_cache(maxsize=4)  # settings validation loads it, then the app: parse the file once
def load_tokenizer(path: Path) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` in ``path``, or a :class:`TokenizerError` saying why not."""
    from tokenizers import Tokenizer  # only when configured: the gateway starts faster without

    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(
            f"GATEWAY_TOKENIZER={path}: {file} is not a Hugging Face tokenizer.json ({err})"
        ) from None


def load_counter(path: Path | None) -> TokenCounter:
    """An exact counter for the tokenizer in ``path``, or the estimate when there is none."""
    if path is None:
        return ESTIMATE
    return ExactCounter(load_tokenizer(path))


def _none_if_off(value: object) -> object:
    # `off` as well as empty: compose's ${GATEWAY_TOKENIZER:-/runs/merged} turns an empty value
    # into the default, so a compose user needs a non-empty word to ask for the estimate
    if isinstance(value, str) and value.strip().lower() in ("", "off"):
        return None
    return value


def _check(path: Path | None) -> Path | None:
    if path is not None:
        load_tokenizer(path)
    return path


TokenizerPath = Annotated[Path | None, BeforeValidator(_none_if_off), AfterValidator(_check)]
"""The settings type of ``GATEWAY_TOKENIZER``: empty or ``off`` means none (estimated counts);
a bad path fails at startup."""
