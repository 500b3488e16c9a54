"""Bounds on what the service accepts, keeps and shows.

Payloads come from registries, which relay what pushing clients send, and error messages come from
images anyone can push. Everything the service parses is bounded (JSON nesting, number size, valid
Unicode) and every text it logs, stores or serves is clipped to a few KB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_ERROR_CHARS = 4096  # error messages (jobs' last_error, attempt log, log lines)
MAX_JSON_DEPTH = 32  # nesting of a whole request body; Distribution's deepest field is at 6
MAX_INT_DIGITS = 32  # a JSON integer with more digits is kept as text and makes its event malformed
MAX_EVENT_ID = 128  # longer delivery ids are replaced by a hash of themselves


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text`, cut to `limit` characters with a note of how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters]"


class BigNumber(str):
    """A JSON integer too long to be a plausible field value (kept as its text, never converted)."""


def parse_int(text: str) -> int | BigNumber:
    """`json.loads(parse_int=...)`: Python refuses to convert integers of more than 4300 digits with a
    ValueError, and slowly converts anything below; no registry field needs more than 20 digits."""
    return BigNumber(text) if len(text) > MAX_INT_DIGITS else int(text)


def _text_problem(text: str) -> str | None:
    if isinstance(text, BigNumber):
        return f"a number has more than {MAX_INT_DIGITS} digits"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a string holds a lone surrogate (not valid Unicode)"
    return None


def bounds_problem(value: Any, max_depth: int) -> str | None:
    """Why `value` (parsed JSON) exceeds the bounds: nested deeper than `max_depth` containers, an
    oversized number, a string that is not valid Unicode; None when it is within them. Iterative, so
    any depth that the JSON parser produced can be checked."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            problem = _text_problem(node)
            if problem:
                return problem
        elif isinstance(node, Mapping | list):
            if depth >= max_depth:
                return f"nested deeper than {max_depth} levels"
            items = node.items() if isinstance(node, Mapping) else ((None, v) for v in node)
            for key, child in items:
                if key is not None and (problem := _text_problem(key)):
                    return problem
                stack.append((child, depth + 1))
    return None
