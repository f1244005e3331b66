"""Formatting-based augmentation (Zhu et al. 2025): new layouts of a passage, never new wording.

A passage is cut into sentences, each sentence is *decorated* (wrapped in special characters or given a
list marker), the decorated sentences are *arranged* (joined by whitespace or line breaks, grouped
into paragraphs, or put into a JSON array or an HTML list) and the result is *enclosed* (code fence,
quoted block, ...). A :class:`Format` is one such triple; its name is the three names joined by "+".

The invariant, checked again on every variant produced: every sentence is copied verbatim, as one
contiguous piece, into the output. Only the whitespace *between* sentences is replaced, and markup
is only added around sentences. So any string that lies inside one sentence survives. To make that
cover strings that cross a sentence boundary (a probe target such as "Mt. Pankino" or "6678. Mars"),
pass them as ``protect``: a boundary is never cut inside any occurrence of a protected string.
Wrappers that would have to escape text (JSON escapes quotes and backslashes, HTML escapes ``&<>``)
are only used for passages that need no escaping; otherwise another format is picked.

>>> text = "Zorgon took office on 5 Outcrop 6678. Calidus served as second-in-command."
>>> split_sentences(text)
['Zorgon took office on 5 Outcrop 6678.', 'Calidus served as second-in-command.']
>>> print(Format.parse("numbered+newline+none").render(split_sentences(text)))
1. Zorgon took office on 5 Outcrop 6678.
2. Calidus served as second-in-command.
>>> print(Format.parse("plain+json_array+none").render(split_sentences(text)))
[
  "Zorgon took office on 5 Outcrop 6678.",
  "Calidus served as second-in-command."
]
>>> len(formatting_variants(text, k=8, seed=0))
8
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from kacq_hooks.errors import FormatError
from kacq_hooks.facts.records import PROBE_KINDS, FactRecord

logger = logging.getLogger(__name__)

__all__ = [
    "FormatError",
    "Decoration",
    "Arrangement",
    "Enclosure",
    "Format",
    "DECORATIONS",
    "ARRANGEMENTS",
    "ENCLOSURES",
    "all_formats",
    "split_sentences",
    "format_text",
    "formatting_variants",
    "record_targets",
    "augment_record",
    "with_format_variants",
]


# ----------------------------------------------------------------------------------------------
# The three stages. Each stage only adds characters around the pieces it receives, so a sentence
# handed to the first stage comes out of the last as one contiguous, unchanged substring.


@dataclass(frozen=True)
class Decoration:
    """Characters put around each sentence; ``{i}`` in the prefix is the sentence's 1-based number.

    ``line_start`` decorations (list markers, quote markers, indents) only make sense at the start of
    a line, so they are combined only with arrangements that put one sentence per line.
    """

    name: str
    prefix: str = ""
    suffix: str = ""
    line_start: bool = False

    def apply(self, sentences: Sequence[str]) -> list[str]:
        return [f"{self.prefix.replace('{i}', str(i))}{s}{self.suffix}" for i, s in enumerate(sentences, start=1)]


@dataclass(frozen=True)
class Arrangement:
    """How decorated sentences become one text: ``kind`` is "text", "json" or "html".

    JSON and HTML arrangements do not escape: they refuse (``accepts`` is False) items that would need it.
    """

    name: str
    join: Callable[[list[str]], str]
    kind: str = "text"
    one_per_line: bool = False

    def accepts(self, items: Sequence[str]) -> bool:
        if self.kind == "json":
            return all(_json_safe(item) for item in items)
        if self.kind == "html":
            return all(_html_safe(item) for item in items)
        return True


@dataclass(frozen=True)
class Enclosure:
    """Text put before and after the whole arrangement; ``html`` ones need HTML-safe sentences."""

    name: str
    before: str = ""
    after: str = ""
    html: bool = False


def _json_safe(item: str) -> bool:
    return json.dumps(item, ensure_ascii=False) == f'"{item}"'


def _html_safe(item: str) -> bool:
    return html.escape(item, quote=False) == item


def _paragraphs(size: int) -> Callable[[list[str]], str]:
    return lambda items: "\n\n".join(" ".join(items[i:i + size]) for i in range(0, len(items), size))


def _html_list(tag: str) -> Callable[[list[str]], str]:
    return lambda items: f"<{tag}>\n" + "".join(f"<li>{item}</li>\n" for item in items) + f"</{tag}>"


DECORATIONS: tuple[Decoration, ...] = (
    Decoration("plain"),
    Decoration("brackets", "[", "]"),
    Decoration("braces", "{", "}"),
    Decoration("parens", "(", ")"),
    Decoration("guillemets", "«", "»"),
    Decoration("double_quotes", '"', '"'),
    Decoration("bold", "**", "**"),
    Decoration("italic", "*", "*"),
    Decoration("underscores", "_", "_"),
    Decoration("backticks", "`", "`"),
    Decoration("pipes", "| ", " |"),
    Decoration("double_slashes", "// ", " //"),
    Decoration("arrows", ">> ", " <<"),
    Decoration("bullet_dots", "• ", ""),
    Decoration("dash_bullets", "- ", "", line_start=True),
    Decoration("star_bullets", "* ", "", line_start=True),
    Decoration("plus_bullets", "+ ", "", line_start=True),
    Decoration("numbered", "{i}. ", "", line_start=True),
    Decoration("numbered_parens", "{i}) ", "", line_start=True),
    Decoration("markdown_quote", "> ", "", line_start=True),
    Decoration("indented", "    ", "", line_start=True),
    Decoration("tab_indented", "\t", "", line_start=True),
)

ARRANGEMENTS: tuple[Arrangement, ...] = (
    Arrangement("space", " ".join),
    Arrangement("double_space", "  ".join),
    Arrangement("newline", "\n".join, one_per_line=True),
    Arrangement("blank_line", "\n\n".join, one_per_line=True),
    Arrangement("pairs", _paragraphs(2)),
    Arrangement("triples", _paragraphs(3)),
    Arrangement("json_array", lambda items: json.dumps(items, ensure_ascii=False, indent=2), kind="json"),
    Arrangement("json_inline", lambda items: json.dumps(items, ensure_ascii=False), kind="json"),
    Arrangement("html_list", _html_list("ul"), kind="html"),
    Arrangement("html_ordered_list", _html_list("ol"), kind="html"),
    Arrangement("html_paragraphs", lambda items: "\n".join(f"<p>{item}</p>" for item in items), kind="html"),
)

ENCLOSURES: tuple[Enclosure, ...] = (
    Enclosure("none"),
    Enclosure("code_fence", "```\n", "\n```"),
    Enclosure("triple_quotes", '"""\n', '\n"""'),
    Enclosure("rules", "---\n", "\n---"),
    Enclosure("html_blockquote", "<blockquote>\n", "\n</blockquote>", html=True),
)

_BY_NAME = {
    "decoration": {d.name: d for d in DECORATIONS},
    "arrangement": {a.name: a for a in ARRANGEMENTS},
    "enclosure": {e.name: e for e in ENCLOSURES},
}


@dataclass(frozen=True)
class Format:
    """A decoration, an arrangement and an enclosure, applied in that order.

    >>> Format.parse("brackets+newline+code_fence").render(["A b.", "C d."])
    '```\\n[A b.]\\n[C d.]\\n```'
    """

    decoration: Decoration
    arrangement: Arrangement
    enclosure: Enclosure

    @property
    def name(self) -> str:
        return f"{self.decoration.name}+{self.arrangement.name}+{self.enclosure.name}"

    @classmethod
    def parse(cls, name: str) -> Format:
        """The format named "decoration+arrangement+enclosure" (see DECORATIONS, ARRANGEMENTS, ENCLOSURES)."""
        parts = name.split("+")
        if len(parts) != 3:
            raise FormatError(f"format name {name!r} has {len(parts)} part(s); expected "
                              "'decoration+arrangement+enclosure', e.g. 'numbered+newline+none'")
        stages = []
        for stage, part in zip(("decoration", "arrangement", "enclosure"), parts):
            if part not in _BY_NAME[stage]:
                raise FormatError(f"unknown {stage} {part!r} in {name!r}; expected one of {sorted(_BY_NAME[stage])}")
            stages.append(_BY_NAME[stage][part])
        fmt = cls(*stages)
        if not fmt.coherent:
            raise FormatError(f"format {name!r} does not combine: line-start decorations need a one-per-line "
                              "arrangement, and HTML enclosures need a text or HTML arrangement")
        return fmt

    @property
    def coherent(self) -> bool:
        """Whether the stages make sense together (list markers at line starts, no HTML around JSON)."""
        if self.decoration.line_start and not self.arrangement.one_per_line:
            return False
        return not (self.enclosure.html and self.arrangement.kind == "json")

    def applies_to(self, sentences: Sequence[str]) -> bool:
        """Whether rendering needs no escaping, so every sentence stays verbatim and the markup stays valid."""
        items = self.decoration.apply(sentences)
        if not self.arrangement.accepts(items):
            return False
        return not (self.enclosure.html and not all(_html_safe(item) for item in items))

    def render(self, sentences: Sequence[str]) -> str:
        """The formatted text; raise FormatError if this format would have to escape any sentence."""
        if not self.applies_to(sentences):
            raise FormatError(f"format {self.name!r} would have to escape characters of these sentences "
                              "(JSON: quotes, backslashes, control characters; HTML: & < >); pick another format")
        body = self.arrangement.join(self.decoration.apply(sentences))
        return f"{self.enclosure.before}{body}{self.enclosure.after}"


def all_formats() -> list[Format]:
    """Every coherent combination of the stages, in a fixed order (the order seeds shuffle)."""
    combos = (Format(d, a, e) for d in DECORATIONS for a in ARRANGEMENTS for e in ENCLOSURES)
    return [fmt for fmt in combos if fmt.coherent]


# ----------------------------------------------------------------------------------------------
# Sentence cutting. A cut is a whitespace run after . ! or ? (and any closing quotes or brackets)
# that is followed by what can start a sentence. It is not made after a known abbreviation or an
# initial ("Mt. Pankino", "J. Smith"), nor anywhere inside an occurrence of a protected string.

_CUT = re.compile(r"[.!?][\"'”’)\]]*(\s+)(?=[\"'“‘(\[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st mt ft jr sr inc ltd ltda co corp no vs etc e.g i.e fig gen col lt sgt capt rev "
    "hon est approx dept univ ave blvd rd u.s u.k jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_WORD_BEFORE = re.compile(r"(\S+)$")


def _cut_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for match in _CUT.finditer(text):
        word = _WORD_BEFORE.search(text, 0, match.start() + 1)
        stem = word.group(1).rstrip(".!?").lower() if word else ""
        if stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
            continue
        spans.append(match.span(1))
    return spans


def _occurrences(text: str, needle: str) -> Iterable[tuple[int, int]]:
    start = text.find(needle)
    while start != -1:
        yield start, start + len(needle)
        start = text.find(needle, start + 1)


def split_sentences(text: str, protect: Iterable[str] = ()) -> list[str]:
    """Cut ``text`` into sentences, never inside an occurrence of a string in ``protect``.

    Joined by the whitespace they were cut at, the sentences give back ``text`` without its leading and
    trailing whitespace (kept where a protected string needs it).

    >>> split_sentences("Mt. Pankino erupted in 2025. Dr. Zara fled. It ended.", protect=["2025. Dr"])
    ['Mt. Pankino erupted in 2025. Dr. Zara fled.', 'It ended.']
    """
    blocked = [span for needle in set(protect) if needle for span in _occurrences(text, needle)]

    def free(start: int, end: int) -> bool:
        return not any(a < end and start < b for a, b in blocked)

    cuts = [span for span in _cut_spans(text) if free(*span)]
    lead = re.match(r"\s*", text).end()
    trail = re.search(r"\s*\Z", text).start()
    if lead == len(text):
        return []
    if lead and not free(0, lead):
        lead = 0
    if trail < len(text) and not free(trail, len(text)):
        trail = len(text)
    bounds = [lead] + [edge for span in cuts for edge in span] + [trail]
    return [text[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]


# ----------------------------------------------------------------------------------------------
# Variants.


def _check_verbatim(variant: str, pieces: Iterable[str], fmt: Format) -> None:
    missing = [piece for piece in pieces if piece not in variant]
    if missing:  # unreachable by construction; a loud error beats a silently altered fact
        raise FormatError(f"format {fmt.name!r} lost {len(missing)} piece(s) of the text, first {missing[0]!r}; "
                          "this is a bug in kacq_hooks, please report it")


def format_text(text: str, fmt: Format | str, protect: Iterable[str] = ()) -> str:
    """``text`` laid out in one format (a Format or its "decoration+arrangement+enclosure" name).

    >>> format_text("One fact. Another fact.", "markdown_quote+newline+none")
    '> One fact.\\n> Another fact.'
    """
    fmt = Format.parse(fmt) if isinstance(fmt, str) else fmt
    protect = [p for p in protect if p]
    sentences = split_sentences(text, protect)
    if not sentences:
        raise FormatError("the text is empty or only whitespace; there is nothing to format")
    variant = fmt.render(sentences)
    _check_verbatim(variant, [*sentences, *(p for p in protect if p in text)], fmt)
    return variant


def formatting_variants(text: str, k: int, seed: int = 0, protect: Iterable[str] = ()) -> list[str]:
    """``k`` distinct layouts of ``text``, none equal to it, the same for the same ``seed``.

    Formats are drawn from :func:`all_formats` in an order shuffled by ``seed``; a format that would
    need escaping, or that gives a text already drawn, is passed over. Every sentence, and every
    string of ``protect`` that occurs in ``text``, appears verbatim in every variant.

    Raises FormatError when ``text`` is blank, or when fewer than ``k`` distinct layouts exist (the
    message gives the number that do).

    >>> a = formatting_variants("The lake froze. The town moved north.", k=3, seed=7)
    >>> a == formatting_variants("The lake froze. The town moved north.", k=3, seed=7)
    True
    >>> len(set(a))
    3
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FormatError(f"k must be a non-negative int (the number of variants), got {k!r}")
    protect = [p for p in protect if p]
    sentences = split_sentences(text, protect)
    if not sentences:
        raise FormatError("the text is empty or only whitespace; there is nothing to format")
    must_survive = [*sentences, *(p for p in protect if p in text)]
    formats = all_formats()
    random.Random(seed).shuffle(formats)
    seen = {text, text.strip()}
    variants: list[str] = []
    for fmt in formats:
        if len(variants) == k:
            break
        if not fmt.applies_to(sentences):
            continue
        variant = fmt.render(sentences)
        if variant in seen:
            continue
        _check_verbatim(variant, must_survive, fmt)
        seen.add(variant)
        variants.append(variant)
        logger.debug("formatting variant %d: %s", len(variants), fmt.name)
    if len(variants) < k:
        raise FormatError(f"asked for {k} formatting variants but this text has only {len(variants)} distinct "
                          f"layouts ({len(sentences)} sentence(s), escaping rules out the JSON/HTML ones for some "
                          "texts); ask for at most that many")
    return variants


