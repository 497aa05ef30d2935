"""`response_format` by constrained decoding, and the bytes of tokens for logprobs, on llguidance.

    vocab = Vocabulary.of(served)                       # built once per served model, kept on it
    grammar = json_grammar(response_format)             # None for {"type": "text"}; 400 for what is not supported
    constraint = vocab.constraint(grammar)              # one per generated choice: a gemcut.generation.Constraint

At each step the row's llguidance matcher gives the set of tokens that keep the output a valid prefix of
JSON (json_object: any JSON object) or of JSON matching the schema (json_schema); every other token gets
-inf before sampling, so even a random model writes valid JSON. An end-of-sequence id is allowed only
where the value is complete, and the row ends by itself when nothing may follow (a closed object), so
`finish_reason` is "stop" with a whole value, or "length" when `max_tokens` cut it. The JSON is compact:
no whitespace between tokens (a model could otherwise spend its budget on spaces).

The schema subset (anything else is a 400 naming `response_format.json_schema.schema` and the keyword):
`type` (object, array, string, number, integer, boolean, null, or a list of them), `properties`,
`required`, `additionalProperties` (true, false or a schema), `items`, `enum`, `const`, `minLength`,
`maxLength`, `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `minItems`, `maxItems`, and
the annotations `title`, `description`, `default`, `examples`, `$schema`, `$id`. The schema is enforced as
written whether `strict` is true or false (decoding is always constrained); JSON Schema's default for
`additionalProperties` is true, so say false to forbid other keys.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch

from gemcut.serve.errors import APIError

SCHEMA_PARAM = "response_format.json_schema.schema"
TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "minLength", "maxLength", "minimum",
            "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems"} | ANNOTATIONS
COMPILE_OPTIONS = {"whitespace_flexible": False}


def _refuse(message: str) -> APIError:
    return APIError(400, message, param=SCHEMA_PARAM, code="unsupported_schema")


MAX_DEPTH = 32


def check_schema(schema: Any, where: str = "schema", depth: int = 0) -> None:
    """Raise a 400 naming the first keyword (and where it is) outside the supported subset."""
    if depth > MAX_DEPTH:
        raise _refuse(f"{where}: schemas nested deeper than {MAX_DEPTH} levels are not supported")
    if not isinstance(schema, dict):
        raise _refuse(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    for key, value in schema.items():
        if key not in KEYWORDS:
            raise _refuse(f"{where}: the keyword {key!r} is not supported; supported: {', '.join(sorted(KEYWORDS - ANNOTATIONS))}")
        if key == "type":
            names = value if isinstance(value, list) else [value]
            bad = [t for t in names if t not in TYPES]
            if bad or not names:
                raise _refuse(f"{where}.type: {bad[0] if bad else value!r} is not a supported type; use {', '.join(sorted(TYPES))}")
        elif key == "properties":
            if not isinstance(value, dict):
                raise _refuse(f"{where}.properties must be an object of schemas")
            for name, sub in value.items():
                check_schema(sub, f"{where}.properties.{name}", depth + 1)
        elif key == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _refuse(f"{where}.required must be a list of property names")
        elif key == "additionalProperties" and not isinstance(value, bool):
            check_schema(value, f"{where}.additionalProperties", depth + 1)
        elif key == "items":
            check_schema(value, f"{where}.items", depth + 1)
        elif key == "enum" and not (isinstance(value, list) and value):
            raise _refuse(f"{where}.enum must be a non-empty list")


def json_grammar(response_format: Any) -> str | None:
    """The llguidance grammar of a `response_format`, None for plain text; 400s name what is wrong."""
    from llguidance import LLMatcher

    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object", "json_schema"):
        given = response_format.get("type") if isinstance(response_format, dict) else response_format
        raise APIError(400, f"response_format.type must be text, json_object or json_schema (given: {given!r})",
                       param="response_format.type", code="invalid_value")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    else:
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise APIError(400, "response_format.json_schema needs a `schema` (and a `name`)", param="response_format.json_schema",
                           code="invalid_value")
        schema = spec["schema"]
        check_schema(schema)
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema, allow_nan=False), overrides=COMPILE_OPTIONS)
    except ValueError as e:  # NaN or Infinity in the schema (Python's JSON reads them), or what llguidance refuses to read
        raise _refuse(f"the schema cannot be read: {e}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise _refuse(f"the schema cannot be compiled: {error}")
    return grammar


class JsonConstraint:
    """One row's llguidance matcher as a `gemcut.generation.Constraint`."""

    def __init__(self, matcher):
        self.matcher = matcher

    def allowed(self, vocab_size: int) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little").astype(bool)
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, bits.shape[0])
        mask[:n] = torch.from_numpy(bits[:n])
        return mask

    def complete(self) -> bool:
        return self.matcher.is_accepting()

    def done(self) -> bool:
        return self.matcher.is_stopped()

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):  # the mask only offers tokens it accepts: this is a bug of ours
            raise RuntimeError(f"constrained decoding: token {token_id} refused: {self.matcher.get_error()}")


class Vocabulary:
    """A served model's tokenizer as llguidance sees it: token bytes and grammar matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        import llguidance.hf

        self.ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_id)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @classmethod
    def of(cls, served) -> Vocabulary:
        """The served model's vocabulary, built on first use (about a second for a 50k vocabulary)."""
        if served.vocabulary is None:
            embeddings = served.model.get_output_embeddings() if hasattr(served.model, "get_output_embeddings") else None
            size = embeddings.weight.shape[0] if embeddings is not None else len(served.tokenizer)
            eos = sorted(served.eos_ids()) or [0]
            served.vocabulary = cls(served.tokenizer, max(size, len(served.tokenizer)), eos[0])
        return served.vocabulary

    def constraint(self, grammar: str) -> JsonConstraint:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll, grammar, log_level=0)
        if matcher.is_error():
            raise APIError(400, f"the schema cannot be compiled: {matcher.get_error()}", param=SCHEMA_PARAM, code="unsupported_schema")
        return JsonConstraint(matcher)

    def token_bytes(self, token_id: int) -> bytes:
        raw = self.ll.decode_bytes([token_id])
        if raw or token_id in self.tokenizer.all_special_ids:
            return raw
        # llguidance marks special tokens with a leading 0xFF byte, so it returns nothing for a byte-level token
        # that starts with 0xFF itself: read that one from the byte-level alphabet.
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        decoder = _byte_level_decoder()
        if piece and all(c in decoder for c in piece):
            return bytes(decoder[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 bytes), character -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = list(kept), 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(kept, stand_ins)}


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI writes it: the UTF-8 string, or `bytes:\\xe2\\x80` for part of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
