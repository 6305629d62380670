"""Prompt sets: ``.txt`` (one prompt per line), ``.jsonl`` and ``.csv`` files, and built-in sets.

Field names: the prompt may be called ``prompt``, ``text``, ``question``, ``instruction`` or
``input``; answers ``answer``, ``answers`` (string or list) or ``target``; ``context`` is prepended
(in-context QA); ``choices`` makes a multiple-choice item (answer = letter); ``answer_type: number`` makes the
item's answer a number, compared with the output's final answer (its last ``\boxed{...}``, else its
last number: :func:`dtm_core.measure.freerun.final_answer`). A whole set is marked so with
:meth:`PromptSet.with_answer_type` (``evaluate --answer-type number``).

Nothing is dropped silently: a rejected line is listed in :attr:`PromptSet.rejected` with its line
number and the reason; a file that cannot be used at all raises :class:`DTMError`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from dtm_core.errors import DTMError

MAX_BYTES = 10 * 1024 * 1024
MAX_PROMPTS = 5000
PROMPT_FIELDS = ("prompt", "text", "question", "instruction", "input")
ANSWER_FIELDS = ("answer", "answers", "target")
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "prompts"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_TYPES = ("number", "text")


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    answers: tuple[str, ...] = ()
    context: str | None = None
    choices: tuple[str, ...] | None = None
    line: int = 0
    answer_type: str | None = None     # "number": compared with the final answer, numerically

    def text(self) -> str:
        """The text the models see: context, then the prompt, then lettered choices."""
        parts = []
        if self.context:
            parts.append(self.context.strip())
        if self.choices:
            opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
            parts.append(f"Question: {self.prompt.strip()}\n{opts}\nAnswer:")
        else:
            parts.append(self.prompt)
        return "\n\n".join(parts)


@dataclass
class PromptSet:
    name: str
    records: list[PromptRecord]
    rejected: list[tuple[int, str]] = field(default_factory=list)
    sha256: str = ""

    @property
    def prompts(self) -> list[str]:
        return [r.text() for r in self.records]

    @property
    def has_answers(self) -> bool:
        return any(r.answers for r in self.records)

    @property
    def numeric(self) -> bool:
        """Some item's answer is a number (its final answers are compared)."""
        return any(r.answer_type == "number" for r in self.records)

    def with_answer_type(self, kind: str | None) -> "PromptSet":
        """The set with every item's answer type set (``number``; None leaves it as it is)."""
        from dataclasses import replace

        if kind is None:
            return self
        if kind not in ANSWER_TYPES:
            raise DTMError(f"Unknown answer type '{kind}'; use one of {', '.join(ANSWER_TYPES)}.")
        return PromptSet(name=self.name, sha256=self.sha256, rejected=list(self.rejected),
                         records=[replace(r, answer_type=kind) for r in self.records])

    def rejection_message(self) -> str:
        if not self.rejected:
            return ""
        lines = "; ".join(f"line {n}: {why}" for n, why in self.rejected[:20])
        more = f" (and {len(self.rejected) - 20} more)" if len(self.rejected) > 20 else ""
        return f"{len(self.rejected)} line(s) rejected: {lines}{more}."


def _as_answers(val) -> tuple[str, ...]:
    if val is None:
        return ()
    if isinstance(val, (list, tuple)):
        return tuple(str(v) for v in val if str(v).strip())
    text = str(val).strip()
    if text.startswith("[") and text.endswith("]"):  # a list written into a CSV cell
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return tuple(str(v) for v in parsed if str(v).strip())
        except json.JSONDecodeError:
            pass
    return (text,) if text else ()


def _record(obj: dict, line: int) -> PromptRecord:
    """A record from a JSON object or CSV row; raises ValueError with the reason."""
    prompt = next((obj[k] for k in PROMPT_FIELDS if k in obj and obj[k] not in (None, "")), None)
    if prompt is None:
        raise ValueError("no prompt field (one of " + ", ".join(PROMPT_FIELDS) + ")")
    if not isinstance(prompt, str):
        raise ValueError("the prompt is not a string")
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    answers = ()
    for k in ANSWER_FIELDS:
        if k in obj and obj[k] not in (None, ""):
            answers = _as_answers(obj[k])
            break
    choices = obj.get("choices")
    if isinstance(choices, str) and choices.strip():
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            choices = [c.strip() for c in choices.split("|")]
    if choices in (None, "", []):
        choices = None
    elif not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise ValueError("choices must be a list of 2-26 options")
    else:
        choices = tuple(str(c) for c in choices)
        answers = tuple(_letter(a, choices) for a in answers)
    context = obj.get("context")
    context = str(context) if context not in (None, "") else None
    kind = obj.get("answer_type")
    kind = str(kind).strip().lower() if kind not in (None, "") else None
    if kind is not None and kind not in ANSWER_TYPES:
        raise ValueError(f"answer_type '{kind}' is not one of {', '.join(ANSWER_TYPES)}")
    if kind == "number" and choices:
        raise ValueError("a multiple-choice item's answer is a letter, not a number")
    return PromptRecord(prompt=prompt, answers=answers, context=context, choices=choices,
                        line=line, answer_type=kind)


