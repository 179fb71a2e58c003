"""Edit formats: turn a model's reply into a new train.py. Pure functions, no I/O.

A reply holds a one-line `Description:` and either SEARCH/REPLACE blocks

    train.py
    <<<<<<< SEARCH
    lines copied from train.py
    =======
    the lines that replace them
    >>>>>>> REPLACE

or the whole new file in one fenced python block. An `EditError` message is written for
the model: it goes back to it so that it can fix its reply.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

TARGET = "train.py"
MAX_DESCRIPTION = 200

_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\b.*$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\b.*$")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(.*?)\s*$")
_DESCRIPTION = re.compile(r"^[\s>*_#`-]*description[*_`]*\s*:\s*(.*)$", re.IGNORECASE)
_FILENAME = re.compile(r"^[\w.\-/\\]*\w\.[A-Za-z]\w*$")
_FILENAME_PREFIX = re.compile(r"^(?:file(?:name)?|path)\s*:\s*", re.IGNORECASE)
_ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=\s*(.+?)\s*(?:#.*)?$")
_ELISION = re.compile(r"^\s*#\s*(?:\.\.\.|…|.*\b(?:rest|remainder)\b.*\bunchanged\b)", re.IGNORECASE)
_PYTHON_INFO = ("", "python", "py", "python3")


class EditError(Exception):
    """A reply that cannot be turned into train.py; the message is meant for the model,
    `summary` (one line) for the ledger."""

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


@dataclass
class ParsedReply:
    description: str | None
    blocks: list[tuple[str, str]] = field(default_factory=list)
    whole_file: str | None = None
    other_files: list[str] = field(default_factory=list)

    @property
    def has_edits(self) -> bool:
        return bool(self.blocks) or self.whole_file is not None


# --- parsing -----------------------------------------------------------------------------


def parse_reply(reply: str) -> ParsedReply:
    """Split a reply into its description and its edits.

    Raises EditError for a SEARCH block that is not closed. Files other than train.py
    that the reply edits are listed in `other_files` (their edits are not kept).
    """
    lines = reply.splitlines()
    description = _find_description(lines)
    blocks, other_files = _find_blocks(lines)
    whole_file = None
    if not blocks and not other_files:
        whole_file, other_files = _find_whole_file(lines)
    return ParsedReply(description, blocks, whole_file, _unique(other_files))


def _find_description(lines: list[str]) -> str | None:
    for line in lines:
        match = _DESCRIPTION.match(line)
        if match:
            text = " ".join(match.group(1).strip(" *_`").split())
            if text:
                return text[:MAX_DESCRIPTION]
    return None


def filename_of(line: str) -> str | None:
    """The file a line names when the whole line is a path like `train.py` or `**ar.toml**:`."""
    text = _FILENAME_PREFIX.sub("", line.strip().strip("#*`").strip().rstrip(":").strip("*` "))
    return text if _FILENAME.match(text) else None


def is_target(name: str) -> bool:
    return PurePosixPath(name.replace("\\", "/")).name == TARGET


def _fence_filename(info: str) -> str | None:
    for word in info.split():
        name = filename_of(word)
        if name:
            return name
    return None


def _named_before(lines: list[str], index: int) -> str | None:
    """The filename named on the lines just above `index` (a fence line may sit between)."""
    for line in reversed(lines[max(0, index - 3):index]):
        if not line.strip():
            continue
        fence = _FENCE.match(line)
        if fence:
            name = _fence_filename(fence.group(2))
            if name:
                return name
            continue
        return filename_of(line)
    return None


def _find_blocks(lines: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    blocks: list[tuple[str, str]] = []
    other_files: list[str] = []
    current_file = TARGET
    index = 0
    number = 0
    while index < len(lines):
        if not _SEARCH.match(lines[index]):
            index += 1
            continue
        number += 1
        current_file = _named_before(lines, index) or current_file
        divider = _next_matching(lines, index + 1, _DIVIDER)
        if divider is None:
            raise EditError(f"SEARCH block {number} has no ======= line after its SEARCH lines")
        end = _next_matching(lines, divider + 1, _REPLACE)
        if end is None:
            raise EditError(f"SEARCH block {number} has no >>>>>>> REPLACE line to close it")
        search = "\n".join(lines[index + 1:divider])
        replace = "\n".join(lines[divider + 1:end])
        if is_target(current_file):
            blocks.append((search, replace))
        else:
            other_files.append(current_file)
        index = end + 1
    return blocks, other_files


def _next_matching(lines: list[str], start: int, pattern: re.Pattern[str]) -> int | None:
    for index in range(start, len(lines)):
        if _SEARCH.match(lines[index]):
            return None
        if pattern.match(lines[index]):
            return index
    return None


def _find_whole_file(lines: list[str]) -> tuple[str | None, list[str]]:
    """The longest python fence that is (or may be) train.py, and the other files fenced."""
    candidates: list[str] = []
    other_files: list[str] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        marker, info = fence.groups()
        end = index + 1
        while end < len(lines) and not _closes(lines[end], marker):
            end += 1
        name = _fence_filename(info) or _named_before(lines, index)
        body = "\n".join(lines[index + 1:end])
        language = info.split()[0].lower() if info.split() else ""
        if name is not None and not is_target(name):
            other_files.append(name)
        elif name is not None or language in _PYTHON_INFO:
            candidates.append(body)
        index = end + 1
    if not candidates:
        return None, other_files
    return max(candidates, key=len) + "\n", other_files


def _closes(line: str, marker: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(marker[0] * len(marker)) and not stripped.strip(marker[0])


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


# --- applying ----------------------------------------------------------------------------


def apply_blocks(original: str, blocks: list[tuple[str, str]]) -> str:
    """Apply SEARCH/REPLACE blocks in order, each to the result of the ones before it.

    A SEARCH section matches exactly first, then with its indentation shifted by a
    constant amount (the replacement is shifted alike), then ignoring blank lines and
    trailing whitespace. It must match exactly one place.
    """
    text = original
    for number, (search, replace) in enumerate(blocks, start=1):
        text = _apply_block(text, search, replace, number)
    return text


def _apply_block(text: str, search: str, replace: str, number: int) -> str:
    lines = text.splitlines()
    search_lines = search.splitlines()
    replace_lines = replace.splitlines()
    if not any(line.strip() for line in search_lines):
        if text.strip():
            raise EditError(f"SEARCH block {number} is empty; copy the lines to change from "
                            f"{TARGET} into it (an empty SEARCH only fills an empty file)")
        return _join(replace_lines, trailing_newline=True)
    for matcher in (_exact_matches, _indent_matches, _loose_matches):
        matches = matcher(lines, search_lines)
        if len(matches) > 1:
            places = ", ".join(str(start + 1) for start, _, _ in matches[:5])
            raise EditError(f"SEARCH block {number} matches {TARGET} in {len(matches)} places "
                            f"(lines {places}); add neighbouring lines so it matches one")
        if matches:
            start, end, shift = matches[0]
            new_lines = lines[:start] + [shift(line) for line in replace_lines] + lines[end:]
            return _join(new_lines, trailing_newline=text.endswith("\n") or not text)
    raise EditError(_no_match_message(lines, search_lines, replace, number),
                    summary=f"SEARCH block {number} did not match {TARGET}")


def _join(lines: list[str], trailing_newline: bool) -> str:
    text = "\n".join(lines)
    return text + "\n" if trailing_newline and lines else text


def _unchanged(line: str) -> str:
    return line


Shift = Callable[[str], str]
Match = tuple[int, int, Shift]


def _exact_matches(lines: list[str], search: list[str]) -> list[Match]:
    size = len(search)
    return [(start, start + size, _unchanged) for start in range(len(lines) - size + 1)
            if lines[start:start + size] == search]


def _indent_matches(lines: list[str], search: list[str]) -> list[Match]:
    size = len(search)
    matches = []
    for start in range(len(lines) - size + 1):
        shift = _indent_shift(lines[start:start + size], search)
        if shift is not None:
            matches.append((start, start + size, shift))
    return matches


def _loose_matches(lines: list[str], search: list[str]) -> list[Match]:
    """Match the non-blank lines, ignoring blank lines between them and trailing spaces."""
    wanted = [line.rstrip() for line in search if line.strip()]
    kept = [(index, line.rstrip()) for index, line in enumerate(lines) if line.strip()]
    matches = []
    for first in range(len(kept) - len(wanted) + 1):
        window = kept[first:first + len(wanted)]
        shift = _indent_shift([line for _, line in window], wanted)
        if shift is not None:
            matches.append((window[0][0], window[-1][0] + 1, shift))
    return matches


def _indent_shift(window: list[str], search: list[str]) -> Shift | None:
    """How to re-indent replacement lines when `window` is `search` with its indentation
    changed by one constant amount (possibly none); None when it is not."""
    shifts = set()
    for have, want in zip(window, search, strict=True):
        if not have.strip() or not want.strip():
            if have.strip() or want.strip():
                return None
            continue
        if have.lstrip() != want.lstrip():
            return None
        have_indent = have[:len(have) - len(have.lstrip())]
        want_indent = want[:len(want) - len(want.lstrip())]
        if have_indent == want_indent:
            shifts.add(("=", ""))
        elif have_indent.endswith(want_indent):
            shifts.add(("+", have_indent[:len(have_indent) - len(want_indent)]))
        elif want_indent.endswith(have_indent):
            shifts.add(("-", want_indent[:len(want_indent) - len(have_indent)]))
        else:
            return None
    if len(shifts) != 1:
        return None
    direction, prefix = shifts.pop()
    if direction == "=":
        return _unchanged
    if direction == "+":
        return lambda line: prefix + line if line.strip() else line
    return lambda line: line[len(prefix):] if line.startswith(prefix) else line.lstrip()


def _no_match_message(lines: list[str], search: list[str], replace: str, number: int) -> str:
    message = f"SEARCH block {number} did not match {TARGET}"
    closest = closest_lines(lines, search)
    if closest:
        message += "; the closest lines were:\n" + "\n".join(closest)
    if replace.strip() and replace.strip() in "\n".join(lines):
        message += f"\nIts REPLACE lines are already in {TARGET}."
    return message + ("\nThe SEARCH lines must be copied from the current train.py exactly, "
                      "indentation and comments included.")


def closest_lines(lines: list[str], search: list[str], limit: int = 8) -> list[str]:
    """The window of `lines` most like `search`, at most `limit` lines long."""
    size = min(len(search), len(lines), limit)
    if size == 0:
        return []
    wanted = "\n".join(line.strip() for line in search[:size])
    best_start, best_ratio = 0, -1.0
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(wanted)
    for start in range(len(lines) - size + 1):
        matcher.set_seq1("\n".join(line.strip() for line in lines[start:start + size]))
        if matcher.real_quick_ratio() <= best_ratio or matcher.quick_ratio() <= best_ratio:
            continue
        ratio = matcher.ratio()
        if ratio > best_ratio:
            best_start, best_ratio = start, ratio
    return lines[best_start:best_start + size]


def check_whole_file(original: str, new: str) -> str:
    """A whole-file reply as the new train.py; EditError when it is plainly partial."""
    for line in new.splitlines():
        if _ELISION.match(line):
            raise EditError(f"the python block leaves code out ({line.strip()!r}); send the "
                            f"complete {TARGET} or use SEARCH/REPLACE blocks")
    old_count = sum(1 for line in original.splitlines() if line.strip())
    new_count = sum(1 for line in new.splitlines() if line.strip())
    if old_count >= 30 and new_count * 2 < old_count:
        raise EditError(f"the python block has {new_count} lines but {TARGET} has {old_count}; "
                        "send the complete file or use SEARCH/REPLACE blocks")
    return new


# --- describing --------------------------------------------------------------------------


def describe_change(original: str, new: str) -> str:
    """A short description of an edit, for replies that gave no Description line."""
    removed, added = [], []
    for line in difflib.unified_diff(original.splitlines(), new.splitlines(), lineterm="", n=0):
        if line.startswith(("---", "+++", "@@")):
            continue
        if line.startswith("-") and line[1:].strip():
            removed.append(line[1:].strip())
        elif line.startswith("+") and line[1:].strip():
            added.append(line[1:].strip())
    old_values = _assignments(removed)
    new_values = _assignments(added)
    if old_values is not None and new_values is not None and old_values.keys() == new_values.keys():
        return ", ".join(f"{name} {old_values[name]} -> {new_values[name]}" for name in new_values)
    if not removed and not added:
        return "no change"
    first = (added or removed)[0]
    summary = f"edit {len(removed)} lines -> {len(added)} lines: {first}"
    return summary[:MAX_DESCRIPTION]


def _assignments(lines: list[str]) -> dict[str, str] | None:
    values = {}
    for line in lines:
        match = _ASSIGNMENT.match(line)
        if not match:
            return None
        values[match.group(1)] = match.group(2)
    return values or None
