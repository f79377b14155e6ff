"""Problem / reference-solution / answer records from JSONL or Parquet, with a field mapping from the config.

Any dataset with a problem, a worked reference solution and a final answer works; `field_map` names the source
column of each (dotted paths reach into nested records, integer parts index lists: `reward_model.ground_truth`,
`prompt.0.content`). When the answer has no column of its own (MATH train), it is read from the last `\\boxed{}`
of the solution. See `megatron_trace/data/README.md` for the field maps of common public datasets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from megatron_trace.config_base import ConfigError
from megatron_trace.rewards.extract import last_boxed

FIELDS = ("problem", "solution", "answer")


class DatasetError(ValueError):
    """A dataset file or record is unusable; the message names the file, the line/row and the field."""


@dataclass
class Problem:
    """One training/evaluation item: the problem text, a worked reference solution, the gold final answer."""

    id: str
    problem: str
    solution: str
    answer: str
    # where it was read from ("<file>: line N" / "<file>: row N"), for error messages; not part of its identity
    source: str = field(default="", compare=False, repr=False)


@dataclass
class DataConfig:
    """Where the problems come from and how their columns map to Problem fields."""

    path: str = ""  # a .jsonl / .json(l) file or a .parquet file (local)
    format: Literal["auto", "jsonl", "parquet"] = "auto"  # auto: by file extension
    # Problem field -> source column (dotted path for nested records). Unmapped fields use their own name.
    field_map: dict[str, str] = field(default_factory=dict)
    id_field: str | None = None  # column holding a stable id; None = "<file stem>-<row>"
    answer_from_solution: bool = True  # no answer column: take the last \boxed{} of the solution
    require_solution: bool = True  # TRACE's teacher needs the reference solution; False allows GRPO-only data
    where: dict[str, str] = field(default_factory=dict)  # keep records whose column (dotted) equals the value
    limit: int | None = None  # keep the first N problems (after `where`)
    # A record whose problem (or solution) text is longer than this is refused at load, naming file:line and id:
    # a coarse bound on what is held and tokenized. Whether a prompt fits the model is counted in tokens, with the
    # run's tokenizer (check_prompt_tokens; a 1.4M-token problem once crashed a run only when it was drawn).
    max_text_chars: int = 200_000

    def __post_init__(self) -> None:
        if self.max_text_chars < 1:
            raise ConfigError(f"max_text_chars: must be >= 1, got {self.max_text_chars}")
        unknown = sorted(set(self.field_map) - set(FIELDS))
        if unknown:
            raise ConfigError(f"field_map: unknown field(s) {unknown}; valid fields: {list(FIELDS)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1, got {self.limit}")

    def column(self, name: str) -> str:
        return self.field_map.get(name, name)


def _lookup(record: Any, path: str) -> Any:
    """record[path] with dotted path parts; integers index lists. Missing -> KeyError."""
    node = record
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(part)
    return node


def _where_value(record: Any, path: str) -> str | None:
    try:
        return _text(_lookup(record, path))
    except KeyError:
        return None


def _records(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; location is 'line N' (JSONL, 1-based) or 'row N' (Parquet, 0-based)."""
    if fmt == "jsonl":
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"{path}: line {n}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                       f"{e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise DatasetError(f"{path}: line {n}: not valid JSON ({getattr(e, 'msg', e)})") from None
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for n, record in enumerate(table.to_pylist()):
            yield f"row {n}", record


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Read every record of `cfg.path` into a Problem.

    Raises DatasetError naming the file, the line (JSONL) or row (Parquet), and the missing or empty field with
    the column it was mapped from; a file that does not exist or has no records is an error too.
    """
    if not cfg.path:
        raise ConfigError("data.path: no dataset file given")
    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    fmt = cfg.format
    if fmt == "auto":
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            fmt = "jsonl"
        elif suffix in (".parquet", ".pq"):
            fmt = "parquet"
        else:
            raise DatasetError(f"{path}: cannot tell the format from the extension {suffix!r}; set data.format")
    problems: list[Problem] = []
    for loc, record in _records(path, fmt):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: {loc}: expected a JSON object, got {type(record).__name__}")
        if any(_where_value(record, col) != want for col, want in cfg.where.items()):
            continue
        values: dict[str, str] = {}
        for name in FIELDS:
            col = cfg.column(name)
            try:
                value = _lookup(record, col)
            except KeyError:
                value = None
            if value is None or (isinstance(value, str) and not value.strip()):
                if name == "answer" and cfg.answer_from_solution and values.get("solution"):
                    boxed = last_boxed(values["solution"])
                    if boxed:
                        values[name] = boxed
                        continue
                if name == "solution" and not cfg.require_solution:
                    values[name] = ""
                    continue
                mapped = f" (mapped from column {col!r})" if col != name else ""
                state = "has no field" if value is None else "has an empty field"
                raise DatasetError(
                    f"{path}: {loc}: record {state} {name!r}{mapped}; fields present: {sorted(record)}"
                )
            values[name] = _text(value)
        if cfg.id_field:
            try:
                pid = _text(_lookup(record, cfg.id_field))
            except KeyError:
                raise DatasetError(f"{path}: {loc}: record has no id field {cfg.id_field!r}") from None
        else:
            pid = f"{path.stem}-{len(problems)}"
        for name, text in values.items():
            if len(text) > cfg.max_text_chars:
                raise DatasetError(f"{path}: {loc}: problem {pid!r}: field {name!r} has {len(text)} characters, "
                                   f"more than data.max_text_chars={cfg.max_text_chars}")
        problems.append(Problem(id=pid, **values, source=f"{path}: {loc}"))
        if cfg.limit is not None and len(problems) >= cfg.limit:
            break
    if not problems:
        raise DatasetError(f"{path}: no records")
    return problems


def check_prompt_tokens(problems: Sequence[Problem], prompt_ids: Callable[[Problem], Sequence[int]],
                        max_tokens: int, limit: str) -> None:
    """Refuse problems whose prompt (`prompt_ids(problem)`: the token ids the run will send, through its own
    tokenizer and chat template) is longer than `max_tokens`; `limit` says where that number comes from.

    Raises DatasetError naming the first such problem's file:line, id, token count and the limit, and how many
    others are too long; run once at load, before any model is built (else the run fails when it is drawn).
    """
    too_long = []
    for p in problems:
        n = len(prompt_ids(p))
        if n > max_tokens:
            too_long.append((p, n))
    if too_long:
        p, n = too_long[0]
        more = f" ({len(too_long) - 1} more problems are too long as well)" if len(too_long) > 1 else ""
        raise DatasetError(f"{p.source or 'dataset'}: problem {p.id!r}: its prompt is {n} tokens, more than the "
                           f"{max_tokens} {limit}{more}")
