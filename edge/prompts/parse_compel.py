"""compel's prompt syntax: `word++` `word--`, `(words)1.3` `(words)+` `"words"0.8`, nesting, `.and()`, `.blend()`.

A hand-written reading of the grammar in compel 2.x's prompt_parser.py (pyparsing there), giving the same
fragments, the same weights (x1.1 per `+`, x0.9 per `-`, multiplied through nesting, outer first) and the same
fusing of neighbours of equal weight. Where compel quietly falls back to reading broken syntax as literal text, a
PromptError names the column instead: an unclosed or stray `(` or `"`, a weight followed by more number-like
characters (`(x)-1` is x0.9 and then the text "1" to compel), a character compel cannot place inside `(...)`
(`=`, a lone `+`), and `.and()` / `.blend()` that do not take the whole prompt. Not supported here: `.swap()`
(cross-attention control needs hooks inside the UNet) and `withLora()` / `useLora()`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Union

from .parsed import Blend, Fragment, ParsedPrompt, PromptError

WHITE = frozenset(string.whitespace)
SYNTAX = frozenset('()",.+-=')  # compel's syntactic characters; escaped with a backslash they are text
PLUS, MINUS = 1.1, 0.9  # compel's attention_plus_base / attention_minus_base
_NUMBER = re.compile(r"\d+\.\d*|\.\d+|\d+")  # a weight after ')' or '"'; a sign is a '+'/'-' operator instead
_OPTION_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)")
_OPERATOR = re.compile(r"\)\s*\.(and|add|blend)\s*\(")


@dataclass(frozen=True)
class _Attn:
    """A weighted group of nodes; a plain (...) or "..." group has weight 1."""

    weight: float
    children: tuple


_Node = Union[str, _Attn]  # str: a fragment's text, still escaped


def parse_compel(prompt: str) -> ParsedPrompt:
    """The fragments compel's Compel.parse_prompt_string gives (after flattening), as one part, or the parts and
    weights of a `.and()`, or a Blend."""
    p = _Parser(prompt)
    if not p.text.strip():
        return ParsedPrompt("compel", ((Fragment("", 1.0),),), (1.0,))
    p.check_balance()
    operator = _OPERATOR.search(p.text)
    if operator is not None:
        return p.operator(operator)
    fragments = _fused(_flatten(p.prompt(0, len(p.text)), 1.0))
    return ParsedPrompt("compel", (fragments or (Fragment("", 1.0),),), (1.0,))


def _unescape(text: str) -> str:
    """compel's Fragment turns only these three escapes into their characters."""
    return text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


def _flatten(nodes, scale: float) -> list[Fragment]:
    """Each fragment weighted by the product of its groups' weights, multiplied outermost first as compel does."""
    out: list[Fragment] = []
    for node in nodes:
        if isinstance(node, _Attn):
            out += _flatten(node.children, scale * node.weight)
        else:
            out.append(Fragment(_unescape(_unescape(node)), 1.0 * scale))
    return out


def _fused(fragments: list[Fragment]) -> tuple[Fragment, ...]:
    """Neighbours of equal weight joined with a space (compel's fuse_fragments)."""
    out: list[Fragment] = []
    for f in fragments:
        if out and out[-1].weight == f.weight:
            out[-1] = Fragment(_unescape(out[-1].text + " " + f.text), f.weight)
        else:
            out.append(f)
    return tuple(out)


