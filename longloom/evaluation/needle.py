"""`longloom eval needle`: needle-in-a-haystack (passkey) retrieval by length x depth, under SP.

The haystack is the passkey task of data/synthetic.py (Mohtashami & Jaggi 2023): filler sentences,
"key: 12345. " hidden at a depth of the filler, and "key: " at the end, after which the model must
produce the digits. With the byte tokenizer a case of length L is token for token a training window of
`synthetic:passkey` at data.seq_len = L, with the needle at the sentence boundary nearest the depth, so
a model trained on the task is tested on exactly its input distribution; other tokenizers get the same
text as token pieces (filler sentences, needle, question, answer) that add up to exactly L tokens.

Greedy decoding of the answer only, by teacher forcing: one forward over the L tokens (the prompt and
the answer but its last token) gives the argmax after every answer prefix; the case counts as retrieved
when every answer token is its argmax. That is exactly greedy decoding's result (if each greedy token
equals the answer's, every next greedy step sees the answer's prefix, i.e. the teacher-forced input),
with one forward instead of one per digit and with a length that stays L: appending tokens one at a time
would change the length, which must stay divisible by the SP degree (2 x degree for zigzag).

The sequence is cut over the SP group as in training; data-parallel groups take every dp-th case. Every
case (its passkey too) is a function of (seed, length, depth, trial), so any split evaluates the same
inputs and, up to floating-point rounding of the argmax, reports the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from longloom.data.synthetic import (
    _NEEDLE_HEAD,
    _NEEDLE_TAIL,
    _QUESTION,
    PASSKEY_DIGITS,
    PASSKEY_FILLER,
)

FILLER_SENTENCES = [sentence + ". " for sentence in PASSKEY_FILLER.tobytes().decode().split(". ") if sentence]


@dataclass(frozen=True)
class NeedleCase:
    length: int
    depth: float
    trial: int


@dataclass
class NeedleResult:
    length: int
    depth: float
    trial: int
    needle_position: int  # token index where the needle starts
    answer: list[int]
    predicted: list[int]

    @property
    def retrieved(self) -> bool:
        return self.answer == self.predicted

    @property
    def digits_right(self) -> int:
        return sum(a == p for a, p in zip(self.answer, self.predicted))

    def to_dict(self) -> dict:
        return asdict(self) | {"retrieved": self.retrieved}


def parse_lengths(text: str) -> list[int]:
    """'4K,16K,64K,1M' -> [4096, 16384, 65536, 1048576]; plain numbers too."""
    units = {"K": 1 << 10, "M": 1 << 20}
    lengths = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        scale = units.get(item[-1].upper(), 1)
        number = item[:-1] if scale > 1 else item
        if not number.isdigit() or int(number) * scale < 1:
            raise ValueError(f"--lengths: {item!r} is not a length; write e.g. 4K,16K,64K or 4096,8192")
        lengths.append(int(number) * scale)
    if not lengths:
        raise ValueError(f"--lengths {text!r} names no length; write e.g. 4K,16K,64K")
    return lengths


def parse_depths(text: str) -> list[float]:
    """'0,0.25,1' or an arithmetic series '0,0.1,...,1' -> depths in [0, 1]."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    try:
        if "..." in items:
            at = items.index("...")
            if at < 2 or at != len(items) - 2:
                raise ValueError
            first, second, last = float(items[at - 2]), float(items[at - 1]), float(items[-1])
            step = second - first
            count = round((last - first) / step) + 1
            if step <= 0 or count < 2:
                raise ValueError
            depths = [float(v) for v in items[: at - 2]] + [round(first + i * step, 10) for i in range(count)]
        else:
            depths = [float(item) for item in items]
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"--depths {text!r}: write depths in [0, 1] as 0,0.5,1 or a series 0,0.1,...,1"
        ) from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(
            f"--depths {text!r}: every depth must lie in [0, 1] (0 = start, 1 = end of the haystack)"
        )
    return depths


