"""`ft-desk chat RUN_DIR`: talk to a trained model - the adapter on its base, loaded the way it was trained.

Interactive in a terminal (type a message, get the reply streamed; `/base` toggles answering with the base model,
adapter off; `/reset` clears the conversation). With `--events jsonl` it is the TUI's chat playground: it reads
one JSON request per stdin line, {"messages": [{"role", "content"}...], "base": bool, "max_new_tokens": int},
and writes events on stdout: chat_ready (model, device, checkpoint, base_available) once loaded, then per request
chat_token (text) pieces as they are generated and one chat_done (text, tokens, seconds, stopped) or chat_error
(error, hint). A request may also carry "system" (a system prompt), "temperature" (above 0 samples, 0 or absent is
greedy) and "top_p". Prompts are rendered exactly as in training: a run trained on conversations gets the chat
template (or the plain rendering it trained with); a run trained on raw {"text"} rows never saw a template, so its
prompt is the conversation's texts joined by newlines, continued as plain text (chat_ready says which: format).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ft_desk.trainer import run_folder
from ft_desk.trainer.chat_format import stop_token_ids
from ft_desk.trainer.data.formats import Example, Message
from ft_desk.trainer.data.prepare import generation_prompt
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT, make_event, read_events, stdout_sink
from ft_desk.trainer.generation import Sampling, generate, inference_weights
from ft_desk.trainer.limits import MAX_NEW_TOKENS, int_arg
from ft_desk.trainer.run_folder import checkpoint_folder
from ft_desk.trainer.training.model import load_trained
from ft_desk.trainer.training.threads import apply_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run folder or a run's name (see: ft-desk runs)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a step number")
    parser.add_argument("--max-new-tokens", type=int_arg(1, MAX_NEW_TOKENS), default=256,
                        help=f"longest reply in tokens, 1 to {MAX_NEW_TOKENS} (default 256)")
    parser.add_argument("--system", default="", help="a system prompt put before the conversation")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 answers greedily (default); above 0 samples with this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling [default: 1.0]")
    parser.add_argument("--base", action="store_true", help="start by answering with the base model (adapter off)")
    parser.add_argument("--events", choices=["jsonl"], default=None,
                        help="jsonl: read JSON requests on stdin, write events on stdout (the app uses this)")


def run_data_format(run_dir: Path) -> str:
    """The format the run trained on (its data_ready event; else its val.jsonl rows): "text" or a chat format."""
    for event in read_events(run_folder.events_path(run_dir)):
        if event.get("type") == "data_ready" and event.get("format"):
            return str(event["format"])
    try:
        with open(run_folder.val_path(run_dir), encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return "chat"
    return "text" if isinstance(first, dict) and "text" in first and "messages" not in first else "chat"


def _prompt_ids(messages: list[dict[str, str]], tokenizer, cfg, raw_text: bool = False,
                system: str = "") -> list[int]:
    """Token ids of the conversation followed by the assistant's turn, rendered as training renders it
    (raw_text: the turns' texts joined by newlines, as a text row the model continues)."""
    if not messages or messages[-1].get("role") != "user":
        raise UserError("a chat request must end with a user message",
                        hint="put the user's new message last in \"messages\"")
    if system.strip():
        messages = [{"role": "system", "content": system.strip()}] + [m for m in messages if m.get("role") != "system"]
    if raw_text:
        text = "\n".join(str(m.get("content", "")) for m in messages)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])[-cfg.data.max_length:]
    turns = tuple(Message(str(m.get("role")), str(m.get("content", ""))) for m in messages)
    # The placeholder reply only marks where generation starts; it is never rendered.
    example = Example(messages=turns + (Message("assistant", "."),), text=None, where="chat")
    ids, _reference = generation_prompt(example, tokenizer, cfg.data)
    return ids


