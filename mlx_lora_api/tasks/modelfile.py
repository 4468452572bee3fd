"""The Ollama Modelfile beside a GGUF export: `FROM`, a `TEMPLATE` in Go's text/template (as
Ollama reads it) that renders a conversation exactly as the model's own chat template does, and
the `stop` tokens that end an assistant's turn.

Ollama cannot run a Hugging Face (Jinja) chat template, so the template is derived by example:
the Jinja template is rendered on conversations whose contents are markers, and the text between
the markers is what comes between two messages (by the roles on either side), before the first
and after the last. The Go template then prints those pieces around each message's content. The
derivation is checked by rendering both on real conversations; a chat template that is not built
this way (one that rewrites contents, or treats the last turn apart) gets no `TEMPLATE`, and the
export says so. Contents go in as given: a template that trims them (Llama 3's does) differs on
contents with leading or trailing spaces. No MLX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Stand-ins for message contents while the template is rendered: text no template alters.
S, U1, A1, U2 = (f"\x1e{name}\x1e" for name in ("S", "U1", "A1", "U2"))
CHECKS = [  # conversations the derived template must render exactly as the chat template does
    [("user", "What is the capital of France?")],
    [("system", "You answer briefly."), ("user", "Hi!")],
    [("user", "Hi!"), ("assistant", "Hello. How can I help?"), ("user", "Name a colour.")],
    [("system", "Be kind."), ("user", "1+1?"), ("assistant", "2"), ("user", "2+2?"), ("assistant", "4"), ("user", "x")],
]
# (role before, role) -> the text between them; "" is the start of the conversation
TRANSITIONS = [("", "system"), ("", "user"), ("system", "user"), ("user", "assistant"), ("assistant", "user")]


class NoTemplate(ValueError):
    """The chat template cannot be written as an Ollama template; the reason says why."""


def modelfile(gguf_name: str, model_dir: Path, adds_bos: bool) -> tuple[str, str | None]:
    """The Modelfile's text, and why it has no TEMPLATE (None when it has one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lines = [f"FROM ./{gguf_name}"]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    reason = None
    try:
        pieces = derive(tokenizer, adds_bos)
    except NoTemplate as e:
        reason = str(e)
    else:
        lines.append(f'TEMPLATE """{go_template(pieces)}"""')
        turn_end = _turn_end(tokenizer, pieces[("assistant", "user")])
        stops += [turn_end] if turn_end and turn_end not in stops else []
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]  # Ollama takes what is between the quotes
    return "\n".join(lines) + "\n", reason


def derive(tokenizer: Any, adds_bos: bool) -> dict[tuple[str, str], str]:
    """The text between messages by the roles around them, with ("user", "") the text after a
    final user message (the prompt for the assistant's answer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoTemplate("the model has no chat template")
    bos = tokenizer.bos_token if adds_bos else None  # llama.cpp adds it itself: not in the text too

    def render(messages: list[tuple[str, str]]) -> str:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a template may refuse a role (some have no system role)
            raise NoTemplate(f"the chat template refuses {[r for r, _ in messages]}: {e}") from e
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def between(text: str, marks: list[str]) -> list[str]:
        parts = []
        for mark in marks:
            before, found, text = text.partition(mark)
            if not found or mark in text:
                raise NoTemplate("the chat template does not print each message's content once, as given")
            parts.append(before)
        return [*parts, text]

    start_s, s_u, u_a, a_u, end = between(
        render([("system", S), ("user", U1), ("assistant", A1), ("user", U2)]), [S, U1, A1, U2]
    )
    start_u, end_alone = between(render([("user", U1)]), [U1])
    if end_alone != end:
        raise NoTemplate("the chat template ends a conversation differently by its length")
    pieces = {
        ("", "system"): start_s,
        ("", "user"): start_u,
        ("system", "user"): s_u,
        ("user", "assistant"): u_a,
        ("assistant", "user"): a_u,
        ("user", ""): end,
    }
    for conversation in CHECKS:
        if render(conversation) != render_pieces(pieces, conversation):
            raise NoTemplate("the chat template is not the same pieces around each message")
    return pieces


def render_pieces(pieces: dict[tuple[str, str], str], conversation: list[tuple[str, str]]) -> str:
    """What the Go template prints for a conversation (written again here, to check the derivation)."""
    text, before = "", ""
    for role, content in conversation:
        text += pieces.get((before, role), "") + content
        before = role
    return text + (pieces[("user", "")] if before == "user" else "")


def go_template(pieces: dict[tuple[str, str], str]) -> str:
    """The pieces in Go's text/template, on one line: nothing outside its actions is printed, so
    no whitespace trimming can touch the pieces (each a Go string literal)."""

    def action(inside: str) -> str:
        return "{{ " + inside + " }}"

    def literal(text: str) -> str:
        return action(json.dumps(text, ensure_ascii=False))  # a JSON string without \\u escapes is a Go string

    parts = [action('$before := ""'), action("range .Messages")]
    for i, (before, role) in enumerate(TRANSITIONS):
        condition = f'and (eq $before "{before}") (eq .Role "{role}")'
        parts += [action(("if " if i == 0 else "else if ") + condition), literal(pieces[before, role])]
    parts += [action("end"), action(".Content"), action("$before = .Role"), action("end")]
    parts += [action('if eq $before "user"'), literal(pieces["user", ""]), action("end")]
    template = "".join(parts)
    if '"""' in template:
        raise NoTemplate('the chat template holds """, which a Modelfile cannot quote')
    return template


def _turn_end(tokenizer: Any, after_assistant: str) -> str | None:
    """The special token that ends an assistant's message (`<|im_end|>`, `<|eot_id|>`)."""
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    ends = [t for t in specials if after_assistant.startswith(t)]
    return max(ends, key=len) if ends else None
