"""The simulated engines' tokenizer, chat template and deterministic "model".

Three properties matter to everything built on the simulator:

* ``decode(encode(text)) == text`` for any text (unknown pieces fall back to the longest known
  piece they start with, then byte tokens);
* generated words are word pieces with a leading space, and a few are words with non-ASCII
  characters, generated as a stem piece then one token per UTF-8 byte (as byte-level BPE
  tokenizers split them): a stream can stop *inside* a character, where no text is due yet;
* re-tokenizing ``prompt + generated text`` gives back ``prompt ids + generated ids`` when
  the generated text ends on a whole character (text continuation is exact there, and drifts
  at a seam inside a character, as on real engines);
* :func:`next_token` is a pure function of the whole sequence so far, so a stream resumed on
  another engine from the same sequence continues exactly as the unbroken stream would have.
"""

from __future__ import annotations

import codecs
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
# Generated as " stem" + UTF-8 byte tokens: two-, three- and four-byte characters.
MULTIBYTE_WORDS = ("café", "naïve", "señor", "façade", "Zürich", "smörgåsbord", "ok🙂", "tokyo東京")
_STEMS = (" caf", " na", " se", " fa", " Z", " sm", " ok", " tokyo")

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
        self._pieces += _STEMS
        self._ids = {p: i for i, p in enumerate(self._pieces) if i >= _WORD_BASE}
        self._special_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        self.generated_vocab = range(_WORD_BASE, _WORD_BASE + len(WORDS))
        # Each multi-byte word's whole token sequence, keyed by its first (stem) token.
        self.spelled: dict[int, tuple[int, ...]] = {}
        for word in MULTIBYTE_WORDS:
            ids = tuple(self.encode(" " + word))
            self.spelled[ids[0]] = ids

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
                continue
            rest = piece
            for cut in range(len(piece) - 1, 0, -1):  # the longest known piece it starts with
                tid = self._ids.get(piece[:cut])
                if tid is not None:
                    out.append(tid)
                    rest = piece[cut:]
                    break
            out.extend(_BYTE_BASE + b for b in rest.encode("utf-8"))

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

    def byte_of(self, tid: int) -> int | None:
        """The byte a byte token stands for (None for any other token)."""
        return tid - _BYTE_BASE if _BYTE_BASE <= tid < _WORD_BASE else None

    def piece(self, tid: int) -> str:
        """Text of one whole-piece token ("" for EOS; byte tokens: see :class:`TextStream`)."""
        return self._pieces[tid] if tid != EOS_ID and self.byte_of(tid) is None else ""


class TextStream:
    """Detokenizes a stream token by token, as engines do: a token that leaves a UTF-8
    character incomplete yields no text; the token that completes it yields the whole
    character; an invalid byte sequence yields U+FFFD."""

    def __init__(self, tok: SimTokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tid in prompt_ids:  # the prompt may end inside a character
            self.step(tid)

    @property
    def inside_character(self) -> bool:
        """Whether the bytes so far end part-way through a character."""
        return bool(self._utf8.getstate()[0])

    def step(self, tid: int) -> str:
        b = self._tok.byte_of(tid)
        if b is not None:
            return self._utf8.decode(bytes([b]))
        return self._utf8.decode(b"", final=True) + self._tok.piece(tid)


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


_SPELLING = SimTokenizer().spelled  # stem token -> the multi-byte word's whole token sequence
_STEM_IDS = tuple(_SPELLING)


class SequenceState:
    """Running hash of a token sequence; :meth:`next_token` depends on the whole sequence.

    A multi-byte word, once its stem is generated, is spelled out to its end (its remaining
    byte tokens are forced), also when the sequence was cut inside it and resumed.

    Sampling with a seed draws from a random stream of that seed, one draw per generated
    token, as engines do: it restarts with every request, so a continuation (a new request
    whose prompt holds what was generated) draws differently from the unbroken run."""

    __slots__ = ("_draws", "_eos_every", "_forced", "_h", "_n_words", "_seed")

    def __init__(self, ids: Iterable[int], *, seed: int | None = None, eos_every: int = 0) -> None:
        self._h = _FNV_OFFSET
        self._seed = None if seed is None else _mix(_FNV_OFFSET, seed & _MASK64)
        self._n_words = len(WORDS) + len(_STEM_IDS)
        self._eos_every = eos_every
        self._forced: tuple[int, ...] = ()
        self._draws = 0
        for tid in ids:
            self.append(tid)
        self._draws = 0  # draws count generated tokens only: the prompt is not sampled

    @property
    def context(self) -> int:
        """The hash of the sequence so far: what the next token's logprobs depend on."""
        return self._h

    @property
    def spelling(self) -> bool:
        """Whether a multi-byte word is part-way spelled out (its next token is forced)."""
        return bool(self._forced)

    def next_token(self) -> int:
        if self._forced:
            return self._forced[0]
        h = self._h if self._seed is None else _mix(self._h, _mix(self._seed, self._draws))
        if self._eos_every and h % self._eos_every == 0:
            return EOS_ID
        k = (h >> 7) % self._n_words
        return _WORD_BASE + k if k < len(WORDS) else _STEM_IDS[k - len(WORDS)]

    def append(self, tid: int) -> None:
        self._h = _mix(self._h, tid)
        self._draws += 1
        if self._forced and tid == self._forced[0]:
            self._forced = self._forced[1:]
        elif tid in _SPELLING:
            self._forced = _SPELLING[tid][1:]
        else:
            self._forced = ()


def token_logprobs(context: int, chosen: int, alternatives: int) -> list[tuple[int, float]]:
    """The simulated model's logprobs at one position, given the hash of the sequence
    before it (:attr:`SequenceState.context`): ``chosen`` first, then other word tokens
    until there are ``alternatives`` in all, each less likely. A pure function of the
    context and the token, so every engine, and a continuation resumed from the same
    sequence, gives the same values as an unbroken run."""
    h = _mix(context, chosen)
    value = -((h >> 11) / float(1 << 53)) * 4.0 - 0.25  # in (-4.25, -0.25]
    out = [(chosen, value)]
    seen = {chosen}
    j = 0
    while len(out) < alternatives:
        j += 1
        tid = _WORD_BASE + _mix(context, 1000 + j) % len(WORDS)
        if tid in seen:
            continue
        seen.add(tid)
        out.append((tid, value - 0.5 * len(out) - ((_mix(h, j) >> 11) / float(1 << 53)) * 0.25))
    return out


def prompt_contexts(prompt_ids: Sequence[int]) -> list[int]:
    """The context hash before each prompt token (the first has none that counts)."""
    state = SequenceState(())
    out = []
    for tid in prompt_ids:
        out.append(state.context)
        state.append(tid)
    return out


def generate(
    prompt_ids: Iterable[int], n: int, *, seed: int | None = None, whole: bool = False
) -> list[int]:
    """The simulated model's next ``n`` tokens after ``prompt_ids`` (greedy, or sampled with
    ``seed``); with ``whole``, on to the end of a multi-byte word cut by ``n``."""
    state = SequenceState(prompt_ids, seed=seed)
    out: list[int] = []
    while len(out) < n or (whole and state.spelling):
        t = state.next_token()
        state.append(t)
        out.append(t)
    return out