class _Parser:
    def __init__(self, prompt: str):
        """compel first puts a space after every comma that lacks one; columns map back to `prompt`."""
        chars, self.columns = [], []
        for k, c in enumerate(prompt):
            chars.append(c)
            self.columns.append(k)
            if c == "," and k + 1 < len(prompt) and not re.match(r"\s", prompt[k + 1]):
                chars.append(" ")
                self.columns.append(k)
        self.original, self.text = prompt, "".join(chars)

    def error(self, i: int, message: str) -> PromptError:
        return PromptError(self.original, self.columns[i] if i < len(self.columns) else len(self.original), message)

    def ws(self, i: int, end: int) -> int:
        while i < end and self.text[i] in WHITE:
            i += 1
        return i

    def check_balance(self) -> None:
        """Unescaped ( ) and " must nest; compel would read a stray one as literal text."""
        stack: list[int] = []
        s, i = self.text, 0
        while i < len(s):
            c = s[i]
            if c == "\\" and i + 1 < len(s) and s[i + 1] in '()"':
                i += 2
                continue
            if c == "(" or (c == '"' and not (stack and s[stack[-1]] == '"')):
                stack.append(i)
            elif c == '"':
                stack.pop()
            elif c == ")":
                if not stack:
                    raise self.error(i, "')' closes no '('; escape it as \\) for the character itself")
                if s[stack[-1]] == '"':
                    raise self.error(i, f"')' inside the quote opened at column {self.columns[stack[-1]] + 1}; "
                                        "expected '\"' first")
                stack.pop()
            i += 1
        if stack:
            c = s[stack[-1]]
            raise self.error(stack[-1], f"this {c!r} is never closed; expected {')' if c == '(' else c!r} "
                                        f"(or escape it as \\{c})")

    def word(self, i: int, end: int) -> int:
        """The end of compel's non_syntax_word at i (i itself when there is none)."""
        s, j = self.text, i
        while j < end:
            c = s[j]
            if c == "\\" and j + 1 < end and s[j + 1] in SYNTAX:
                j += 2
            elif c in "+-" and j + 1 < end and s[j + 1] not in WHITE and s[j + 1] not in SYNTAX:
                j += 1
            elif c in WHITE or c in SYNTAX:
                break
            else:
                j += 1
        return j

    def weight_op(self, i: int, end: int, words_only: bool = False) -> tuple[float, int] | None:
        """'+' runs (1.1^n), '-' runs (0.9^n) or, after a group, a number; then nothing number-like may follow."""
        s = self.text
        if i < end and s[i] in "+-":
            j = i
            while j < end and s[j] == s[i]:
                j += 1
            weight = pow(PLUS if s[i] == "+" else MINUS, j - i)
        elif not words_only and (m := _NUMBER.match(s, i, end)):
            weight, j = float(m.group()), m.end()
        else:
            return None
        if j < end and (s[j].isdigit() or s[j] in "+-" or (s[j] == "." and j + 1 < end and s[j + 1].isdigit())):
            raise self.error(j, f"{s[i:j]!r} followed by {s[j]!r} is not a weight (compel would weight by "
                                f"{s[i:j]!r} and read the rest as text); expected +, ++, -, -- or a number like 1.3")
        return weight, j

    def target(self, i: int, end: int) -> tuple[_Node, int, bool] | None:
        """A quoted or parenthesised group, or a plain word: (node, end, is_group)."""
        s = self.text
        if s[i] == '"':
            return self.quoted(i, end) + (True,)
        if s[i] == "(":
            nodes, k = self.items(i + 1, end, stop=")")
            if k >= end or s[k] != ")":
                raise self.error(i, "this '(' is never closed; expected ')'")
            return _Attn(1.0, tuple(nodes)), k + 1, True
        j = self.word(i, end)
        return (s[i:j], j, False) if j > i else None

    def quoted(self, i: int, end: int, fallback: bool = False) -> tuple[_Node, int]:
        """"..." read with the grammar of (...) (or, for a .blend() / .and() item that fails it, of a whole
        prompt, as compel's quoted_prompt)."""
        s, k = self.text, i + 1
        while k < end and s[k] != '"':
            k += 2 if s[k] == "\\" and k + 1 < end and s[k + 1] == '"' else 1
        if k >= end:
            raise self.error(i, "this '\"' is never closed; expected '\"'")
        if not s[i + 1:k].strip():
            return _Attn(1.0, ("",)), k + 1
        try:
            nodes, _ = self.items(i + 1, k, stop=None)
        except PromptError:
            if not fallback:
                raise
            nodes = self.prompt(i + 1, k)
        return _Attn(1.0, tuple(nodes)), k + 1

    def part(self, i: int, end: int) -> tuple[_Node, int, bool] | None:
        """A target with its operator if one follows: .attend(w), a weight, or (unsupported) .swap()."""
        s = self.text
        if s.startswith(("withLora(", "useLora("), i):
            raise self.error(i, "compel's withLora()/useLora() is not supported; load the LoRA into the bundle")
        got = self.target(i, end)
        if got is None:
            return None
        node, j, group = got
        k = self.ws(j, end)
        if s.startswith(".swap", k):
            raise self.error(k, "compel's .swap() (cross-attention control) is not supported")
        if s.startswith(".attend", k):
            k = self.ws(k + len(".attend"), end)
            op = self.weight_op(self.ws(k + 1, end), end) if k < end and s[k] == "(" else None
            close = self.ws(op[1], end) if op else end
            if op is None or close >= end or s[close] != ")":
                raise self.error(k, "expected .attend(weight) with a weight like 1.3, ++ or -")
            return _Attn(op[0], (node,)), close + 1, True
        op = self.weight_op(j, end, words_only=not group)
        if op is not None:
            return _Attn(op[0], (node,)), op[1], True
        return node, j, group

    def items(self, i: int, end: int, stop: str | None) -> tuple[list[_Node], int]:
        """The inside of (...) or "...": groups, words and single commas or periods, up to `stop`."""
        nodes: list[_Node] = []
        s = self.text
        while True:
            i = self.ws(i, end)
            if i >= end or s[i] == stop:
                return nodes, i
            got = self.part(i, end)
            if got is not None:
                nodes.append(got[0])
                i = got[1]
            elif s[i] in ",.":
                nodes.append(s[i])
                i += 1
            else:
                raise self.error(i, f"compel cannot read {s[i]!r} inside (...) or \"...\"; escape it as "
                                    f"\\{s[i]} for the character itself")

    def prompt(self, i: int, end: int) -> list[_Node]:
        """The top level: as inside (...), except that a word runs to the next whitespace (compel's free_word)."""
        nodes: list[_Node] = []
        s = self.text
        while (i := self.ws(i, end)) < end:
            got = self.part(i, end)
            if got is not None and (got[2] or got[1] >= end or s[got[1]] in WHITE):
                nodes.append(got[0])
                i = got[1]
            else:
                j = i
                while j < end and s[j] not in WHITE:
                    j += 1
                nodes.append(s[i:j])
                i = j
        return nodes

    def operator(self, m: re.Match) -> ParsedPrompt:
        """`(item, item, ...).and(w, ...)` or `.blend(w, ..., no_normalize)` spanning the whole prompt."""
        s, n, name = self.text, len(self.text), m.group(1)
        shape = f'("prompt one", "prompt two").{name}(1, 0.5)'
        i = self.ws(0, n)
        if s[i] != "(":
            raise self.error(m.start() + 1, f".{name}() must take the whole prompt, as {shape}")
        items, k = self.item_list(i + 1, n, shape)
        if k != m.start():
            raise self.error(k, f"expected ')' and .{name}(...) after the last item, as {shape}")
        weights, normalize, k = self.options(m.end(), n, name)
        if self.ws(k, n) < n:
            raise self.error(self.ws(k, n), f"text after .{name}(...); it must take the whole prompt, as {shape}")
        if weights and len(weights) != len(items):
            raise self.error(m.end(), f".{name}() has {len(items)} prompts and {len(weights)} weights; expected "
                                      "one weight per prompt, or none")
        weights = weights or [1.0] * len(items)
        flat = [_fused(_flatten([item], 1.0)) for item in items]
        if name == "blend":
            if not all(flat):
                raise self.error(i, "an empty prompt cannot be blended")
            return ParsedPrompt("compel", (Blend(tuple(flat), tuple(weights), normalize),), (1.0,))
        kept = [(f, w) for f, w in zip(flat, weights) if f]  # compel drops empty parts with their weights
        return ParsedPrompt("compel", tuple(f for f, _ in kept), tuple(w for _, w in kept))

    def item_list(self, i: int, end: int, shape: str) -> tuple[list[_Node], int]:
        """Comma-separated quoted, parenthesised or one-word items; returns them and the index of the ')'."""
        s, items = self.text, []
        while True:
            i = self.ws(i, end)
            if i < end and s[i] == '"':
                node, i = self.quoted(i, end, fallback=True)
            else:
                got = self.target(i, end) if i < end else None
                if got is None:
                    raise self.error(i, f"expected a quoted prompt, as {shape}")
                node, i, _ = got
            items.append(node)
            i = self.ws(i, end)
            if i < end and s[i] == ")":
                return items, i
            if i >= end or s[i] != ",":
                raise self.error(i, f"expected ',' or ')' after an item; quote prompts of several words, as {shape}")
            i += 1

    def options(self, i: int, end: int, name: str) -> tuple[list[float], bool, int]:
        """The weights in .and(...) / .blend(...), and blend's trailing no_normalize flag."""
        close = self.text.find(")", i, end)
        if close < 0:
            raise self.error(i - 1, f"this '(' of .{name}( is never closed; expected ')'")
        raw = [o.strip() for o in self.text[i:close].split(",")] if self.text[i:close].strip() else []
        normalize = not (name == "blend" and raw and raw[-1] == "no_normalize")
        weights = []
        for option in raw[:-1] if not normalize else raw:
            if not _OPTION_NUMBER.fullmatch(option):
                flag = ", and no_normalize last" if name == "blend" else ""
                raise self.error(i, f".{name}() option {option!r} is not a weight; expected numbers{flag}")
            weights.append(float(option))
        return weights, normalize, close + 1
