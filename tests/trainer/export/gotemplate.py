"""Test support: the subset of Go's text/template that Ollama chat templates use, and Ollama's way of filling it.

Written from the Go documentation of text/template (trim markers, if / else if / range / variables, the builtin
functions eq ne and or not len slice) and from Ollama's template/template.go (collate) and server/routes.go (the
Modelfile SYSTEM). It exists so the TEMPLATE lines ft-desk writes can be executed in tests without Go or Ollama.
Anything outside the subset raises TemplateError instead of rendering something plausible: a renderer that guessed
would prove nothing. test_ollama.py pins its output against hand-computed Go results, and against the real Go
text/template package when a Go toolchain happens to be installed.

Data model, as Go sees Ollama's values: a dict is a Go map (a missing key gives nil, printed "<no value>"), a
GoStruct is a Go struct (a missing field is an error), str/int/bool/list are string/int/bool/slice, None is nil.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class TemplateError(Exception):
    """The template is not valid Go, uses syntax outside the supported subset, or fails when executed."""


class GoStruct(dict):
    """A Go struct value: reading a field it does not have is an execution error, as in Go."""


_SPACE = " \t\r\n"


# ----------------------------------------------------------------------------------------------------------- lexing

def _actions(source: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", inner) pieces, applying the `{{- ` and ` -}}` trim markers."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = source.find("{{", pos)
        if start < 0:
            pieces.append(("text", source[pos:]))
            return pieces
        text = source[pos:start]
        inner_start = start + 2
        # Go: a left trim marker is "-" followed by an ASCII space character; "{{-3}}" is the number -3.
        if source[inner_start:inner_start + 1] == "-" and source[inner_start + 1:inner_start + 2] in tuple(_SPACE):
            text = text.rstrip(_SPACE)
            inner_start += 1
        end = _action_end(source, inner_start)
        inner = source[inner_start:end]
        right_trim = len(inner) >= 2 and inner[-1] == "-" and inner[-2] in _SPACE
        if right_trim:
            inner = inner[:-1]
        pieces += [("text", text), ("action", inner)]
        pos = end + 2
        if right_trim:
            while pos < len(source) and source[pos] in _SPACE:
                pos += 1


def _action_end(source: str, pos: int) -> int:
    """Index of the `}}` closing the action that starts at pos (quotes may hold braces)."""
    quote = None
    while pos < len(source):
        ch = source[pos]
        if quote:
            if ch == "\\" and quote == '"':
                pos += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"`":
            quote = ch
        elif ch == "'":
            raise TemplateError("character constants are not supported")
        elif source.startswith("}}", pos):
            return pos
        pos += 1
    raise TemplateError("unclosed action: no matching }}")


@dataclass(frozen=True)
class _Tok:
    kind: str  # ident field var str int op
    text: str
    spaced: bool  # whitespace before it


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<op>:=|=|,|\(|\)|\|)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?[0-9][0-9A-Za-z_.+]*)
  | (?P<var>\$[A-Za-z_0-9]*)
  | (?P<field>\.[A-Za-z_][A-Za-z_0-9]*)
  | (?P<dot>\.)
  | (?P<ident>[A-Za-z_][A-Za-z_0-9]*)
""", re.VERBOSE)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unquote(literal: str) -> str:
    out, i, body = [], 0, literal[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            digits = body[i + 2:i + 2 + width]
            if not re.fullmatch(f"[0-9A-Fa-f]{{{width}}}", digits):
                raise TemplateError(f"bad escape in string {literal}")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        else:
            raise TemplateError(f"unsupported escape \\{nxt} in string {literal}")
    return "".join(out)


def _lex(inner: str) -> list[_Tok]:
    if inner.lstrip().startswith("/*"):
        raise TemplateError("comments are not supported")
    tokens, pos, spaced = [], 0, True
    while pos < len(inner):
        m = _TOKEN.match(inner, pos)
        if not m:
            raise TemplateError(f"unsupported character {inner[pos]!r} in action {{{{{inner}}}}}")
        kind, text = m.lastgroup, m.group()
        pos = m.end()
        if kind == "space":
            spaced = True
            continue
        if kind == "num":
            if not re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
                raise TemplateError(f"only decimal integer constants are supported, got {text}")
            kind = "int"
        elif kind == "raw":
            kind, text = "str", text[1:-1]
        elif kind == "str":
            text = _unquote(text)
        elif kind == "dot":
            kind = "field"
        if kind == "op" and text == "|":
            raise TemplateError("pipelines with | are not supported")
        tokens.append(_Tok(kind, text, spaced))
        spaced = False
    return tokens


# ---------------------------------------------------------------------------------------------------------- parsing

@dataclass
class _Text:
    text: str


@dataclass
class _Output:
    expr: Any


@dataclass
class _Assign:
    name: str
    declare: bool
    expr: Any


@dataclass
class _If:
    branches: list[tuple[Any, list]]
    otherwise: list | None


@dataclass
class _Range:
    names: tuple[str, ...]
    expr: Any
    body: list
    otherwise: list | None


_UNSUPPORTED = {"with", "define", "template", "block", "break", "continue", "nil"}


@dataclass
class _Parser:
    pieces: list[tuple[str, str]]
    pos: int = 0
    declared: list[list[str]] = field(default_factory=lambda: [["$"]])

    def parse(self) -> list:
        nodes, stop = self._list()
        if stop is not None:
            raise TemplateError(f"unexpected {{{{{stop[0]}}}}}")
        return nodes

    def _list(self) -> tuple[list, tuple[str, list[_Tok]] | None]:
        """Nodes up to the next {{else...}} / {{end}} (returned as the stop) or the end of the template."""
        nodes: list = []
        while self.pos < len(self.pieces):
            kind, value = self.pieces[self.pos]
            self.pos += 1
            if kind == "text":
                if value:
                    nodes.append(_Text(value))
                continue
            tokens = _lex(value)
            if not tokens:
                raise TemplateError("missing value for command")
            head = tokens[0].text if tokens[0].kind == "ident" else None
            if head in ("else", "end"):
                return nodes, (head, tokens[1:])
            if head in _UNSUPPORTED:
                raise TemplateError(f"{{{{{head}}}}} is not supported")
            if head == "if":
                nodes.append(self._if(tokens[1:]))
            elif head == "range":
                nodes.append(self._range(tokens[1:]))
            elif len(tokens) >= 2 and tokens[0].kind == "var" and tokens[1].text in (":=", "="):
                name, declare = tokens[0].text, tokens[1].text == ":="
                if not declare:
                    self._check_declared(name)
                expr = self._expr(tokens[2:])
                if declare:
                    self.declared[-1].append(name)
                nodes.append(_Assign(name, declare, expr))
            else:
                nodes.append(_Output(self._expr(tokens)))
        return nodes, None

    def _block(self) -> tuple[list, tuple[str, list[_Tok]]]:
        self.declared.append([])
        nodes, stop = self._list()
        self.declared.pop()
        if stop is None:
            raise TemplateError("unexpected EOF: missing {{end}}")
        return nodes, stop

    def _if(self, tokens: list[_Tok]) -> _If:
        branches = []
        while True:
            cond = self._expr(tokens)
            body, stop = self._block()
            branches.append((cond, body))
            if stop[0] == "end":
                if stop[1]:
                    raise TemplateError("unexpected tokens after end")
                return _If(branches, None)
            rest = stop[1]
            if not rest:
                otherwise, stop = self._block()
                if stop[0] != "end" or stop[1]:
                    raise TemplateError("expected {{end}} after {{else}}")
                return _If(branches, otherwise)
            if rest[0].kind == "ident" and rest[0].text == "if":
                tokens = rest[1:]
                continue
            raise TemplateError(f"{{{{else {rest[0].text}}}}} is not supported")

    def _range(self, tokens: list[_Tok]) -> _Range:
        names: tuple[str, ...] = ()
        ops = [t.text for t in tokens if t.kind == "op"]
        if "=" in ops:
            raise TemplateError("range with = assignment is not supported")
        if ":=" in ops:
            split = ops.index(":=")
            at = [i for i, t in enumerate(tokens) if t.kind == "op"][split]
            header = tokens[:at]
            if len(header) == 1 and header[0].kind == "var":
                names = (header[0].text,)
            elif len(header) == 3 and header[0].kind == "var" and header[1].text == "," and header[2].kind == "var":
                names = (header[0].text, header[2].text)
            else:
                raise TemplateError("range declarations must be `$x :=` or `$i, $x :=`")
            tokens = tokens[at + 1:]
        expr = self._expr(tokens)
        self.declared.append(list(names))
        body, stop = self._list()
        self.declared.pop()
        if stop is None:
            raise TemplateError("unexpected EOF: missing {{end}}")
        otherwise = None
        if stop[0] == "else":
            if stop[1]:
                raise TemplateError("only a plain {{else}} is supported in range")
            otherwise, stop = self._block()
        if stop[0] != "end" or stop[1]:
            raise TemplateError("expected {{end}} to close range")
        return _Range(names, expr, body, otherwise)

    def _check_declared(self, name: str) -> None:
        if not any(name in scope for scope in self.declared):
            raise TemplateError(f"undefined variable: {name}")

    # An expression is ("call", name, args) | ("get", base, fields) | ("const", value)
    # with base ("dot",) | ("var", name) | an expression in parentheses.
    def _expr(self, tokens: list[_Tok]) -> Any:
        if not tokens:
            raise TemplateError("missing value for command")
        terms, i = [], 0
        while i < len(tokens):
            term, i = self._term(tokens, i)
            terms.append(term)
        first = tokens[0]
        if first.kind == "ident":
            if first.text in ("true", "false"):
                if len(terms) > 1:
                    raise TemplateError("can't give argument to non-function")
                return terms[0]
            return ("call", first.text, terms[1:])
        if len(terms) > 1:
            raise TemplateError(f"can't give argument to non-function {first.text}")
        return terms[0]

    def _term(self, tokens: list[_Tok], i: int) -> tuple[Any, int]:
        """One argument: a constant, or a value (dot, variable, parenthesized pipeline) with a field chain."""
        tok = tokens[i]
        fields: list[str] = []
        if tok.kind == "op" and tok.text == "(":
            depth, j = 0, i
            while j < len(tokens):
                if tokens[j].kind == "op" and tokens[j].text == "(":
                    depth += 1
                elif tokens[j].kind == "op" and tokens[j].text == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            else:
                raise TemplateError("unclosed left paren")
            base, i = self._expr(tokens[i + 1:j]), j + 1
        elif tok.kind == "field":
            base, i = ("dot",), i + 1
            if tok.text != ".":
                fields.append(tok.text[1:])
        elif tok.kind == "var":
            self._check_declared(tok.text)
            base, i = ("var", tok.text), i + 1
        elif tok.kind in ("str", "int"):
            return ("const", int(tok.text) if tok.kind == "int" else tok.text), i + 1
        elif tok.kind == "ident":
            if tok.text in ("true", "false"):
                return ("const", tok.text == "true"), i + 1
            if tok.text in _UNSUPPORTED:
                raise TemplateError(f"{tok.text} is not supported")
            if i != 0:
                raise TemplateError(f"function {tok.text} used as an argument needs parentheses")
            return ("fn", tok.text), i + 1
        else:
            raise TemplateError(f"unexpected {tok.text!r}")
        # A field chain continues only without a space: `$m.Role` is one argument, `$m .Role` two.
        while i < len(tokens) and tokens[i].kind == "field" and tokens[i].text != "." and not tokens[i].spaced:
            fields.append(tokens[i].text[1:])
            i += 1
        return ("get", base, tuple(fields)), i


def parse(source: str) -> list:
    """The parsed template (a list of nodes); raises TemplateError for anything outside the subset."""
    return _Parser(_actions(source)).parse()


def field_names(source: str) -> set[str]:
    """Every field and variable name the template reads (what Ollama's Template.Vars looks at)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, tuple):
            if node and node[0] == "get":
                names.update(node[2])
            for item in node:
                walk(item)
        elif isinstance(node, (_If, _Range, _Output, _Assign)):
            for value in vars(node).values():
                walk(value)

    walk(parse(source))
    return names


# -------------------------------------------------------------------------------------------------------- execution

def _truth(value: Any) -> bool:
    if isinstance(value, GoStruct):
        return True
    if value is None:
        return False
    if isinstance(value, (bool, int, str, list, dict)):
        return bool(value)
    raise TemplateError(f"cannot take the truth of {type(value).__name__}")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "string"
    raise TemplateError(f"invalid type for comparison: {type(value).__name__}")


def _eq(*args: Any) -> bool:
    if len(args) < 2:
        raise TemplateError("missing argument for comparison")
    first = args[0]
    for other in args[1:]:
        if _kind(first) != _kind(other):
            raise TemplateError("incompatible types for comparison")
        if first == other:
            return True
    return False


def _length(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))  # Go's len counts bytes
    if isinstance(value, (list, dict)) and not isinstance(value, GoStruct):
        return len(value)
    raise TemplateError(f"len of {type(value).__name__}")


def _slice(value: Any, *indexes: Any) -> Any:
    if not isinstance(value, list):
        raise TemplateError(f"can't slice item of type {type(value).__name__}")
    if len(indexes) > 2 or any(isinstance(i, bool) or not isinstance(i, int) for i in indexes):
        raise TemplateError("slice takes at most two integer indexes here")
    low = indexes[0] if indexes else 0
    high = indexes[1] if len(indexes) > 1 else len(value)
    if not 0 <= low <= high <= len(value):
        raise TemplateError(f"index out of range: [{low}:{high}] with length {len(value)}")
    return value[low:high]


class _Exec:
    def __init__(self, data: Any):
        self.stack: list[list[Any]] = [["$", data]]
        self.out: list[str] = []

    def lookup(self, name: str) -> Any:
        for entry in reversed(self.stack):
            if entry[0] == name:
                return entry[1]
        raise TemplateError(f"undefined variable: {name}")

    def assign(self, name: str, value: Any) -> None:
        for entry in reversed(self.stack):
            if entry[0] == name:
                entry[1] = value
                return
        raise TemplateError(f"undefined variable: {name}")

    def walk(self, nodes: list, dot: Any) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                self.out.append(node.text)
            elif isinstance(node, _Output):
                self.out.append(self.show(self.eval(node.expr, dot)))
            elif isinstance(node, _Assign):
                value = self.eval(node.expr, dot)
                if node.declare:
                    self.stack.append([node.name, value])
                else:
                    self.assign(node.name, value)
            elif isinstance(node, _If):
                self.run_if(node, dot)
            else:
                self.run_range(node, dot)

    def scoped(self, nodes: list, dot: Any) -> None:
        mark = len(self.stack)
        self.walk(nodes, dot)
        del self.stack[mark:]

    def run_if(self, node: _If, dot: Any) -> None:
        for cond, body in node.branches:
            if _truth(self.eval(cond, dot)):
                self.scoped(body, dot)
                return
        if node.otherwise is not None:
            self.scoped(node.otherwise, dot)

    def run_range(self, node: _Range, dot: Any) -> None:
        items = self.eval(node.expr, dot)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise TemplateError(f"range can't iterate over {type(items).__name__}")
        if not items:
            if node.otherwise is not None:
                self.scoped(node.otherwise, dot)
            return
        for index, item in enumerate(items):
            mark = len(self.stack)
            if len(node.names) == 1:
                self.stack.append([node.names[0], item])
            elif len(node.names) == 2:
                self.stack += [[node.names[0], index], [node.names[1], item]]
            self.walk(node.body, item)
            del self.stack[mark:]

    def eval(self, expr: Any, dot: Any) -> Any:
        kind = expr[0]
        if kind == "const":
            return expr[1]
        if kind == "get":
            base = expr[1]
            value = dot if base[0] == "dot" else self.lookup(base[1]) if base[0] == "var" else self.eval(base, dot)
            for name in expr[2]:
                value = self.field(value, name)
            return value
        if kind == "fn":
            raise TemplateError(f"function {expr[1]} called without its arguments")
        return self.call(expr[1], expr[2], dot)

    @staticmethod
    def field(value: Any, name: str) -> Any:
        if isinstance(value, GoStruct):
            if name not in value:
                raise TemplateError(f"can't evaluate field {name} in a message")
            return value[name]
        if isinstance(value, dict):
            return value.get(name)  # a map with missingkey=zero (how Ollama executes templates)
        raise TemplateError(f"can't evaluate field {name} in type {type(value).__name__}")

    def call(self, name: str, args: list, dot: Any) -> Any:
        if name in ("and", "or"):  # Go 1.18+: evaluation stops at the deciding argument, which is returned
            if not args:
                raise TemplateError(f"wrong number of args for {name}")
            value = None
            for arg in args:
                value = self.eval(arg, dot)
                if _truth(value) == (name == "or"):
                    return value
            return value
        values = [self.eval(arg, dot) for arg in args]
        if name == "eq":
            return _eq(*values)
        if name == "ne":
            if len(values) != 2:
                raise TemplateError("wrong number of args for ne: want 2")
            return not _eq(*values)
        if name == "not":
            if len(values) != 1:
                raise TemplateError("wrong number of args for not: want 1")
            return not _truth(values[0])
        if name == "len":
            if len(values) != 1:
                raise TemplateError("wrong number of args for len: want 1")
            return _length(values[0])
        if name == "slice":
            if not values:
                raise TemplateError("wrong number of args for slice")
            return _slice(*values)
        raise TemplateError(f"function {name!r} is not supported")

    @staticmethod
    def show(value: Any) -> str:
        if value is None:
            return "<no value>"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, str)):
            return str(value)
        raise TemplateError(f"printing a {type(value).__name__} is not supported")


def render(source: str, data: Any) -> str:
    """Execute a Go text/template (the supported subset) on data, as Go would."""
    runner = _Exec(data)
    runner.walk(parse(source), data)
    return "".join(runner.out)


# ----------------------------------------------------------------------------------------------------------- ollama

def _message(role: str, content: str) -> GoStruct:
    """An api.Message as a template sees it (the fields chat templates read)."""
    return GoStruct(Role=role, Content=content, Thinking="", Images=[], ToolCalls=[], ToolName="")


def ollama_values(messages: list[dict[str, str]], system_default: str | None = None,
                  keep_system_in_messages: bool = True) -> dict[str, Any]:
    """What Ollama executes a chat TEMPLATE with, for a chat request (and a Modelfile SYSTEM, if given).

    - A Modelfile SYSTEM is prepended as a system message when the request's first message is not one.
    - collate: all system contents, joined with a blank line, become .System; consecutive messages of one role
      (tool messages excepted) are merged with a blank line between. Current Ollama keeps the system messages in
      .Messages too (keep_system_in_messages=True); older versions dropped them (False).
    - The template gets System, Messages, Tools and an empty Response.
    """
    msgs = [dict(m) for m in messages]
    if system_default and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system_default})
    system: list[str] = []
    collated: list[GoStruct] = []
    for m in msgs:
        if m["role"] == "system":
            system.append(m["content"])
            if not keep_system_in_messages:
                continue
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append(_message(m["role"], m["content"]))
    return {"System": "\n\n".join(system), "Messages": collated, "Tools": [], "Response": ""}


def ollama_render(template: str, messages: list[dict[str, str]], system_default: str | None = None,
                  keep_system_in_messages: bool = True) -> str:
    """The prompt Ollama builds from a chat request with this Modelfile TEMPLATE (see ollama_values)."""
    if "Messages" not in field_names(template):
        raise TemplateError("a template without .Messages takes Ollama's legacy prompt/response path, "
                            "which this helper does not emulate")
    return render(template, ollama_values(messages, system_default, keep_system_in_messages))


_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}


def _modelfile_unquote(text: str) -> tuple[str, bool]:
    if text.startswith('"""'):
        return (text[3:-3], True) if len(text) >= 6 and text.endswith('"""') else ("", False)
    if text.startswith('"'):
        return (text[1:-1], True) if len(text) >= 2 and text.endswith('"') else ("", False)
    return text, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's Modelfile parser reads them; a PARAMETER is named by its parameter.

    Following Ollama's parser/parser.go: a value runs to the first line end at which it is complete (a value opened
    with \"\"\" or " must have closed), surrounding space is trimmed, the quotes are removed and nothing is
    unescaped; control characters other than tab and line ends are dropped.
    """
    commands: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
            continue
        name = re.match(r"[A-Za-z]*", text[i:]).group()
        i += len(name)
        name = name.lower()
        if name not in _COMMANDS or i >= n or text[i] not in " \t":
            raise ValueError(f"invalid Modelfile command at offset {i}")
        i += 1
        if name == "parameter":
            name = re.match(r"[A-Za-z0-9_]*", text[i:]).group()
            i += len(name)
            if not name or i >= n or text[i] not in " \t":
                raise ValueError(f"invalid PARAMETER at offset {i}")
            i += 1
        buffer: list[str] = []
        while True:
            if i >= n or text[i] in "\r\n":
                value, complete = _modelfile_unquote("".join(buffer).strip())
                if complete:
                    break
                if i >= n:
                    raise ValueError(f"unexpected end of Modelfile in the value of {name}")
            if text[i].isprintable() or text[i] in "\t\r\n":
                buffer.append(text[i])
            i += 1
        commands.append((name, value))
    return commands


# ------------------------------------------------------------------------------------- the real Go, when installed

_GO_PROGRAM = """package main