# ----------------------------------------------------------------------------------------------
# Fact records.


def record_targets(record: FactRecord) -> list[str]:
    """All probe targets of a record (mem, gen and hard_gen), in order, without duplicates."""
    targets = (t for kind in PROBE_KINDS for t in getattr(record, f"{kind}_target"))
    return list(dict.fromkeys(targets))


def augment_record(record: FactRecord, k: int, seed: int = 0, protect: Iterable[str] = ()) -> list[str]:
    """``k`` formatting variants of ``record.train_context`` that keep every probe target verbatim.

    All mem, gen and hard_gen targets (plus ``protect``) are protected, so a target that occurs in the
    passage occurs in every variant, even one that crosses a sentence boundary. A target the passage
    does not contain (some hard_gen targets are compositional) cannot be kept and is logged at debug level.
    """
    targets = record_targets(record)
    absent = [t for t in targets if t not in record.train_context]
    if absent:
        logger.debug("%d probe target(s) do not occur in the passage and cannot be kept: %s", len(absent), absent)
    return formatting_variants(record.train_context, k, seed, protect=[*targets, *protect])


def with_format_variants(record: FactRecord, k: int, seed: int = 0) -> FactRecord:
    """A copy of ``record`` whose ``paraphrases`` are ``k`` formatting variants of its passage.

    Injection treats paraphrases as alternative passages of the same facts (round i injects the i-th),
    so augmented passages are injected the same way. The record's own paraphrases are *replaced*, not
    extended: a paraphrase may reword a fact, which is what formatting augmentation avoids.
    """
    return dataclasses.replace(record, paraphrases=augment_record(record, k, seed))