def _letter(answer: str, choices: tuple[str, ...]) -> str:
    """Multiple-choice answers are letters; accept an option's text or index too."""
    a = answer.strip()
    if len(a) == 1 and a.upper() in LETTERS[:len(choices)]:
        return a.upper()
    if a.isdigit() and int(a) < len(choices):
        return LETTERS[int(a)]
    for i, c in enumerate(choices):
        if a.lower() == c.strip().lower():
            return LETTERS[i]
    raise ValueError(f"answer '{a}' is not one of the choice letters")


def decode_text(data: bytes, name: str, max_bytes: int | None = MAX_BYTES) -> str:
    """UTF-8 text from bytes, or a DTMError saying why not (empty, too big, binary, encoding)."""
    if not data.strip():
        raise DTMError(f"'{name}' is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise DTMError(f"'{name}' is {len(data) / 2**20:.1f} MB; the limit is "
                       f"{max_bytes / 2**20:g} MB.")
    if b"\x00" in data:
        raise DTMError(f"'{name}' looks like binary data, not a text prompt file.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DTMError(f"'{name}' is not UTF-8 text (bad byte at offset {exc.start}).") from None


def parse_prompt_bytes(data: bytes, name: str) -> PromptSet:
    """Parse the bytes of a prompt file named ``name`` (its extension picks the format)."""
    text = decode_text(data, name)
    ext = Path(name).suffix.lower()
    records: list[PromptRecord] = []
    rejected: list[tuple[int, str]] = []
    if ext == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if isinstance(obj, str):
                    obj = {"prompt": obj}
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                records.append(_record(obj, n))
            except json.JSONDecodeError as exc:
                rejected.append((n, f"malformed JSON ({exc.msg})"))
            except ValueError as exc:
                rejected.append((n, str(exc)))
    elif ext == ".csv":
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            raise DTMError(f"'{name}' is not valid CSV: {exc}.") from None
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if not any(f in header for f in PROMPT_FIELDS):
            raise DTMError(f"'{name}' has no prompt column: its header row must name one of "
                           + ", ".join(PROMPT_FIELDS) + ".")
        for n, row in enumerate(rows[1:], start=2):
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                rejected.append((n, f"{len(row)} fields where the header has {len(header)}"))
                continue
            try:
                records.append(_record(dict(zip(header, row)), n))
            except ValueError as exc:
                rejected.append((n, str(exc)))
    elif ext in (".txt", ""):
        lines = text.splitlines()
        last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
        for n, line in enumerate(lines[:last + 1], start=1):
            if line.strip():
                records.append(PromptRecord(prompt=line, line=n))
            else:
                rejected.append((n, "empty line"))
    else:
        raise DTMError(f"'{name}': prompt files must be .txt, .jsonl or .csv.")
    if len(records) > MAX_PROMPTS:
        raise DTMError(f"'{name}' holds {len(records)} prompts; the limit is {MAX_PROMPTS}.")
    if not records:
        why = f" ({rejected[0][1]} on line {rejected[0][0]}, ...)" if rejected else ""
        raise DTMError(f"'{name}' holds no usable prompt{why}.")
    return PromptSet(name=Path(name).name, records=records, rejected=rejected,
                     sha256=hashlib.sha256(data).hexdigest())


def read_text_file(path: str) -> str:
    """A whole UTF-8 text file (no size limit: texts to score can be long)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DTMError(f"Could not read '{path}': {exc.strerror}.") from None
    return decode_text(data, path, max_bytes=None)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in ASSETS.glob("*.jsonl"))


def load_prompts(source: str) -> PromptSet:
    """A prompt set from a file path or a built-in set's name."""
    path = Path(source)
    if not path.is_file():
        if (ASSETS / f"{source}.jsonl").is_file():
            path = ASSETS / f"{source}.jsonl"
        else:
            raise DTMError(f"Prompt file '{source}' does not exist and is not a built-in set "
                           f"({', '.join(builtin_names()) or 'none installed'}).")
    if path.stat().st_size > MAX_BYTES:
        raise DTMError(f"'{path.name}' is {path.stat().st_size / 2**20:.1f} MB; the limit is 10 MB.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DTMError(f"Could not read '{source}': {exc.strerror}.") from None
    return parse_prompt_bytes(data, path.name)
