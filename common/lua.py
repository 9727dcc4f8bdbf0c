"""Lua scripts kept in `.lua` files whose header declares KEYS and ARGV by name; Python builds both by
those names and checks them against the declaration before each call.

A script's leading comment block declares its layout, one section a line (a line of `--` and three
or more spaces continues the one above):

    -- KEYS: event*event_count
    -- KEYS event: seen recent per_version*n_versions
    -- KEYS per_version: delta delta_count
    -- ARGV: event_count n_versions version*n_versions

`name` is one value; `group*count` is `count` repetitions of the section's group `group` (declared
on its own line), or of one value where the section declares no such group. A count is a value of the
top-level ARGV (the script reads it) or a number the caller passes to `check`. In each line the
single values come first, the repetitions after them.

The script's Lua gets the fixed sizes as locals, so no size is written twice: `KEYS_HEAD` and
`ARGV_HEAD` (the top level's single values), `KEYS_<GROUP>` and `ARGV_<GROUP>` (a group's).
"""

from __future__ import annotations

import hashlib
import keyword
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

SECTIONS = ("KEYS", "ARGV")
_DECLARATION = re.compile(r"^-- (KEYS|ARGV)(?: (\w+))?: (.*)$")
_CONTINUATION = re.compile(r"^--\s{3,}(\S.*)$")
_REPEAT = re.compile(r"^(\w+)\*(\w+)$")


class LayoutError(TypeError):
    """A script's header is malformed, or the KEYS or ARGV of a call do not match it."""


@dataclass(frozen=True)
class Repeat:
    group: str  # a group of the section, or the name of a single repeated value
    count: str


@dataclass(frozen=True)
class Block:
    """One declaration line: single values, then repetitions."""

    names: tuple[str, ...]
    repeats: tuple[Repeat, ...]


class Section:
    """The KEYS or the ARGV of a script: its blocks and a builder for each."""

    def __init__(self, script: str, label: str, blocks: Mapping[str | None, Block]) -> None:
        self.label = label
        self.top = blocks.get(None, Block((), ()))
        self.groups = {name: block for name, block in blocks.items() if name is not None}
        repeated = {r.group for block in (self.top, *self.groups.values()) for r in block.repeats}
        for name in self.groups.keys() - repeated:
            raise LayoutError(f"{script}: {label} {name} is declared but never repeated")
        self._packers = {
            name: _packer(f"{script} {label} {name}", block) for name, block in self.groups.items()
        }
        self.pack = _packer(f"{script} {label}", self.top)

    def packer(self, group: str) -> Callable[..., list[Any]]:
        """The builder of one repetition of `group`: keyword arguments by the declared names, in any
        order; a declared name left out or an undeclared one is a TypeError naming the script."""
        return self._packers[group]

    def size(self, counts: Mapping[str, int], block: Block | None = None) -> int:
        """How many values the block (default: the whole section) holds for these counts."""
        block = self.top if block is None else block
        total = len(block.names)
        for repeat in block.repeats:
            group = self.groups.get(repeat.group)
            total += counts[repeat.count] * (1 if group is None else self.size(counts, group))
        return total

    def counts(self) -> set[str]:
        """The names of the counts its repetitions need."""
        return {r.count for block in (self.top, *self.groups.values()) for r in block.repeats}

    def lua_sizes(self) -> dict[str, int]:
        """The locals the Lua reads its offsets from: the top level's and each group's single values."""
        sizes = {f"{self.label}_HEAD": len(self.top.names)}
        sizes.update((f"{self.label}_{name.upper()}", len(b.names)) for name, b in self.groups.items())
        return sizes


_GLOBALS = ("KEYS", "ARGV", "redis", "tonumber", "tostring", "string", "math", "table", "pairs", "ipairs", "type")
_GLOBALS_AS_LOCALS = f"local {', '.join(_GLOBALS)} = {', '.join(_GLOBALS)};"