def check_lengths(lengths: Sequence[int], sp: int, ring: int, min_length: int, answer_tokens: int) -> None:
    """Each length must split over the SP group as training would split it, and hold the needle; the
    answer must lie in the last chunk (one rank computes its logits)."""
    chunks = 2 * sp if ring > 1 else sp
    what = (
        f"2 x parallel.ring x parallel.ulysses = {chunks} (zigzag layout)"
        if ring > 1
        else f"the SP degree {sp}"
    )
    for length in lengths:
        if length % chunks:
            fixed = (length // chunks + 1) * chunks
            raise ValueError(
                f"eval length {length} is not divisible by {what}: the sequence is cut into {chunks} equal "
                f"chunks as in training; pass --lengths with multiples of {chunks} (e.g. {fixed}) or change "
                "parallel.ulysses / parallel.ring"
            )
        if length < min_length:
            raise ValueError(
                f"eval length {length} is too short for the needle and question: use >= {min_length}"
            )
        if length // chunks < answer_tokens:
            raise ValueError(
                f"eval length {length} cut into {chunks} chunks leaves {length // chunks} tokens a chunk, fewer "
                f"than the {answer_tokens} answer tokens: use lengths >= {answer_tokens * chunks} or a smaller "
                "SP degree"
            )


def cases_for(lengths: Sequence[int], depths: Sequence[float], trials: int) -> list[NeedleCase]:
    return [
        NeedleCase(length, depth, trial) for length in lengths for depth in depths for trial in range(trials)
    ]


class Haystacks:
    """Builds the token ids of a case with one tokenizer (its pieces encoded once)."""

    def __init__(self, tokenizer, seed: int = 0):
        self.seed = seed
        self.bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
        self.encode = lambda text: [int(i) for i in tokenizer.encode(text)]
        sentences = [self.encode(sentence) for sentence in FILLER_SENTENCES]
        self.filler_cycle = np.asarray([t for sentence in sentences for t in sentence], dtype=np.int64)
        # Token offsets in the filler cycle where a sentence ends: where the needle may go.
        self.cycle_boundaries = np.cumsum([len(sentence) for sentence in sentences])
        self.needle_head, self.needle_tail = (
            self.encode(_NEEDLE_HEAD.decode()),
            self.encode(_NEEDLE_TAIL.decode()),
        )
        self.question = self.encode(_QUESTION.decode())

    def overhead(self, answer_tokens: int) -> int:
        return (
            len(self.bos)
            + len(self.needle_head)
            + 2 * answer_tokens
            + len(self.needle_tail)
            + len(self.question)
        )

    def max_answer_tokens(self) -> int:
        return max(len(self.encode(str(n))) for n in (10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS - 1))

    def min_length(self) -> int:
        return self.overhead(self.max_answer_tokens()) + 1

    def build(self, case: NeedleCase, depth_index: int) -> tuple[np.ndarray, list[int], int]:
        """(window of length + 1 ids, answer ids, needle start): the model input is window[:-1]."""
        rng = np.random.default_rng([self.seed, case.length, depth_index, case.trial])
        passkey = str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS)))
        answer = self.encode(passkey)
        filler_len = case.length + 1 - self.overhead(len(answer))
        filler = np.resize(self.filler_cycle, filler_len)
        cycles = -(-filler_len // len(self.filler_cycle))
        ends = (np.arange(cycles)[:, None] * len(self.filler_cycle) + self.cycle_boundaries[None, :]).ravel()
        boundaries = np.concatenate([[0], ends[ends < filler_len], [filler_len]])
        # The sentence boundary nearest the depth (ties to the earlier one), as the training task hides it.
        cut = int(boundaries[np.argmin(np.abs(boundaries - case.depth * filler_len))])
        needle = self.needle_head + answer + self.needle_tail
        window = np.concatenate([self.bos, filler[:cut], needle, filler[cut:], self.question, answer]).astype(
            np.int64
        )
        return window, answer, len(self.bos) + cut


def evaluate_cases(
    predictor, cases: Sequence[NeedleCase], depths: Sequence[float], haystacks: Haystacks
) -> list[NeedleResult]:
    """Runs `cases` one forward each on this SP group; the predictor gives argmax ids on every rank."""
    results = []
    for case in cases:
        window, answer, needle_position = haystacks.build(case, depths.index(case.depth))
        tokens = torch.from_numpy(window[:-1]).unsqueeze(0)
        # Input position t predicts window[t + 1]: the answer window[-n:] is predicted at the input's last n.
        predicted = predictor.predictions(tokens, last=len(answer))[0]
        results.append(
            NeedleResult(case.length, case.depth, case.trial, needle_position, answer, predicted.tolist())
        )
    return results