// Executes each job's template with Go's own text/template, the way Ollama does (missingkey=zero),
// and prints the outputs or errors as JSON. Messages are structs, as Ollama's api.Message is.
import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role      string
	Content   string
	Thinking  string
	Images    []string
	ToolCalls []any
	ToolName  string
}

type job struct {
	Template string         `json:"template"`
	Data     map[string]any `json:"data"`
	Messages []*Message     `json:"messages"`
}

func main() {
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	results := make([]map[string]string, len(jobs))
	for i, j := range jobs {
		if j.Messages != nil {
			j.Data["Messages"] = j.Messages
		}
		var out strings.Builder
		t, err := template.New("").Option("missingkey=zero").Parse(j.Template)
		if err == nil {
			err = t.Execute(&out, j.Data)
		}
		if err != nil {
			results[i] = map[string]string{"error": err.Error()}
		} else {
			results[i] = map[string]string{"out": out.String()}
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
"""


def go_toolchain() -> str | None:
    """Path of the `go` command, when one is installed (it is optional: tests that need it are skipped)."""
    import shutil

    return shutil.which("go")


def build_go_renderer(folder) -> str:
    """Compile the Go program above into folder; returns the executable's path."""
    import subprocess
    from pathlib import Path

    source = Path(folder) / "render.go"
    source.write_text(_GO_PROGRAM, encoding="utf-8")
    exe = Path(folder) / "render"
    subprocess.run([go_toolchain(), "build", "-o", str(exe), str(source)], check=True, cwd=folder,
                   capture_output=True, text=True)
    return str(exe)


def go_render(exe: str, jobs: list[tuple[str, Any]]) -> list[dict[str, str]]:
    """Run (template, data) jobs through real Go; each result is {"out": text} or {"error": message}."""
    import json
    import subprocess

    payload = []
    for source, data in jobs:
        data = dict(data)
        messages = data.get("Messages")
        job = {"template": source, "data": data, "messages": None}
        if isinstance(messages, list) and messages and all(isinstance(m, GoStruct) for m in messages):
            job["messages"] = [dict(m) for m in data.pop("Messages")]
        payload.append(job)
    done = subprocess.run([exe], input=json.dumps(payload), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)