class Script:
    """A script loaded from its file: the Lua Redis runs (`source`, `sha`) and its declared layout."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        blocks = _parse_header(name, text)
        self.keys = Section(name, "KEYS", blocks["KEYS"])
        self.argv = Section(name, "ARGV", blocks["ARGV"])
        # Counts the script reads from its own ARGV: where each sits, to check the call against.
        self._count_at = {
            count: self.argv.top.names.index(count)
            for count in self.keys.counts() | self.argv.counts()
            if count in self.argv.top.names
        }
        sizes = {**self.keys.lua_sizes(), **self.argv.lua_sizes()}
        # On the file's first line, so Redis' error line numbers are the file's; with the globals the
        # scripts use as locals: each use of a global is a lookup in Redis' protected globals table (the
        # event script ~1 % fewer instructions an event).
        self.source = f"local {', '.join(sizes)} = {', '.join(map(str, sizes.values()))}; {_GLOBALS_AS_LOCALS} {text}"
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def check(self, keys: Sequence[object], args: Sequence[object], **counts: int) -> None:
        """Raise LayoutError unless KEYS and ARGV have the lengths the declaration gives them for the
        counts: those in ARGV are read there, the others (`counts`) come from the caller."""
        for count, index in self._count_at.items():
            if index >= len(args):
                raise LayoutError(f"{self.name}: ARGV has {len(args)} values, so no {count!r}")
            counts[count] = int(args[index])  # type: ignore[call-overload]
        for section, values in ((self.keys, keys), (self.argv, args)):
            try:
                expected = section.size(counts)
            except KeyError as exc:
                raise LayoutError(f"{self.name}: the call gives no count {exc.args[0]!r}") from None
            if len(values) != expected:
                shown = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                raise LayoutError(
                    f"{self.name}: {section.label} has {len(values)} values, the declaration {expected} ({shown})"
                )


def load_script(package: str, filename: str) -> Script:
    """The script `filename` shipped beside the package's modules (package data)."""
    return Script(filename, resources.files(package).joinpath(filename).read_text(encoding="utf-8"))


def _parse_header(script: str, text: str) -> dict[str, dict[str | None, Block]]:
    lines: list[tuple[str, str | None, str]] = []  # (section, group, tokens)
    continuing = False  # the line before was a declaration or its continuation
    for line in text.splitlines():
        if not line.startswith("--"):
            break  # the header is the leading comment block
        declared, more = _DECLARATION.match(line), _CONTINUATION.match(line)
        if declared:
            lines.append((declared[1], declared[2], declared[3]))
        elif more and continuing:
            section, group, tokens = lines[-1]
            lines[-1] = (section, group, f"{tokens} {more[1]}")
        continuing = bool(declared or (more and continuing))
    blocks: dict[str, dict[str | None, Block]] = {section: {} for section in SECTIONS}
    for section, group, tokens in lines:
        if group in blocks[section]:
            raise LayoutError(f"{script}: {section} {group or ''} is declared twice")
        blocks[section][group] = _block(script, tokens.split())
    if not blocks["KEYS"] and not blocks["ARGV"]:
        raise LayoutError(f"{script}: the header declares no KEYS and no ARGV")
    return blocks


def _block(script: str, tokens: list[str]) -> Block:
    names: list[str] = []
    repeats: list[Repeat] = []
    for token in tokens:
        repeat = _REPEAT.match(token)
        if repeat:
            repeats.append(Repeat(repeat[1], repeat[2]))
            continue
        if repeats:
            raise LayoutError(f"{script}: {token!r} follows a repetition (single values come first)")
        names.append(token)
    for name in [*names, *(r.group for r in repeats), *(r.count for r in repeats)]:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise LayoutError(f"{script}: {name!r} is not a usable name")
    if len(set(names)) != len(names):
        raise LayoutError(f"{script}: a name is declared twice in {' '.join(tokens)!r}")
    return Block(tuple(names), tuple(repeats))


def _packer(qualname: str, block: Block) -> Callable[..., list[Any]]:
    """A function taking the block's names as keyword-only arguments and returning the values in
    declared order, each repetition's values (a flat sequence) spliced in. Generated, as dataclasses
    generate __init__, so a call costs what a hand-written list would."""
    params = [*block.names, *(r.group for r in block.repeats)]
    values = [*block.names, *(f"*{r.group}" for r in block.repeats)]
    signature = f"*, {', '.join(params)}" if params else ""
    namespace: dict[str, Any] = {}
    exec(f"def pack({signature}):\n    return [{', '.join(values)}]\n", namespace)  # noqa: S102
    pack: Callable[..., list[Any]] = namespace["pack"]
    pack.__qualname__ = pack.__name__ = qualname
    return pack
