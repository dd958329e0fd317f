"""AUTOMATIC1111's attention syntax: `(word)` x1.1, `[word]` /1.1, `(word:1.3)`, nesting, `\\(` escapes, BREAK.

The rules are those of A1111's modules/prompt_parser.py `parse_prompt_attention`, with one difference: what A1111
quietly repairs or keeps as text is refused here with the column, because a prompt that silently means something
else is worse than an error. That covers an unclosed or stray bracket, a `)` that closes a `[`, a weight that is not
a number, and A1111 features this runtime does not have: prompt editing `[a:b:0.5]`, alternation `[a|b]`, extra
networks `<lora:name:0.8>` and composable `AND`.
"""

from __future__ import annotations

import re

from .parsed import BREAK, Fragment, Fragments, PromptError

UP, DOWN = 1.1, 1 / 1.1  # A1111's multipliers for ( ) and [ ]

_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]                           # an escaped bracket or backslash: that character
    | \\                                   # any other backslash: dropped, as A1111 does
    | [(\[]                                # an opening bracket
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)     # ':1.3)': closes a '(' with that weight
    | [)\]]                                # a closing bracket
    | [^\\()\[\]:]+                        # text
    | :                                    # a colon that starts no weight
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_UNSUPPORTED = [
    (re.compile(r"<(lora|lyco|hypernet):"), "A1111 extra networks (<lora:name:weight>) are not prompt text here; "
                                            "remove it and load the LoRA into the bundle instead"),
    (re.compile(r"\bAND\b"), "A1111's composable AND is not supported; write 'and' in lower case for the word"),
]


def parse_a1111(prompt: str) -> Fragments:
    """(text, weight) fragments and BREAK markers, adjacent fragments of equal weight merged (A1111 tokenises
    each fragment on its own, so merging decides how text on both sides of an escape is tokenised)."""
    for pattern, message in _UNSUPPORTED:
        if m := pattern.search(prompt):
            raise PromptError(prompt, m.start(), message)
    res: list = []  # [text, weight] lists, or BREAK
    open_: list[tuple[str, int, int]] = []  # (bracket, column index, first fragment it weights)

    def close(at: int, bracket: str, multiplier: float) -> None:
        if not open_:
            raise PromptError(prompt, at, f"{prompt[at]!r} closes no bracket; escape it as \\{prompt[at]} for the "
                                          "character itself")
        kind, where, start = open_.pop()
        if kind != bracket:
            want = ")" if kind == "(" else "]"
            raise PromptError(prompt, at, f"{prompt[at]!r} closes the {kind!r} at column {where + 1}; expected "
                                          f"{want!r}")
        for item in res[start:]:
            if item is not BREAK:
                item[1] *= multiplier

    for m in _TOKEN.finditer(prompt):
        tok, at = m.group(0), m.start()
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok in "([":
            open_.append((tok, at, len(res)))
        elif m.group("weight") is not None:
            close(m.end() - 1, "(", _weight(prompt, m))
        elif tok in ")]":
            close(at, "(" if tok == ")" else "[", UP if tok == ")" else DOWN)
        elif tok == ":" and open_ and open_[-1][0] == "[":
            raise PromptError(prompt, at, "A1111 prompt editing ([from:to:when]) is not supported; escape the "
                                          "brackets as \\[ \\] for the characters themselves")
        else:
            if "|" in tok and open_ and open_[-1][0] == "[":
                raise PromptError(prompt, at + tok.index("|"), "A1111 alternation ([a|b]) is not supported")
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(BREAK)
                res.append([part, 1.0])
    if open_:
        kind, where, _ = open_[-1]
        want = "')' or ':weight)'" if kind == "(" else "']'"
        raise PromptError(prompt, where, f"this {kind!r} is never closed; expected {want}")
    return _merged(res)


def _weight(prompt: str, m: re.Match) -> float:
    try:
        return float(m.group("weight"))
    except ValueError:
        raise PromptError(prompt, m.start("weight"), f"weight {m.group('weight')!r} is not a number; expected "
                                                     "one like 1.3 or 0.8") from None


def _merged(res: list) -> Fragments:
    """A1111 joins neighbouring fragments of the same weight before tokenising; BREAKs stay apart."""
    out: list = []
    for item in res:
        if item is not BREAK and out and out[-1] is not BREAK and out[-1][1] == item[1]:
            out[-1] = [out[-1][0] + item[0], item[1]]
        else:
            out.append(item)
    if not out:
        return (Fragment("", 1.0),)
    return tuple(BREAK if item is BREAK else Fragment(item[0], item[1]) for item in out)