class _Streamer:
    """Receives each new token id from generate() (same thread) and emits decoded text as it becomes printable."""

    def __init__(self, tokenizer, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.sent = 0

    def put(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


class ChatModel:
    def __init__(self, run_dir: Path, checkpoint: str) -> None:
        self.model, self.tokenizer, self.cfg = load_trained(run_dir, checkpoint)
        self.checkpoint = checkpoint_folder(run_dir, checkpoint).name
        self.stop_ids = stop_token_ids(self.tokenizer, vocabulary_fallback=True)
        self.device = next(self.model.parameters()).device
        apply_threads(self.cfg.train.threads)  # 0: the cores other work leaves free
        # CPU: the 4-bit weights dequantized once for the whole session, not once per reply (or per token).
        self._dense = contextlib.ExitStack()
        self._dense.enter_context(inference_weights(self.model, self.device))
        self.base_available = hasattr(self.model, "disable_adapter")
        self.format = run_data_format(run_dir)
        self.raw_text = self.format == "text"

    def reply(self, messages: list[dict[str, str]], base: bool, max_new_tokens: int,
              emit: Callable[[str], None], system: str = "", temperature: float = 0.0,
              top_p: float = 1.0) -> dict[str, Any]:
        if base and not self.base_available:
            raise UserError("this run trained every weight (method full): there is no adapter to turn off",
                            hint="chat with the tuned model, or train a LoRA run to compare with the base")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive int, got {max_new_tokens}")
        if temperature < 0:
            raise UserError(f"temperature must be 0 (greedy) or above, got {temperature}")
        if not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")
        sampling = Sampling(temperature, top_p, int(time.time())) if temperature > 0 else None
        ids = _prompt_ids(messages, self.tokenizer, self.cfg, self.raw_text, system)
        streamer = _Streamer(self.tokenizer, emit)
        started = time.time()
        adapter_off = self.model.disable_adapter() if base else contextlib.nullcontext()
        with adapter_off:
            (answer,) = generate(self.model, self.tokenizer, [ids], max_new_tokens=max_new_tokens,
                                 stop_ids=self.stop_ids, device=self.device, on_token=streamer.put,
                                 sampling=sampling)
        streamer.end()
        return {"text": answer.text, "tokens": answer.tokens, "seconds": round(time.time() - started, 3),
                "stopped": answer.stopped}


def run(args: argparse.Namespace) -> int:
    run_dir = run_folder.resolve_run(args.run_dir)
    if args.events == "jsonl":
        return _serve(run_dir, args)
    return _interactive(run_dir, args)


def _serve(run_dir: Path, args: argparse.Namespace) -> int:
    sink = stdout_sink()
    try:
        chat = ChatModel(run_dir, args.checkpoint)
    except UserError as err:
        sink.emit(make_event("chat_error", error=err.message, hint=err.hint or None, fatal=True,
                             exit_code=EXIT_BAD_INPUT))
        err.reported = True  # cli/main.py prints no second failure
        raise
    sink.emit(make_event("chat_ready", model=chat.cfg.model.name, device=str(chat.device),
                         checkpoint=chat.checkpoint, base_available=chat.base_available, format=chat.format))
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            messages, base, max_new_tokens = parse_request(line, args.max_new_tokens)
            request = json.loads(line)  # valid: parse_request checked it
            result = chat.reply(messages, base, max_new_tokens,
                                lambda text: sink.emit(make_event("chat_token", text=text)),
                                system=str(request.get("system") or ""),
                                temperature=float(request.get("temperature") or 0.0),
                                top_p=float(request.get("top_p") or 1.0))
        except UserError as err:
            sink.emit(make_event("chat_error", error=err.message, hint=err.hint or None))
            continue
        except Exception as exc:  # noqa: BLE001 - one failed reply must not end the playground; the log has why
            log = _log_traceback(run_dir, exc)
            sink.emit(make_event("chat_error", error=f"internal error: {type(exc).__name__}: {str(exc)[:200]}",
                                 hint=f"this is a bug in ft-desk; the traceback is in {log}"))
            continue
        sink.emit(make_event("chat_done", **result))
    return 0


REQUEST_HINT = ('send one JSON object a line: {"messages": [{"role": "user", "content": "..."}], '
                '"base": false, "max_new_tokens": 256}')
MAX_REQUEST_CHARS = 4 * 1024 * 1024
"""Longest request line (a whole conversation); a longer one is refused before it is parsed."""


def parse_request(line: str, default_max_new_tokens: int) -> tuple[list[dict[str, str]], bool, int]:
    """(messages, base, max_new_tokens) of one stdin request line, or a UserError saying what is wrong with it."""
    if len(line) > MAX_REQUEST_CHARS:
        raise UserError(f"bad request: the line is {len(line)} characters long (at most {MAX_REQUEST_CHARS})",
                        hint=REQUEST_HINT)
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise UserError(f"bad request: not JSON ({exc})", hint=REQUEST_HINT) from None
    if not isinstance(request, dict):
        raise UserError(f"bad request: expected a JSON object, got {type(request).__name__}", hint=REQUEST_HINT)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError("bad request: \"messages\" must be a non-empty list", hint=REQUEST_HINT)
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content", ""), str)):
            raise UserError(f"bad request: messages[{i}] must be an object with a string role and content",
                            hint=REQUEST_HINT)
    base = request.get("base", False)
    if not isinstance(base, bool):
        raise UserError("bad request: \"base\" must be true or false", hint=REQUEST_HINT)
    limit = request.get("max_new_tokens")
    if limit is None:
        limit = default_max_new_tokens
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_NEW_TOKENS:
        raise UserError(f"bad request: \"max_new_tokens\" must be an int from 1 to {MAX_NEW_TOKENS}, "
                        f"got {limit!r}", hint=REQUEST_HINT)
    return [{"role": m["role"], "content": m.get("content", "")} for m in messages], base, limit


def _log_traceback(run_dir: Path, exc: BaseException) -> Path:
    """Append a failed reply's traceback to the run's run.log (redacted, as every log line is)."""
    import traceback

    from ft_desk.trainer.hub.credentials import redact

    path = run_folder.log_path(run_dir)
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
        f.write(redact(f"{run_folder.now_iso()} chat reply failed:\n" + "".join(traceback.format_exception(exc))))
    return path


def _interactive(run_dir: Path, args: argparse.Namespace) -> int:
    print(f"loading {run_dir.name}…", file=sys.stderr)
    chat = ChatModel(run_dir, args.checkpoint)
    base = args.base
    history: list[dict[str, str]] = []
    print(f"{chat.cfg.model.name} + {chat.checkpoint} on {chat.device}. /base toggles the base model, /reset clears, "
          "Ctrl-D quits.", file=sys.stderr)
    if chat.raw_text:
        print("This run trained on raw text rows: what you type is continued as plain text (no chat template).",
              file=sys.stderr)
    while True:
        try:
            text = input("base> " if base else "you> ").strip()
        except EOFError:
            print()
            return 0
        if text == "/base":
            base = not base
            print("answering with the base model (adapter off)" if base else "answering with the tuned model")
            continue
        if text == "/reset":
            history.clear()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            result = chat.reply(history, base, args.max_new_tokens, lambda t: print(t, end="", flush=True),
                                system=args.system, temperature=args.temperature, top_p=args.top_p)
        except UserError as err:
            print(f"\n{err.full()}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": result["text"]})
