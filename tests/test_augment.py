"""Formatting augmentation: every sentence and every protected string survives verbatim in every variant."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kacq_hooks.errors import KacqError
from kacq_hooks.facts.records import FactRecord
from kacq_hooks.training.augment import (
    ARRANGEMENTS,
    DECORATIONS,
    ENCLOSURES,
    Format,
    FormatError,
    all_formats,
    augment_record,
    format_text,
    formatting_variants,
    record_targets,
    split_sentences,
    with_format_variants,
)

DATA = Path(__file__).parents[1].parent / "shared/data/fictional_knowledge"


def naive_sentences(text: str) -> list[str]:
    """An independent, greedier splitter: cut at *every* whitespace run after . ! ? (and closers).

    The library cuts at a subset of these places, so each of these pieces must lie inside one of its
    sentences and hence survive verbatim in every variant.
    """
    pieces, start = [], 0
    for match in re.finditer(r"[.!?][\"'”’)\]]*(\s+)", text):
        pieces.append(text[start:match.start(1)])
        start = match.end(1)
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def assert_verbatim(text: str, variants: list[str], protect: list[str]) -> None:
    for variant in variants:
        for piece in naive_sentences(text):
            assert piece in variant, f"sentence {piece!r} lost in {variant!r}"
        for needle in protect:
            if needle and needle in text:
                assert needle in variant, f"protected {needle!r} lost in {variant!r}"


# ---------------------------------------------------------------------------------------------
# Property tests over random texts.

WORD = st.text(alphabet="abcdefghijKLMNOPQRSTxyz0123456789–é’&<>\"'\\", min_size=1, max_size=8)
END = st.sampled_from([".", "!", "?", ".\"", ".)", "?’", "", ";"])
GAP = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n "])


@st.composite
def prose(draw) -> str:
    """Sentence-like text: capitalised words, terminators, abbreviations and odd whitespace."""
    sentences = []
    for _ in range(draw(st.integers(1, 12))):
        words = draw(st.lists(WORD, min_size=1, max_size=6))
        if draw(st.booleans()):
            words.insert(0, draw(st.sampled_from(["Mt.", "Dr.", "Ltd.", "J.", "5 Outcrop 6678.", "3.5"])))
        words[0] = words[0][:1].upper() + words[0][1:]
        sentences.append(" ".join(words) + draw(END))
    text = "".join(s + draw(GAP) for s in sentences)
    return draw(st.sampled_from(["", " ", "\n"])) + text


@st.composite
def text_and_needles(draw, texts) -> tuple[str, list[str]]:
    """A text and a few of its substrings (often crossing sentence boundaries) to protect."""
    text = draw(texts)
    needles = []
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 40)))
        needles.append(text[start:end])
    return text, needles


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_and_needles(prose()), st.integers(0, 2**31), st.integers(1, 8))
def test_sentences_and_protected_strings_survive_in_prose(case, seed, k):
    text, protect = case
    variants = formatting_variants(text, k, seed, protect=protect)
    assert len(variants) == k
    assert len(set(variants)) == k, "variants must be distinct"
    assert text not in variants and text.strip() not in variants
    assert_verbatim(text, variants, protect)
    assert variants == formatting_variants(text, k, seed, protect=protect), "same seed, same variants"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_and_needles(st.text(min_size=1, max_size=200).filter(str.strip)), st.integers(0, 2**31))
def test_sentences_and_protected_strings_survive_in_arbitrary_unicode(case, seed):
    text, protect = case
    variants = formatting_variants(text, 8, seed, protect=protect)
    assert len(set(variants)) == 8
    assert_verbatim(text, variants, protect)


@settings(max_examples=100, deadline=None)
@given(text_and_needles(prose()))
def test_sentences_rejoin_to_the_text(case):
    """Cutting only removes whitespace between sentences: nothing else is lost or reordered."""
    text, protect = case
    sentences = split_sentences(text, protect)
    assert all(s.strip() for s in sentences)
    stripped = re.sub(r"\s+", "", text)
    assert "".join(re.sub(r"\s+", "", s) for s in sentences) == stripped


# ---------------------------------------------------------------------------------------------
# The real Fictional Knowledge passages and their probe targets.


@pytest.fixture(scope="module")
def records() -> list[FactRecord]:
    path = DATA / "fictional_knowledge.json"
    if not path.exists():
        pytest.skip(f"Fictional Knowledge data not found at {path}")
    return [FactRecord(**r) for r in json.loads(path.read_text())]


def test_every_target_in_every_variant_of_every_record(records):
    assert len(records) == 130
    kept = 0
    for index, record in enumerate(records):
        variants = augment_record(record, k=8, seed=index)
        assert len(set(variants)) == 8
        targets = [t for t in record_targets(record) if t in record.train_context]
        kept += len(targets)
        assert_verbatim(record.train_context, variants, targets)
    assert kept > 1000  # the check above really ran over the mem/gen targets of every record


def test_boundary_crossing_targets_are_never_cut(records):
    """Targets such as "Mt. Pankino" span a would-be sentence end; a line-per-sentence layout keeps them."""
    record = records[11]
    crossing = [t for t in record_targets(record) if "Mt. " in t and t in record.train_context]
    assert crossing, "record 11 has targets containing 'Mt. '"
    variant = format_text(record.train_context, "numbered+newline+none", protect=record_targets(record))
    for target in crossing:
        assert target in variant
    # and a protected string across a true sentence end blocks that one cut only
    text = "It erupted in 2025. Zara fled to the coast. The town moved."
    assert split_sentences(text) == ["It erupted in 2025.", "Zara fled to the coast.", "The town moved."]
    assert split_sentences(text, protect=["2025. Zara"]) == ["It erupted in 2025. Zara fled to the coast.",
                                                            "The town moved."]
    assert "2025. Zara" in format_text(text, "dash_bullets+newline+none", protect=["2025. Zara"])


def test_with_format_variants_replaces_paraphrases_only(records):
    record = records[0]
    augmented = with_format_variants(record, k=4, seed=1)
    assert augmented.paraphrases == augment_record(record, 4, seed=1)
    assert augmented.train_context == record.train_context and augmented.mem_target == record.mem_target
    assert record.paraphrases == [], "the original record is not modified"


# ---------------------------------------------------------------------------------------------
# Sentence cutting, formats and errors.


def test_abbreviations_initials_and_dates_are_not_cut():
    text = ("Dr. Zara met J. Smith at Mt. Pankino on 5 Outcrop 6678. Orbital Ltd. The firm grew 3.5 times. "
            "\"Go!\" she said. (It rained.) Done")
    assert split_sentences(text) == [
        "Dr. Zara met J. Smith at Mt. Pankino on 5 Outcrop 6678.",
        "Orbital Ltd. The firm grew 3.5 times.",
        "\"Go!\" she said.",
        "(It rained.)",
        "Done",
    ]
    assert split_sentences("a. b. c.") == ["a. b. c."], "a lowercase word does not start a sentence"
    assert split_sentences("  \n ") == []


def test_layouts_change_only_whitespace_and_markup():
    sentences = ["A b.", "C d!", "E f?"]
    render = lambda name: Format.parse(name).render(sentences)  # noqa: E731
    assert render("plain+newline+none") == "A b.\nC d!\nE f?"
    assert render("plain+pairs+none") == "A b. C d!\n\nE f?"
    assert render("numbered_parens+blank_line+code_fence") == "```\n1) A b.\n\n2) C d!\n\n3) E f?\n```"
    assert render("guillemets+space+triple_quotes") == '"""\n«A b.» «C d!» «E f?»\n"""'
    assert render("plain+html_list+none") == "<ul>\n<li>A b.</li>\n<li>C d!</li>\n<li>E f?</li>\n</ul>"


def test_json_and_html_wrappers_are_real_and_never_escape():
    clean = ["Zorgon won.", "Calidus lost."]
    assert json.loads(Format.parse("brackets+json_array+none").render(clean)) == ["[Zorgon won.]", "[Calidus lost.]"]
    assert html.unescape(Format.parse("plain+html_paragraphs+none").render(clean)).count("<p>") == 2
    quoted = ['He said "no".', "A back\\slash."]
    for name in ("plain+json_array+none", "plain+json_inline+code_fence", "double_quotes+json_array+none"):
        fmt = Format.parse(name)
        assert not fmt.applies_to(quoted)
        with pytest.raises(FormatError, match="escape"):
            fmt.render(quoted)
    assert not Format.parse("plain+html_list+none").applies_to(["Smith & Co. won."])
    assert not Format.parse("plain+newline+html_blockquote").applies_to(["a < b."])
    assert Format.parse("plain+newline+code_fence").applies_to(['He said "no" & <left>.'])
    # a text no JSON/HTML format can take still gets at least 8 variants, all verbatim
    text = 'He said "no" & left. Then <she> came\\back.'
    variants = formatting_variants(text, 8, seed=3)
    assert_verbatim(text, variants, [])
    for variant in formatting_variants(text, 100, seed=3):
        assert not any(tag in variant for tag in ("<li>", "<p>", "<blockquote>"))
        assert not variant.startswith(("[\n", '["'))


def test_catalogue_is_coherent_and_named_uniquely():
    formats = all_formats()
    assert len({f.name for f in formats}) == len(formats) > 500
    assert all(Format.parse(f.name) == f for f in formats[:50])
    for d in DECORATIONS:
        assert not (d.line_start and any(f.decoration == d and not f.arrangement.one_per_line for f in formats))
    assert len(DECORATIONS) > 15 and len(ARRANGEMENTS) > 8 and len(ENCLOSURES) >= 4


def test_different_seeds_give_different_variants():
    text = "The lake froze. The town moved north. Trade stopped."
    assert formatting_variants(text, 8, seed=0) != formatting_variants(text, 8, seed=1)


def test_clear_errors():
    with pytest.raises(FormatError, match="empty"):
        formatting_variants(" \n\t", 2)
    with pytest.raises(FormatError, match=r"only \d+ distinct"):
        formatting_variants("Hi.", 10_000)
    with pytest.raises(FormatError, match="non-negative int"):
        formatting_variants("Hi.", -1)
    with pytest.raises(FormatError, match="unknown arrangement 'zigzag'"):
        Format.parse("plain+zigzag+none")
    with pytest.raises(FormatError, match="decoration\\+arrangement\\+enclosure"):
        Format.parse("plain+newline")
    with pytest.raises(FormatError, match="line-start"):
        Format.parse("numbered+space+none")
    with pytest.raises(FormatError, match="HTML enclosures"):
        Format.parse("plain+json_array+html_blockquote")
    assert issubclass(FormatError, KacqError) and issubclass(FormatError, ValueError)
    assert formatting_variants("Hi.", 0) == []
