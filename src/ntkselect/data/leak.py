"""The test-set leak check of ``ntkselect evaluate``: is a test question inside a training record?

A training record *leaks* a test question when the question's normalised text is contained in
the normalised text of any field the record trains on, whatever the record's shape:

* ``text``: the text;
* prompt/response shapes: every one of ``prompt``, ``response``, ``instruction``, ``input``,
  ``output``, ``question``, ``answer`` that the record has (not only the pair it is rendered
  from: ``train.jsonl`` keeps the whole record, and another trainer may read another field);
* ``messages``: the content of every message, whatever its role.

Normalising keeps the words: Unicode NFKC, case-folded, every run of characters that are not
letters or digits becomes one separator. So formatting (line breaks, ``A.`` against ``A)``,
markdown, punctuation) does not hide a question, and containment is by whole words ("heart 1"
is not inside "heart 10").

A test question's text is its ``prompt`` (or ``question``, or the prompt of its prompt/response
shape; for MMLU-style items that includes the lettered options). Containment needs at least
:data:`MIN_WORDS` words: a shorter question ("Yes?", "What is 2 + 2?") would be inside countless
unrelated texts, so it counts only when a whole field equals it. A question with fewer than
:data:`SPECIFIC_WORDS` words whose record lists its ``options`` (or ``choices``) as texts
counts as contained only when every option text of more than one character is in the record
too: a short stem such as "Which of the following is true?" is a different question with
different options.

A question whose text lists lettered options ("A. ...", "B) ...", one per line) is also matched
in parts, so that splitting it across fields does not hide it: its stem (the text before the
options) is found as above (contained when it has :data:`MIN_WORDS` words or more, else equal to
a whole field), and then every option text of more than one character must be in some field of
the record too (for stems of :data:`SPECIFIC_WORDS` words or more the stem alone suffices). A
record with the stem in ``instruction`` and the options in ``input`` (in either order) leaks.

Matching is linear in the training text: the questions are indexed by their first three
words, each training field is scanned once, and a candidate is confirmed by comparing words.
10,000 training records against 1,000 test questions take about a second (docs/RESULTS.md).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from ntkselect.data.records import Record, prompt_response, record_kind, record_text
from ntkselect.errors import NtkSelectError

__all__ = ["MIN_WORDS", "SPECIFIC_WORDS", "TestQuestions", "normalise", "training_fields", "question_text", "split_options"]

#: test questions with fewer words are matched only by equality with a whole field
MIN_WORDS = 6
#: test questions with fewer words (and an options list) also need their options in the record
SPECIFIC_WORDS = 12
_KEY = 3  # questions are indexed by their first _KEY words
_WORD = re.compile(r"[^\W_]+")
_FIELDS = ("prompt", "response", "instruction", "input", "output", "question", "answer", "text")
_OPTION = re.compile(r"^\s*[(\[]?([A-Za-z])\s*[.):\]]\s*(.*?)\s*$")  # "A. text", "B) text", "(C) text", "[D] text"


def split_options(question: str) -> tuple[str, list[str]]:
    """(stem, option texts) of a question that lists lettered options one per line, A first, in
    order; (question, []) for any other."""
    lines = question.splitlines()
    for start, line in enumerate(lines):
        m = _OPTION.match(line)
        if m and m.group(1).upper() == "A":
            opts: list[str] = []
            for later in lines[start:]:
                m = _OPTION.match(later)
                if not m or m.group(1).upper() != chr(ord("A") + len(opts)):
                    break
                opts.append(m.group(2))
            if len(opts) >= 2:
                return "\n".join(lines[:start]), opts
            break
    return question, []


def normalise(text: str | int | float) -> tuple[str, ...]:
    """The words of ``text``: NFKC, case-folded, split at everything but letters and digits."""
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", str(text)).casefold()))


def training_fields(raw: dict) -> list[str]:
    """Every text a training record trains on (or could be trained on from train.jsonl)."""
    kind = record_kind(raw)
    if kind == "messages":
        return [m["content"] for m in raw["messages"]]
    return [str(raw[k]) for k in _FIELDS if isinstance(raw.get(k), (str, int, float)) and not isinstance(raw.get(k), bool)]


def question_text(raw: dict) -> str:
    """The text of a test record's question (what ``evaluate`` asks the model)."""
    q = raw.get("prompt") or raw.get("question")
    if isinstance(q, str) and q.strip():
        return q
    try:
        return prompt_response(raw)[0]
    except NtkSelectError:
        return record_text(raw)


def _contains(hay: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0 or n > len(hay):
        return False
    first = needle[0]
    for i in range(len(hay) - n + 1):
        if hay[i] == first and tuple(hay[i : i + n]) == tuple(needle):
            return True
    return False


def _option_words(options: Iterable[str | int | float]) -> list[tuple[str, ...]]:
    """The normalised option texts of more than one character (a bare letter is no evidence)."""
    return [w for w in (normalise(o) for o in options) if w and len(" ".join(w)) > 1]


class TestQuestions:
    """The test set's questions, indexed for containment checks against training records."""

    __test__ = False  # not a pytest class

    def __init__(self, records: Iterable[Record]):
        # (words, options that must be in the record too, test id, whether the words must end the field)
        Entry = tuple[tuple[str, ...], list[tuple[str, ...]], str, bool]
        self.long: dict[tuple[str, ...], list[Entry]] = {}
        self.short: dict[tuple[str, ...], list[tuple[list[tuple[str, ...]], str]]] = {}  # whole-field matches
        self.n = 0
        for r in records:
            self.n += 1
            text = question_text(r.raw)
            words = normalise(text)
            if not words:
                continue
            options = r.raw.get("options", r.raw.get("choices"))
            opts: list[tuple[str, ...]] = []
            if len(words) < SPECIFIC_WORDS and isinstance(options, list):
                opts = _option_words(o for o in options if isinstance(o, (str, int, float)))
            self._add(words, [] if len(words) < MIN_WORDS else opts, r.id, False)
            stem, listed = split_options(text)
            stem_words = normalise(stem)
            if listed and stem_words and stem_words != words:  # also the stem, with its options anywhere in the record
                need = _option_words(listed) if len(stem_words) < SPECIFIC_WORDS else []
                if need or len(stem_words) >= SPECIFIC_WORDS:
                    self._add(stem_words, need, r.id, True)
        self._firsts = {k[0] for k in self.long}

    def _add(self, words: tuple[str, ...], opts: list[tuple[str, ...]], tid: str, at_end: bool) -> None:
        if len(words) < MIN_WORDS:
            self.short.setdefault(words, []).append((opts, tid))
        else:
            self.long.setdefault(words[:_KEY], []).append((words, opts, tid, at_end))

    def find(self, raw: dict) -> str | None:
        """The id of a test question that the training record ``raw`` contains, else None."""
        fields = [normalise(f) for f in training_fields(raw)]

        def present(opts: list[tuple[str, ...]]) -> bool:
            return all(any(_contains(f, o) for f in fields) for o in opts)

        for hay in fields:
            for opts, tid in self.short.get(hay, ()):
                if present(opts):
                    return tid
            for i, w in enumerate(hay):
                if w not in self._firsts:
                    continue
                for words, opts, tid, at_end in self.long.get(tuple(hay[i : i + _KEY]), ()):
                    if tuple(hay[i : i + len(words)]) != words or (at_end and i + len(words) != len(hay)):
                        continue
                    if present(opts):
                        return tid
        return None

    def leaks(self, raw: dict) -> bool:
        return self.find(raw) is not None
