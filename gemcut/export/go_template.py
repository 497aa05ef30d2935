"""Render the subset of Go's text/template that Ollama chat templates use, to check a translation before shipping it.

    python -m pytest -q tests/test_export_ollama.py

Ollama renders a Modelfile's TEMPLATE with Go's text/template. gemcut writes such templates
(gemcut/export/ollama.py) and renders them here, on the same conversations, to prove the text equals what
the run's Jinja template gives. Supported, as Go defines them: literal text; `{{ ... }}` actions with `{{-`
and `-}}` whitespace trimming; `.Field` on the current value, `$.Field` on the root, `$var`, `(expr).Field`;
string and integer literals; `if` / `else if` / `else` / `end`; `range $i, $v := expr`; `$x := expr`; the
functions eq, ne, and, or, not, len, slice, index. Anything else raises ValueError naming the action.
"""

from __future__ import annotations

import json
import re
from typing import Any

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|\$?\w*(?:\.\w+)+|\$\w*|\.\w+|\.|-?\d+|\w+)')
FUNCTIONS = ("eq", "ne", "and", "or", "not", "len", "slice", "index")


def truthy(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings, slices and maps are false."""
    return bool(value)


def parse(source: str) -> list:
    """Nodes: ("text", s), ("out", expr), ("set", name, expr), ("if", [(cond, body), ...], else_body),
    ("range", index_var, value_var, expr, body)."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    for match in ACTION.finditer(source):
        text = source[pos:match.start()]
        if match.group(1):
            text = text.rstrip()
        pieces.append(("text", text))
        pieces.append(("action", match.group(2).strip()))
        pos = match.end()
        if match.group(3):
            rest = source[pos:]
            pos += len(rest) - len(rest.lstrip())
    pieces.append(("text", source[pos:]))
    nodes, rest = parse_block(pieces, 0)
    if rest != len(pieces):
        raise ValueError(f"unexpected {{{{ {pieces[rest][1]} }}}}")
    return nodes


def parse_block(pieces: list[tuple[str, str]], i: int) -> tuple[list, int]:
    """Nodes from piece i up to (not including) an `end`/`else` action; returns them and that index."""
    nodes: list = []
    while i < len(pieces):
        kind, body = pieces[i]
        if kind == "text":
            if body:
                nodes.append(("text", body))
            i += 1
        elif body == "end" or body.startswith("else"):
            return nodes, i
        elif body.startswith("if "):
            branches, otherwise = [], []
            cond = body[3:]
            while True:
                block, i = parse_block(pieces, i + 1)
                branches.append((cond, block))
                if i >= len(pieces):
                    raise ValueError(f"{{{{ if {cond} }}}} has no {{{{ end }}}}")
                closing = pieces[i][1]
                if closing.startswith("else if "):
                    cond = closing[8:]
                    continue
                if closing == "else":
                    otherwise, i = parse_block(pieces, i + 1)
                break
            i += 1
            nodes.append(("if", branches, otherwise))
        elif body.startswith("range "):
            m = re.fullmatch(r"range\s+(?:(\$\w*)\s*,\s*(\$\w*)\s*:=\s*)?(.+)", body, re.S)
            block, i = parse_block(pieces, i + 1)
            i += 1
            nodes.append(("range", m.group(1), m.group(2), m.group(3), block))
        elif re.match(r"\$\w+\s*:=", body):
            name, expr = body.split(":=", 1)
            nodes.append(("set", name.strip(), expr.strip()))
            i += 1
        else:
            nodes.append(("out", body))
            i += 1
    return nodes, i


class Scope:
    def __init__(self, root: Any):
        self.root = root
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")


def field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name)


def evaluate(expr: str, dot: Any, scope: Scope) -> Any:
    tokens = [t for t in TOKEN.findall(expr)]
    if "".join(tokens).replace(" ", "") != expr.replace(" ", "").replace("\n", "").replace("\t", ""):
        raise ValueError(f"{{{{ {expr} }}}}: unsupported syntax for gemcut's Go template renderer")
    value, end = command(tokens, 0, dot, scope)
    if end != len(tokens):
        raise ValueError(f"{{{{ {expr} }}}}: unexpected {tokens[end]!r}")
    return value


def command(tokens: list[str], i: int, dot: Any, scope: Scope) -> tuple[Any, int]:
    """A function call (name then operands up to ')' or the end) or a single operand."""
    if tokens[i] in FUNCTIONS:
        name, i = tokens[i], i + 1
        args = []
        while i < len(tokens) and tokens[i] != ")":
            value, i = operand(tokens, i, dot, scope)
            args.append(value)
        return call(name, args), i
    return operand(tokens, i, dot, scope)


def operand(tokens: list[str], i: int, dot: Any, scope: Scope) -> tuple[Any, int]:
    token = tokens[i]
    if token == "(":
        value, i = command(tokens, i + 1, dot, scope)
        if i >= len(tokens) or tokens[i] != ")":
            raise ValueError("unbalanced parentheses")
        i += 1
        while i < len(tokens) and re.fullmatch(r"(\.\w+)+", tokens[i]):  # (expr).Field
            for name in tokens[i].split(".")[1:]:
                value = field(value, name)
            i += 1
        return value, i
    if token.startswith('"'):
        return json.loads(token), i + 1
    if re.fullmatch(r"-?\d+", token):
        return int(token), i + 1
    if token == ".":
        return dot, i + 1
    if token.startswith("."):
        value = dot
        for name in token.split(".")[1:]:
            value = field(value, name)
        return value, i + 1
    if token.startswith("$"):
        head, *names = token.split(".")
        value = scope.lookup(head)
        for name in names:
            value = field(value, name)
        return value, i + 1
    raise ValueError(f"unsupported operand {token!r}")


def call(name: str, args: list) -> Any:
    if name == "eq":
        return any(args[0] == other for other in args[1:])
    if name == "ne":
        return args[0] != args[1]
    if name == "and":
        result = True
        for arg in args:
            result = arg
            if not truthy(arg):
                return arg
        return result
    if name == "or":
        for arg in args:
            if truthy(arg):
                return arg
        return args[-1]
    if name == "not":
        return not truthy(args[0])
    if name == "len":
        return len(args[0])
    if name == "slice":
        return args[0][args[1]:args[2]] if len(args) > 2 else args[0][args[1]:]
    if name == "index":
        value = args[0]
        for key in args[1:]:
            value = value[key]
        return value
    raise ValueError(f"unknown function {name}")


def text_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def run(nodes: list, dot: Any, scope: Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(text_of(evaluate(node[1], dot, scope)))
        elif kind == "set":
            scope.frames[-1][node[1]] = evaluate(node[2], dot, scope)
        elif kind == "if":
            for cond, body in node[1]:
                if truthy(evaluate(cond, dot, scope)):
                    run(body, dot, scope, out)
                    break
            else:
                run(node[2], dot, scope, out)
        elif kind == "range":
            _, index_var, value_var, expr, body = node
            for index, item in enumerate(evaluate(expr, dot, scope) or []):
                scope.frames.append({index_var: index, value_var: item} if index_var else {})
                run(body, item, scope, out)
                scope.frames.pop()


def render_go_template(source: str, data: dict) -> str:
    """Render `source` (Go text/template, the subset above) with `data` as the root value (`.` and `$`)."""
    out: list[str] = []
    run(parse(source), data, Scope(data), out)
    return "".join(out)
