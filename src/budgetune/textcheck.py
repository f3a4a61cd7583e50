"""Is a string Unicode text? One walk over parsed values (JSON bodies and records, YAML configs, argv) that finds
the first string holding a lone UTF-16 surrogate: Python lets such a str exist (from a JSON "\\ud800" escape, a
pickled str, argv bytes decoded with surrogateescape), but it cannot be encoded, so a tokenizer, a submission or a
JSON file would fail on it later. Each caller turns a finding into its own error."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class LoneSurrogate:
    """Where: the path of keys and list indices to the string; `in_key` when the string is an object key."""

    path: tuple
    text: str
    index: int
    in_key: bool

    def describe(self) -> str:
        """'unpaired surrogate \\ud800 at character 4' (1-based position)."""
        return f"unpaired surrogate \\u{ord(self.text[self.index]):04x} at character {self.index + 1}"


def lone_surrogate(value: object) -> LoneSurrogate | None:
    """The first (breadth first) key or string in a nested value of dicts, lists and tuples that holds a lone
    surrogate, or None. No recursion, so any depth is fine."""
    todo = deque([((), value)])
    while todo:
        path, v = todo.popleft()
        if isinstance(v, dict):
            for key, item in v.items():
                if isinstance(key, str) and (m := SURROGATE.search(key)):
                    return LoneSurrogate(path, key, m.start(), True)
                todo.append(((*path, key), item))
        elif isinstance(v, (list, tuple)):
            todo.extend(((*path, i), item) for i, item in enumerate(v))
        elif isinstance(v, str) and not v.isascii() and (m := SURROGATE.search(v)):
            return LoneSurrogate(path, v, m.start(), False)
    return None
