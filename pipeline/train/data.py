"""Training examples from our generate output or any LLaMA-Factory alpaca/sharegpt dataset.

Accepted ``--data``:

* a directory with ``dataset_info.json`` (LLaMA-Factory's registry): the entry named by
  ``dataset``, else the only entry, else the one whose file is ``train.json``;
* a directory without it: ``train.json`` (alpaca) or ``train.sharegpt.jsonl`` (messages);
* a file: ``.json`` (a list of rows) or ``.jsonl`` (one row per line), alpaca or messages.

Every example becomes a prompt (system + user messages) and the assistant's answer. Alpaca rows
join ``instruction`` and ``input`` with a newline, as LLaMA-Factory does. :func:`shape_prompts`
then keeps, drops or mixes the system messages (the training config's ``system_prompt``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """The dataset is missing, empty or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training example: the prompt messages and the assistant answer it should produce."""

    prompt: list[dict[str, str]]
    answer: str
    where: str  # "file:line", for error messages

    @property
    def has_system(self) -> bool:
        return any(m["role"] == "system" for m in self.prompt)

    def bare(self) -> Example:
        """This example as a client sends it without a system prompt: the user turn(s) only, so
        the chat template renders whatever it renders for such a request (its default line)."""
        return Example([m for m in self.prompt if m["role"] != "system"], self.answer, self.where)


@dataclass(frozen=True)
class Format:
    """How rows of one file map to messages (LLaMA-Factory's ``columns`` and ``tags``)."""

    formatting: str = "alpaca"  # or "sharegpt"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}


@dataclass(frozen=True)
class Dataset:
    """The resolved training file and its examples."""

    path: Path
    examples: list[Example]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line, row) for each row of a JSON list or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read dataset: {e.strerror}") from e
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    decoder = json.JSONDecoder()
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        raise DataError(f"{path}:{_line_of(text, i)}: expected a JSON list of rows ('[')")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise DataError(f"{path}:{_line_of(text, i)}: JSON list is not closed with ']'")
        if text[i] == "]":
            return
        try:
            row, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield _line_of(text, i), row
        i = end


def _text(row: dict, key: str | None, where: str, required: bool) -> str:
    value = row.get(key) if key else None
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _alpaca(row: dict, fmt: Format, where: str) -> Example:
    cols = {**ALPACA_COLUMNS, **fmt.columns}
    instruction = _text(row, cols["prompt"], where, required=True)
    query = _text(row, cols.get("query"), where, required=False)
    answer = _text(row, cols["response"], where, required=True)
    system = _text(row, cols.get("system"), where, required=False)
    user = "\n".join(p for p in (instruction, query) if p)
    if not user.strip():
        raise DataError(f"{where}: empty prompt ('{cols['prompt']}' and '{cols['query']}')")
    if not answer.strip():
        raise DataError(f"{where}: empty answer ('{cols['response']}')")
    prompt = [{"role": "system", "content": system}] if system else []
    return Example([*prompt, {"role": "user", "content": user}], answer, where)


def _sharegpt(row: dict, fmt: Format, where: str) -> Example:
    cols = {**SHAREGPT_COLUMNS, **fmt.columns}
    tags = {**SHAREGPT_TAGS, **fmt.tags}
    key = cols["messages"]
    if key not in row and "messages" in row:  # our own .jsonl without a registry
        key, tags = "messages", {**tags, "role_tag": "role", "content_tag": "content"}
        tags.update(user_tag="user", assistant_tag="assistant", system_tag="system")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant"}
    roles[tags["system_tag"]] = "system"
    messages = []
    system = _text(row, cols.get("system"), where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: message {n} must be an object")
        role = roles.get(turn.get(tags["role_tag"]))
        if role is None:
            raise DataError(
                f"{where}: message {n} has role {turn.get(tags['role_tag'])!r}; "
                f"expected one of {sorted(roles)}"
            )
        messages.append({"role": role, "content": _text(turn, tags["content_tag"], where, True)})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant answer")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise DataError(f"{where}: no user message before the answer")
    return Example(messages[:-1], messages[-1]["content"], where)


def read_file(path: Path, fmt: Format | None = None) -> list[Example]:
    """All examples of one file; the format is guessed from the first row when not given."""
    examples = []
    for line, row in _json_rows(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object per row, got {type(row).__name__}")
        if fmt is None:
            sharegpt = "messages" in row or "conversations" in row
            fmt = Format("sharegpt" if sharegpt else "alpaca")
        parse = _sharegpt if fmt.formatting == "sharegpt" else _alpaca
        examples.append(parse(row, fmt, where))
    if not examples:
        raise DataError(f"{path}: the dataset has no examples")
    return examples


def _from_registry(root: Path, name: str | None) -> tuple[Path, Format]:
    info_path = root / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{info_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(info, dict) or not info:
        raise DataError(f"{info_path}: expected a mapping of dataset names to entries")
    if name is None:
        named_train = [k for k, v in info.items() if v.get("file_name") == "train.json"]
        if len(info) == 1:
            name = next(iter(info))
        elif named_train:
            name = named_train[0]
        else:
            raise DataError(
                f"{info_path}: several datasets {sorted(info)}; choose one with --dataset"
            )
    if name not in info:
        raise DataError(f"{info_path}: no dataset named {name!r}; it has {sorted(info)}")
    entry = info[name]
    if "file_name" not in entry:
        raise DataError(f"{info_path}: dataset {name!r} has no 'file_name'")
    fmt = Format(entry.get("formatting", "alpaca"), entry.get("columns", {}), entry.get("tags", {}))
    return root / entry["file_name"], fmt


def load_dataset(data: str | Path, name: str | None = None) -> Dataset:
    """Resolve ``data`` (a directory or a file, see the module docstring) into examples."""
    data = Path(data)
    if data.is_dir():
        if (data / "dataset_info.json").exists():
            path, fmt = _from_registry(data, name)
        else:
            candidates = [data / "train.json", data / "train.sharegpt.jsonl"]
            path = next((p for p in candidates if p.exists()), None)
            if path is None:
                raise DataError(f"{data}: no dataset_info.json, train.json or train.sharegpt.jsonl")
            fmt = None
    elif data.exists():
        path, fmt = data, None
    else:
        raise DataError(f"{data}: no such file or directory")
    if not path.exists():
        raise DataError(f"{path}: dataset file not found")
    return Dataset(path, read_file(path, fmt))


def shape_prompts(examples: list[Example], mode: str, seed: int) -> list[Example]:
    """The examples in the prompt shape that is trained.

    ``keep``: as the data has them. ``drop``: without system messages. ``mix``: a seeded half of
    the examples that have a system message lose it (the same count of examples and steps as
    the other modes, so the three compare at equal compute; each headline is seen in one shape).
    """
    if mode == "keep":
        return list(examples)
    if mode == "drop":
        return [ex.bare() for ex in examples]
    if mode != "mix":
        raise ValueError(f"system_prompt must be keep, drop or mix, got {mode!r}")
    with_system = [i for i, ex in enumerate(examples) if ex.has_system]
    dropped = set(random.Random(seed).sample(with_system, len(with_system) // 2))
    return [ex.bare() if i in dropped else ex for i, ex in enumerate(examples)]
