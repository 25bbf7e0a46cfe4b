"""The simulated engines' tokenizer, chat template and deterministic "model".

Three properties matter to everything built on the simulator:

* ``decode(encode(text)) == text`` for any text (unknown pieces fall back to byte tokens);
* generated tokens are always word pieces with a leading space, so re-tokenizing
  ``prompt + generated text`` gives back ``prompt ids + generated ids`` (text continuation is
  exact here; on real engines it may not be, which is why plugins prefer token ids);
* :func:`next_token` is a pure function of the whole sequence so far, so a stream resumed on
  another engine from the same sequence continues exactly as the unbroken stream would have.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
EOS_ID = 0
_BYTE_BASE = len(SPECIAL_TOKENS)
_WORD_BASE = _BYTE_BASE + 256

# A small, readable vocabulary; the model only ever generates " word" pieces.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their can been has more if "
    "will would who so no time may out up its only other into any new some could these two "
    "first then do than like over such our see man make most must after also made well way "
    "long little very still between just where good great both must through each under "
    "system model engine token stream shadow node slot failover wake sleep serve request "
    "river stone light garden window morning silver quiet signal bridge harbor lantern meadow "
    "orbit cipher ember willow falcon glacier prism tundra velvet zephyr anchor beacon cobalt"
).split()
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS))  # de-duplicated, order kept

_PIECE_RE = re.compile(r"\s?\w+|\s?[^\w\s]|\s")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325


def _mix(h: int, value: int) -> int:
    """One splitmix64-style step: fold ``value`` into the running hash ``h``."""
    z = (h ^ (value + 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SimTokenizer:
    """Word-level tokenizer with byte fallback and three ChatML special tokens."""

    def __init__(self) -> None:
        self._pieces: list[str] = list(SPECIAL_TOKENS)
        self._pieces += [f"<0x{b:02X}>" for b in range(256)]  # never matched as text
        for word in WORDS:
            self._pieces.append(" " + word)
        for word in WORDS:
            self._pieces.append(word)
        self._ids = {p: i for i, p in enumerate(self._pieces) if i >= _WORD_BASE}
        self._special_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        self.generated_vocab = range(_WORD_BASE, _WORD_BASE + len(WORDS))

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            self._encode_plain(text[pos : m.start()], out)
            out.append(self._special_ids[m.group()])
            pos = m.end()
        self._encode_plain(text[pos:], out)
        return out

    def _encode_plain(self, text: str, out: list[int]) -> None:
        for piece in _PIECE_RE.findall(text):
            tid = self._ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(_BYTE_BASE + b for b in piece.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        buf = bytearray()
        parts: list[str] = []
        for tid in ids:
            if not 0 <= tid < len(self._pieces):
                raise ValueError(f"token id {tid} is out of vocabulary (size {self.vocab_size})")
            if _BYTE_BASE <= tid < _WORD_BASE:
                buf.append(tid - _BYTE_BASE)
                continue
            if buf:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            parts.append(self._pieces[tid])
        if buf:
            parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def piece(self, tid: int) -> str:
        """Text of one generated token (generated tokens are always whole word pieces)."""
        return self._pieces[tid] if tid != EOS_ID else ""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def apply_chat_template(
    messages: Sequence[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """ChatML rendering, the same in all three simulated dialects.

    ``continue_final_message`` leaves the last message open so the model continues it (vLLM's
    parameter of the same name); it excludes ``add_generation_prompt``.
    """
    parts: list[str] = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        parts.append(f"{IM_START}{m.role}\n{m.content}")
        if not (last and continue_final_message):
            parts.append(f"{IM_END}\n")
    if add_generation_prompt and not continue_final_message:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


class SequenceState:
    """Running hash of a token sequence; :meth:`next_token` depends on the whole sequence."""

    __slots__ = ("_eos_every", "_h", "_n_words")

    def __init__(self, ids: Iterable[int], *, seed: int | None = None, eos_every: int = 0) -> None:
        self._h = _FNV_OFFSET if seed is None else _mix(_FNV_OFFSET, seed & _MASK64)
        self._n_words = len(WORDS)
        self._eos_every = eos_every
        for tid in ids:
            self._h = _mix(self._h, tid)

    def next_token(self) -> int:
        if self._eos_every and self._h % self._eos_every == 0:
            return EOS_ID
        return _WORD_BASE + (self._h >> 7) % self._n_words

    def append(self, tid: int) -> None:
        self._h = _mix(self._h, tid)
