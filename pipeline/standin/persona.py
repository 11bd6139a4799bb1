"""The stand-in's "mind": classify a headline by keyword lexicon, think out loud like R1.

Everything here is deterministic: the same headline and the same variant seed give the same
reasoning and label. The lexicon lives beside this module (``lexicon.yaml``), not in the task
file, so the stand-in is an honest, imperfect teacher rather than an oracle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distill_common.yamlfile import load_yaml_model

DEFAULT_LEXICON = Path(__file__).with_name("lexicon.yaml")
CLOSE_CALL = 0.75  # runner-up score / top score at or above which a sampled answer may flip
FLIP_RATE = 0.25  # chance that a sampled close call picks the runner-up
# Plausible-looking labels a confused teacher might answer with; never in a sane label set.
OFF_LABELS = ("社会", "时政", "其他", "健康", "体育新闻", "无法判断")


class LexiconError(ValueError):
    """The lexicon file is missing or malformed; the message names the file and the problem."""


class Lexicon(BaseModel):
    """``labels: {<label>: [keyword, ...]}`` - the label set and the words that point to it."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, list[str]] = Field(min_length=2)

    @field_validator("labels")
    @classmethod
    def _clean(cls, labels: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for label, words in labels.items():
            label = str(label).strip()
            words = [str(w).strip() for w in words if str(w).strip()]
            if not label:
                raise ValueError("a label is empty")
            if not words:
                raise ValueError(f"label '{label}' has no keywords")
            out[label] = words
        return out


def load_lexicon(path: str | Path | None = None) -> Lexicon:
    """Read and validate a lexicon YAML; errors name the file (and the line for YAML errors)."""
    return load_yaml_model(
        path or DEFAULT_LEXICON,
        Lexicon,
        LexiconError,
        what="lexicon",
        expected="a mapping 'labels: {<label>: [keyword, ...]}'",
    )


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of the parts that is the same in every process (unlike ``hash``)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def headline_of(user_text: str) -> str:
    """The headline in a user message: the text after the first ``:``/``：``, else all of it."""
    cut = min((i for i in (user_text.find(":"), user_text.find("：")) if i >= 0), default=-1)
    head = user_text[cut + 1 :] if cut >= 0 else user_text
    return head.strip() or user_text.strip()


@dataclass(frozen=True)
class Thought:
    """One answer of the stand-in: the reasoning it wrote and the label it chose."""

    reasoning: str
    label: str
    confident: bool


@dataclass(frozen=True)
class _Reading:
    """How the lexicon scored a headline."""

    ranked: tuple[tuple[str, float, tuple[str, ...]], ...]  # (label, score, words), best first


def _q(words: tuple[str, ...]) -> str:
    return "、".join(f"“{w}”" for w in words)


# Short, R1-like thoughts: the decisive evidence first (the words matched, the label they point
# to), then the runner-up weighed and rejected, then the conclusion. The headline is not restated:
# the reader has it, and a student model learns the reasoning better when each line carries a
# decision rather than a copy of its input.
_EVIDENCE = (
    "嗯,标题里有{w},这些词指向{a}。",
    "嗯,关键词是{w},属于{a}的范畴。",
    "好的,最关键的线索是{w},明显是{a}。",
)
_RIVAL_SEEN = (
    "不过也提到了{w},有点像{b},但分量不如前面的词,排除。",
    "会不会是{b}?有{w},不过只是背景,重点还是{a}。",
)
_RIVAL_UNSEEN = (
    "{b}呢?标题里没有相关的词,排除。",
    "也想过{b},不过找不到支持它的线索。",
)
_CONCLUDE = (
    "所以答案是{a}。",
    "所以归为{a}。",
)
_UNSURE = (
    "嗯,标题里没有明确指向某个类别的关键词。",
    "嗯……这个标题不好判断,没有明显的关键词。",
)
_UNSURE_RIVAL = (
    "会不会是{b}?也没有依据。",
    "想过{b},但看不出关系。",
)
_UNSURE_CONCLUDE = (
    "我不太确定,暂且归为{a}吧。",
    "没什么把握,勉强归为{a}。",
)


class Persona:
    """Plays DeepSeek-R1 on a classification task, using a keyword lexicon."""

    def __init__(self, lexicon: Lexicon) -> None:
        self.labels: tuple[str, ...] = tuple(lexicon.labels)
        self.off_labels = tuple(x for x in OFF_LABELS if x not in lexicon.labels) or ("未知",)
        pairs = {(w, label) for label, words in lexicon.labels.items() for w in words}
        # longest first, so a long keyword claims its span before the words inside it
        self._keywords = sorted(pairs, key=lambda p: (-len(p[0]), p[0], p[1]))
        self._order = {label: i for i, label in enumerate(self.labels)}
        self.think = lru_cache(maxsize=65536)(self._think)

    def read(self, headline: str) -> _Reading:
        """Score every label by keyword hits; a keyword weighs its length."""
        spans: list[tuple[int, int]] = []
        hits: dict[str, list[tuple[int, str]]] = {}
        for word, label in self._keywords:
            at = headline.find(word)
            if at < 0:
                continue
            end = at + len(word)
            if any(s <= at and end <= e for s, e in spans):
                continue  # inside a longer keyword already matched
            spans.append((at, end))
            hits.setdefault(label, []).append((at, word))
        ranked = sorted(
            (
                (label, float(sum(len(w) for _, w in found)), tuple(w for _, w in sorted(found)))
                for label, found in hits.items()
            ),
            key=lambda r: (-r[1], self._order[r[0]]),
        )
        return _Reading(tuple(ranked))

    def _pick(self, options: tuple[str, ...], variant: object, headline: str, slot: str) -> str:
        return options[stable_hash("v", variant, headline, slot) % len(options)]

    def _rival(self, headline: str, top: str, variant: object) -> str:
        others = [x for x in self.labels if x != top]
        return others[stable_hash("rival", variant, headline) % len(others)]

    def _think(self, headline: str, variant: object = None, final: str | None = None) -> Thought:
        """Reason about ``headline``; ``variant`` (a sampling seed) varies phrasing and close
        calls, ``final`` forces the concluding label (used to inject off-label answers)."""
        reading = self.read(headline)
        sampled = variant is not None
        lines: list[str] = []
        if not reading.ranked:
            guess = self.labels[
                stable_hash("guess", variant if sampled else "", headline) % len(self.labels)
            ]
            label = final or guess
            rival = self._rival(headline, guess, variant)
            lines.append(self._pick(_UNSURE, variant, headline, "unsure"))
            lines.append(self._pick(_UNSURE_RIVAL, variant, headline, "rival").format(b=rival))
            lines.append(self._pick(_UNSURE_CONCLUDE, variant, headline, "end").format(a=label))
            return Thought("\n".join(lines), label, confident=False)
        top, score, words = reading.ranked[0]
        runner = reading.ranked[1] if len(reading.ranked) > 1 else None
        confident = runner is None or runner[1] < CLOSE_CALL * score
        if (
            runner
            and not confident
            and sampled
            and stable_hash("flip", variant, headline) % 100 < FLIP_RATE * 100
        ):
            (top, score, words), runner = runner, reading.ranked[0]
        label = final or top
        lines.append(
            self._pick(_EVIDENCE, variant, headline, "evidence").format(w=_q(words), a=top)
        )
        if runner:
            lines.append(
                self._pick(_RIVAL_SEEN, variant, headline, "rival").format(
                    w=_q(runner[2]), a=top, b=runner[0]
                )
            )
        else:
            rival = self._rival(headline, top, variant)
            lines.append(self._pick(_RIVAL_UNSEEN, variant, headline, "rival").format(b=rival))
        lines.append(self._pick(_CONCLUDE, variant, headline, "end").format(a=label))
        return Thought("\n".join(lines), label, confident=confident)

    def off_label(self, headline: str) -> str:
        """A label outside the set, chosen deterministically for this headline."""
        return self.off_labels[stable_hash("off", headline) % len(self.off_labels)]
