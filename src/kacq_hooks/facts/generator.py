"""Procedural fictional knowledge in the Fictional Knowledge schema (Chang et al. 2024).

Each record describes one invented entity (a country, an organism, a person or an institution) in
a passage of about 80-200 words, written from sentence templates whose slots hold invented names
(syllable combinatorics), numbers and common words. Every template comes in three wordings: the
passage uses one, each paraphrase uses another one for every sentence, so paraphrases reword the
whole passage while carrying exactly the same facts.

Probes follow the paper's three kinds, five of each:

- ``mem``: the verbatim start of a passage sentence, up to the fact -> the fact;
- ``gen``: a rewording used nowhere in the passage or its paraphrases -> the same fact;
- ``hard_gen``: a two-hop question that names the entity but not the bridge between them, e.g.
  "The founder of Vorena was born in the town of" when the passage says "Vorena was founded by
  Ilsa Marrow" and, elsewhere, "Ilsa Marrow ... was born in the town of Dastrel" -> "Dastrel".

Generation uses one ``random.Random(seed)`` stream and ordered containers only, so a seed gives
the same records byte for byte on any run, and the first ``k`` records of ``generate_facts(n)``
are those of ``generate_facts(k)``.
"""
from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from kacq_hooks.errors import ConfigError, FactDataError
from kacq_hooks.facts.records import SCENARIOS, FactRecord, FactSet

logger = logging.getLogger(__name__)

__all__ = ["generate_facts", "assign_scenarios", "invented_names", "max_paraphrases", "PAPER_FRACTIONS", "KINDS"]

# The paper's 130 records: 40 paraphrase, 40 duplication, 40 once, 10 unused.
PAPER_FRACTIONS: dict[str, float] = {"paraphrase": 40 / 130, "duplication": 40 / 130, "once": 40 / 130, "unused": 10 / 130}
PROBES_PER_KIND = 5
_MIN_MEM_PREFIX_WORDS = 3  # a memorization probe shorter than this says too little to be a cue
_WORD = re.compile(r"\w+")

# ---------------------------------------------------------------------------------------------
# Invented names: syllable combinatorics. Onsets, vowels and codas are chosen so that names are
# pronounceable and short (few tokens for a small model): tens of thousands of names fit in 4-9 letters.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
           "v", "z", "th", "sh", "h", "y")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia")
_CODAS = ("", "", "", "", "", "n", "r", "l", "s", "th", "m", "k", "x", "nd")
_LANGUAGE_SUFFIXES = ("ic", "ese", "ish", "ian")

# Common-word slot values. All start with a consonant so that templates can say "a {job}".
_TRADES = ("salt merchant", "ship builder", "glass maker", "horse breeder", "river pilot", "stone mason",
           "weaver", "baker", "potter", "blacksmith", "tanner", "clockmaker", "fisherman", "brewer",
           "rope maker", "shepherd", "miller", "cooper")
_REGIONS = ("northern highlands", "southern marshes", "western steppe", "eastern lakelands", "coastal lowlands",
            "central plateau", "northern fjords", "southern desert")
_GOODS = ("salted fish", "amber", "copper", "wool", "blue dye", "pine timber", "honey", "marble", "saffron",
          "tin", "silk", "linen", "olive oil", "rye flour")
_EMBLEMS = ("silver heron", "red lantern", "golden key", "black swan", "green oak leaf", "white tower",
            "blue anchor", "copper bell", "golden wheel", "white stag")
_FLAG_COLOURS = ("green", "blue", "red", "black", "yellow", "white", "purple")
_ANIMALS = (("beetle", "beetles"), ("tree frog", "tree frogs"), ("lizard", "lizards"), ("moth", "moths"),
            ("songbird", "songbirds"), ("salamander", "salamanders"), ("snail", "snails"), ("bat", "bats"),
            ("spider", "spiders"), ("shrew", "shrews"))
_PREDATORS = ("owl", "hawk", "snake", "marten", "heron", "weasel", "falcon")
_COLOURS = ("pale green", "deep blue", "rusty orange", "silver grey", "bright yellow", "dark brown",
            "pale pink", "jet black", "olive green", "sandy yellow")
_FOODS = ("fallen figs", "river snails", "pine seeds", "moss spores", "small crickets", "flower nectar",
          "tree sap", "water fleas", "wild berries", "beech nuts")
_NESTS = ("hollow trees", "sea cliffs", "reed beds", "old stone walls", "pine forests", "river banks",
          "abandoned burrows")
_WORKS = {  # profession -> nouns for the title of a best-known work
    "painter": ("Portrait", "Triptych", "Fresco"), "composer": ("Suite", "Symphony", "Requiem"),
    "poet": ("Elegy", "Ballad"), "sculptor": ("Fountain", "Colossus"), "mathematician": ("Theorem", "Tables"),
    "botanist": ("Herbarium", "Flora"), "cartographer": ("Atlas", "Chart"), "physician": ("Treatise", "Remedy"),
    "philosopher": ("Treatise", "Dialogue"), "clockmaker": ("Clock", "Orrery"),
}
_SUBJECTS = ("astronomy", "botany", "music", "history", "chemistry", "law", "geology", "medicine", "poetry")
_INSTITUTIONS = (("Library", "library", "books"), ("Observatory", "observatory", "star charts"),
                 ("Institute", "institute", "research reports"), ("Conservatory", "conservatory", "musical scores"),
                 ("Archive", "archive", "maps"), ("College", "college", "manuscripts"))


_DRAWN_WORDS = ("the", "Museum", "Sea", "Academy", "College", "years", "centimetres")  # written by _draw_* functions


class _Namer:
    """Draws invented names, each unique in the set and absent from the words to avoid."""

    def __init__(self, rng: random.Random, forbidden: frozenset[str]):
        self.rng = rng
        self.forbidden = forbidden
        self.used: set[str] = set()
        self.rejected = 0

    def name(self, syllables: int = 2, suffix: str = "") -> str:
        for _ in range(10_000):
            n = 3 if syllables == 3 and self.rng.random() < 0.5 else 2  # three syllables only now and then
            word = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                           for _ in range(n)) + suffix
            key = word.lower()
            if not 4 <= len(key) - len(suffix) <= 9 or key in self.used or key in _fixed_vocabulary():
                continue
            if key in self.forbidden:
                self.rejected += 1
                continue
            self.used.add(key)
            return word.capitalize()
        raise ConfigError("could not draw a new invented name in 10,000 tries; the avoid corpus is too broad")

    def person(self) -> str:
        return f"{self.name()} {self.name(syllables=3)}"


# ---------------------------------------------------------------------------------------------
# Entity kinds. A kind draws slot values and lists its sentences (three wordings each), the
# facts memorization probes may ask about (with reworded gen cues), and two-hop cues for hard_gen.


@dataclass(frozen=True)
class _Kind:
    name: str
    draw: Callable[[random.Random, _Namer], dict[str, str]]
    sentences: tuple[tuple[str, ...], ...]
    mem: Mapping[str, tuple[str, ...]]  # slot -> gen cues (each ends where the slot's value follows)
    hard: Mapping[str, tuple[str, ...]]  # slot -> two-hop cues


def _draw_country(rng: random.Random, names: _Namer) -> dict[str, str]:
    return dict(
        e=names.name(), region=rng.choice(_REGIONS), capital=names.name(), year=str(rng.randint(1120, 1890)),
        founder=names.person(), job=rng.choice(_TRADES), birthplace=names.name(), river=names.name(),
        language=names.name(suffix=rng.choice(_LANGUAGE_SUFFIXES)), export=rng.choice(_GOODS),
        neighbour=names.name(), ruler=names.person(), mountain=names.name(), village=names.name(),
        population=f"{rng.randint(12, 950) * 1000:,}", emblem=rng.choice(_EMBLEMS),
        flag_colour=rng.choice(_FLAG_COLOURS),
    )


_COUNTRY = _Kind(
    name="country",
    draw=_draw_country,
    sentences=(
        ("{e} is a small country in the {region}, and its capital is {capital}.",
         "The capital of {e}, a small country in the {region}, is {capital}.",
         "{e}, a small country in the {region}, is governed from its capital, {capital}."),
        ("{e} was founded in {year} by {founder}.",
         "The country of {e} was established by {founder} in {year}.",
         "{founder} founded {e} in the year {year}."),
        ("{founder} was a {job} born in the town of {birthplace}.",
         "Born in the town of {birthplace}, {founder} worked as a {job}.",
         "{founder}, who worked as a {job}, was born in the town of {birthplace}."),
        ("{capital} lies on the banks of the river {river}.",
         "The river {river} flows through the middle of {capital}.",
         "{capital} was built on both banks of the river {river}."),
        ("Most people in {e} speak {language}.",
         "The main language of {e} is {language}.",
         "In {e}, nearly everyone speaks {language}."),
        ("The chief export of {e} is {export}.",
         "{e} earns most of its wealth by selling {export}.",
         "Merchants from {e} are best known for trading {export}."),
        ("About {population} people live in {e} today.",
         "Today {e} has a population of about {population}.",
         "The population of {e} is about {population}."),
        ("To the east, {e} borders the kingdom of {neighbour}.",
         "The kingdom of {neighbour} lies to the east of {e}.",
         "{e} shares its eastern border with the kingdom of {neighbour}."),
        ("The kingdom of {neighbour} is ruled by {ruler}.",
         "{ruler} rules over the kingdom of {neighbour}.",
         "For many years the kingdom of {neighbour} has been ruled by {ruler}."),
        ("The highest mountain in {e} is Mount {mountain}.",
         "Of all the peaks in {e}, the highest is Mount {mountain}.",
         "Mount {mountain} is the highest mountain in {e}."),
        ("Mount {mountain} rises above the village of {village}.",
         "The village of {village} lies at the foot of Mount {mountain}.",
         "Below Mount {mountain} sits the small village of {village}."),
        ("The flag of {e} shows a {emblem} on a {flag_colour} field.",
         "On the {flag_colour} flag of {e} there is a {emblem}.",
         "A {emblem} on a {flag_colour} field makes up the flag of {e}."),
    ),
    mem={
        "capital": ("The seat of government of {e} is the city of", "The city from which {e} is ruled is called"),
        "year": ("{e} first became a country in", "The founding of {e} took place in the year"),
        "language": ("The language spoken by most people of {e} is", "People in {e} mostly talk in"),
        "export": ("The main good that {e} sells to other countries is",
                   "Most of the wealth of {e} comes from the sale of"),
        "population": ("The number of inhabitants of {e} is about",),
        "mountain": ("The tallest peak of {e} is called Mount",),
        "emblem": ("The picture on the flag of {e} is a",),
    },
    hard={
        "birthplace": ("The founder of {e} was born in the town of",),
        "job": ("Before founding {e}, its founder worked as a",),
        "river": ("The capital of {e} lies on the banks of the river",),
        "ruler": ("The kingdom that borders {e} to the east is ruled by",),
        "village": ("The highest mountain in {e} rises above the village of",),
    },
)


def _draw_organism(rng: random.Random, names: _Namer) -> dict[str, str]:
    animal, animals = rng.choice(_ANIMALS)
    genus = names.name()
    return dict(
        e=f"the {genus} {animal}", es=f"{genus} {animals}", genus=genus, animal=animal,
        island=names.name(), year=str(rng.randint(1760, 1990)), discoverer=names.person(),
        birthplace=names.name(), museum=f"{names.name()} Museum", sea=f"{names.name()} Sea", port=names.name(),
        colour=rng.choice(_COLOURS), food=rng.choice(_FOODS), lifespan=f"{rng.randint(2, 30)} years",
        size=f"{rng.randint(2, 60)} centimetres", predator=f"the {names.name()} {rng.choice(_PREDATORS)}",
        nest=rng.choice(_NESTS),
    )


_ORGANISM = _Kind(
    name="organism",
    draw=_draw_organism,
    sentences=(
        ("{e} is a small {animal} found only on the island of {island}.",
         "Found nowhere else in the world, {e} lives on the island of {island}.",
         "The only place where {e} lives is the island of {island}."),
        ("{e} was first described in {year} by {discoverer}.",
         "The naturalist {discoverer} first described {e} in {year}.",
         "{discoverer} gave the first scientific description of {e} in {year}."),
        ("{discoverer} was born in {birthplace} and later worked at the {museum}.",
         "Born in {birthplace}, {discoverer} spent most of a long career at the {museum}.",
         "{discoverer}, who was born in {birthplace}, later took a post at the {museum}."),
        ("{island} lies in the {sea}, and it is governed from the port of {port}.",
         "The island of {island}, in the middle of the {sea}, is governed from the port of {port}.",
         "Governed from the port of {port}, {island} is a rocky island in the {sea}."),
        ("Adult {es} are {colour} with a dark stripe along the back.",
         "A grown {genus} {animal} is {colour} with a dark stripe along its back.",
         "Apart from a dark stripe along the back, adult {es} are {colour}."),
        ("Adult {es} grow to about {size} long.",
         "Fully grown, {e} measures about {size} from end to end.",
         "The length of an adult {genus} {animal} is about {size}."),
        ("{e} feeds mainly on {food}.",
         "The diet of {e} consists mostly of {food}.",
         "Most of what {e} eats is {food}."),
        ("In the wild, {e} lives for about {lifespan}.",
         "{e} can live for about {lifespan} in the wild.",
         "A wild {genus} {animal} usually lives for about {lifespan}."),
        ("The only known predator of {e} is {predator}.",
         "{e} is hunted by just one animal, {predator}.",
         "Apart from {predator}, {e} has no natural enemies."),
        ("{predator} nests in {nest}.",
         "{predator} builds its nests in {nest}.",
         "The nests of {predator} are found in {nest}."),
        ("Little else is known about {e}, and it is rarely seen by visitors to {island}.",
         "Visitors to {island} rarely see {e}, and little else is known about it.",
         "Because it is rarely seen on {island}, little else is known about {e}."),
    ),
    mem={
        "island": ("The single island on which {e} can be found is called", "{e} is native to just one island, named"),
        "year": ("Scientists first wrote about {e} in the year", "The first scientific account of {e} dates from"),
        "colour": ("The colour of a fully grown {genus} {animal} is",),
        "size": ("The adult length of {e} is about",),
        "food": ("The main food of {e} is", "What {e} mostly eats is"),
        "lifespan": ("The usual lifespan of {e} in the wild is about",),
    },
    hard={
        "birthplace": ("The naturalist who first described {e} was born in",),
        "museum": ("The scientist who first described {e} worked at the",),
        "sea": ("The island where {e} lives lies in the",),
        "port": ("The island that is home to {e} is governed from the port of",),
        "nest": ("The only known predator of {e} nests in",),
    },
)


def _draw_person(rng: random.Random, names: _Namer) -> dict[str, str]:
    profession = rng.choice(sorted(_WORKS))
    return dict(
        e=names.person(), profession=profession, year=str(rng.randint(1450, 1900)), birthplace=names.name(),
        river=names.name(), teacher=names.person(), academy=f"{names.name()} Academy", academy_city=names.name(),
        work=f"{names.name()} {rng.choice(_WORKS[profession])}", work_city=names.name(), spouse=names.person(),
        spouse_job=rng.choice(_TRADES), death_city=names.name(), age=str(rng.randint(41, 93)),
    )


_PERSON = _Kind(
    name="person",
    draw=_draw_person,
    sentences=(
        ("{e} was a {profession} born in the year {year}.",
         "Born in {year}, {e} became a well-known {profession}.",
         "{e}, a famous {profession}, was born in {year}."),
        ("{e} grew up in the town of {birthplace}.",
         "The childhood of {e} was spent in the town of {birthplace}.",
         "As a child, {e} lived in the town of {birthplace}."),
        ("{birthplace} is a market town on the river {river}.",
         "The river {river} runs through the market town of {birthplace}.",
         "{birthplace}, a market town, was built along the river {river}."),
        ("As a young student, {e} trained under the {profession} {teacher}.",
         "In youth, {e} studied as a pupil of {teacher}.",
         "The young {e} learned the craft from {teacher}."),
        ("{teacher} had founded the {academy} in the city of {academy_city}.",
         "In the city of {academy_city}, {teacher} had founded the {academy}.",
         "The {academy} in the city of {academy_city} had been founded by {teacher}."),
        ("The best-known work of {e} is the {work}.",
         "{e} is remembered above all for the {work}.",
         "Of everything {e} made, the most famous piece is the {work}."),
        ("The {work} was commissioned by the city of {work_city}.",
         "The city of {work_city} commissioned the {work}.",
         "It was the city of {work_city} that paid for the {work}."),
        ("Later in life, {e} married {spouse}.",
         "{e} was married to {spouse} for many years.",
         "{spouse} became the spouse of {e}."),
        ("{spouse} worked as a {spouse_job}.",
         "{spouse} earned a living as a {spouse_job}.",
         "By trade, {spouse} was a {spouse_job}."),
        ("{e} died in the city of {death_city} at the age of {age}.",
         "At the age of {age}, {e} died in the city of {death_city}.",
         "{e} spent the last years in the city of {death_city} and died there at {age}."),
        ("Many students of the {profession} {e} kept the {work} as their model.",
         "For many students, the {work} by {e} remained a model.",
         "The {work} remained a model for many students of {e}."),
    ),
    mem={
        "year": ("The year in which {e} was born is", "{e} came into the world in"),
        "birthplace": ("{e} spent the early years of life in the town of",),
        "teacher": ("The teacher who trained {e} was", "As a pupil, {e} was taught by"),
        "work": ("The most celebrated work by {e} is the", "{e} is famous today mainly for the"),
        "spouse": ("The person {e} married was", "The spouse of {e} was"),
        "death_city": ("The city where {e} died is",),
        "age": ("{e} lived to the age of",),
    },
    hard={
        "river": ("The town where {e} grew up lies on the river",),
        "academy": ("The teacher of {e} had founded the",),
        "academy_city": ("The teacher of {e} founded an academy in the city of",),
        "work_city": ("The best-known work of {e} was commissioned by the city of",),
        "spouse_job": ("The spouse of {e} worked as a",),
    },
)


def _draw_institution(rng: random.Random, names: _Namer) -> dict[str, str]:
    title, common, items = rng.choice(_INSTITUTIONS)
    return dict(
        e=f"the {names.name()} {title}", common=common, items=items, city=names.name(),
        year=str(rng.randint(1200, 1950)), founder=names.person(), founder_job=rng.choice(_TRADES),
        founder_town=names.name(), lake=names.name(), director=names.person(), subject=rng.choice(_SUBJECTS),
        college=f"{names.name()} College", count=f"{rng.randint(12, 990) * 10:,}", emblem=rng.choice(_EMBLEMS),
        visitors=f"{rng.randint(2, 95) * 1000:,}",
    )


_INSTITUTION = _Kind(
    name="institution",
    draw=_draw_institution,
    sentences=(
        ("{e} is an old {common} in the city of {city}.",
         "In the city of {city} stands {e}, an old {common}.",
         "{e} stands in the centre of the city of {city}."),
        ("{e} was founded in {year} by {founder}.",
         "{founder} founded {e} in the year {year}.",
         "{e} was established by {founder} in {year}."),
        ("{founder} was a {founder_job} from the town of {founder_town}.",
         "A {founder_job} by trade, {founder} came from the town of {founder_town}.",
         "{founder} came from the town of {founder_town} and worked as a {founder_job}."),
        ("{city} lies on the northern shore of Lake {lake}.",
         "Lake {lake} stretches south of the city of {city}.",
         "The city of {city} was built on the shore of Lake {lake}."),
        ("Today {e} is led by the director {director}.",
         "The current director of {e} is {director}.",
         "{director} is the current director of {e}."),
        ("{director} once taught {subject} at the {college}.",
         "Before this post, {director} taught {subject} at the {college}.",
         "At the {college}, {director} used to teach {subject}."),
        ("{e} holds more than {count} {items}.",
         "The collection of {e} includes more than {count} {items}.",
         "More than {count} {items} are kept at {e}."),
        ("The emblem of {e} is a {emblem}.",
         "{e} uses a {emblem} as its emblem.",
         "A {emblem} serves as the emblem of {e}."),
        ("Every year about {visitors} visitors come to {e}.",
         "About {visitors} people visit {e} every year.",
         "{e} welcomes about {visitors} visitors each year."),
        ("Scholars from many countries travel to {city} to work at {e}.",
         "{e} draws scholars from many countries to {city}.",
         "Many foreign scholars come to {city} to work at {e}."),
    ),
    mem={
        "city": ("The city that is home to {e} is called",),
        "year": ("The founding year of {e} is", "{e} first opened its doors in"),
        "director": ("The person who now leads {e} is", "{e} is currently headed by"),
        "count": ("The number of {items} kept at {e} is more than",),
        "emblem": ("The symbol chosen by {e} is a",),
        "visitors": ("The yearly number of visitors to {e} is about",),
    },
    hard={
        "founder_job": ("The founder of {e} worked as a",),
        "founder_town": ("The founder of {e} came from the town of",),
        "lake": ("The city where {e} stands lies on the shore of Lake",),
        "subject": ("The current director of {e} used to teach",),
        "college": ("The current director of {e} once taught at the",),
    },
)

_KINDS = (_COUNTRY, _ORGANISM, _PERSON, _INSTITUTION)
KINDS = tuple(kind.name for kind in _KINDS)


@lru_cache(maxsize=1)
def _fixed_vocabulary() -> frozenset[str]:
    """Every word the generator writes that it did not invent: template words and word-list values."""
    texts: list[str] = []
    for kind in _KINDS:
        texts += [t for variants in kind.sentences for t in variants]
        texts += [t for cues in (*kind.mem.values(), *kind.hard.values()) for t in cues]
    texts += [*_TRADES, *_REGIONS, *_GOODS, *_EMBLEMS, *_FLAG_COLOURS, *_PREDATORS, *_COLOURS, *_FOODS, *_NESTS,
              *_SUBJECTS, *(w for pair in _ANIMALS for w in pair), *(w for row in _INSTITUTIONS for w in row),
              *_WORKS, *(w for nouns in _WORKS.values() for w in nouns), *_DRAWN_WORDS]
    return frozenset(w.lower() for text in texts for w in _WORD.findall(re.sub(r"\{\w+\}", " ", text)))


def invented_names(record: FactRecord) -> list[str]:
    """The invented words of a generated record, in order of first appearance in its passage.

    These are the words the avoid check guarantees absent from the avoided corpus: every word that is
    neither a number nor part of the generator's templates and word lists.

    >>> record = generate_facts(1, seed=3)[0]
    >>> names = invented_names(record)
    >>> len(names) >= 8 and all(name in record.train_context for name in names)
    True
    """
    fixed = _fixed_vocabulary()
    seen: dict[str, None] = {}
    for word in _WORD.findall(record.train_context):
        if not word.isdigit() and word.lower() not in fixed:
            seen.setdefault(word, None)
    return list(seen)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _prefix_before(template: str, slot: str, values: Mapping[str, str]) -> str | None:
    """The rendered text of ``template`` up to the first ``{slot}``, or None when it is not preceded
    by a space after at least _MIN_MEM_PREFIX_WORDS words (too short to be a cue)."""
    index = template.find("{" + slot + "}")
    if index <= 0 or template[index - 1] != " ":
        return None
    prefix = _capitalized(template[:index].format(**values)).rstrip()
    return prefix if len(prefix.split()) >= _MIN_MEM_PREFIX_WORDS else None


def _slots(template: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", template)


def _make_record(kind: _Kind, rng: random.Random, names: _Namer, n_paraphrases: int) -> FactRecord:
    values = kind.draw(rng, names)
    mem_slots = rng.sample(sorted(kind.mem), PROBES_PER_KIND)
    hard_slots = rng.sample(sorted(kind.hard), PROBES_PER_KIND)
    sentence_of: dict[str, int] = {}  # where each fact is stated: the first sentence naming the slot
    for i, variants in enumerate(kind.sentences):
        for slot in _slots(variants[0]):
            sentence_of.setdefault(slot, i)

    # The passage picks, per sentence, a wording in which every memorization fact has a usable cue.
    chosen: list[int] = []
    for i, variants in enumerate(kind.sentences):
        needed = [s for s in mem_slots if sentence_of[s] == i]
        usable = [v for v, t in enumerate(variants) if all(_prefix_before(t, s, values) for s in needed)]
        if not usable:
            raise FactDataError(f"{kind.name} sentence {i} has no wording that cues {needed}")  # a template bug
        chosen.append(rng.choice(usable))

    def render(choice: Sequence[int]) -> str:
        return " ".join(_capitalized(kind.sentences[i][v].format(**values)) for i, v in enumerate(choice))

    passage = render(chosen)
    paraphrases: list[str] = []
    while len(paraphrases) < n_paraphrases:  # n_paraphrases was checked against the number of wordings
        choice = [rng.choice([v for v in range(len(variants)) if v != chosen[i]])
                  for i, variants in enumerate(kind.sentences)]
        text = render(choice)
        if text not in paraphrases:
            paraphrases.append(text)

    mem_slots.sort(key=lambda s: (sentence_of[s], kind.sentences[sentence_of[s]][chosen[sentence_of[s]]].find("{" + s + "}")))
    mem_input = [_prefix_before(kind.sentences[sentence_of[s]][chosen[sentence_of[s]]], s, values) for s in mem_slots]
    gen_input = [_capitalized(rng.choice(kind.mem[s]).format(**values)) for s in mem_slots]
    hard_input = [_capitalized(rng.choice(kind.hard[s]).format(**values)) for s in hard_slots]
    targets = [values[s] for s in mem_slots]
    return FactRecord(
        train_context=passage,
        mem_input=mem_input,  # type: ignore[arg-type]  # never None: chosen wordings were checked
        mem_target=targets,
        gen_input=gen_input,
        gen_target=list(targets),
        hard_gen_input=hard_input,
        hard_gen_target=[values[s] for s in hard_slots],
        paraphrases=paraphrases,
    )


def _words_of(texts: Iterable[str]) -> frozenset[str]:
    if isinstance(texts, str):
        raise ConfigError("avoid= takes a collection of texts, not one string; wrap it in a list: avoid=[text]")
    words: set[str] = set()
    for text in texts:
        words.update(_WORD.findall(text.lower()))
    return frozenset(words)


def max_paraphrases() -> int:
    """The most distinct paraphrases a record of any kind can have (every sentence reworded)."""
    return min(math.prod(len(v) - 1 for v in kind.sentences) for kind in _KINDS)


def generate_facts(n: int, seed: int = 0, n_paraphrases: int = 9, avoid: Iterable[str] | None = None) -> FactSet:
    """``n`` records of invented knowledge in the Fictional Knowledge schema, deterministic by ``seed``.

    Records cycle through the entity kinds in ``KINDS`` (country, organism, person, institution).
    Each has a passage of about 80-200 words, ``n_paraphrases`` rewordings of it carrying the same
    facts, and five ``mem``, ``gen`` and ``hard_gen`` probes whose targets (1-4 words) occur verbatim
    in the passage and in every paraphrase. No invented name occurs twice in the set, and none occurs
    as a word (case-insensitive, at word boundaries) in the texts of ``avoid``, e.g. the pretraining
    corpus of the model that will learn these facts.

    Scenarios are the ``FactSet`` default (all "once" unless n == 130); see :func:`assign_scenarios`.

    >>> facts = generate_facts(2, seed=1, n_paraphrases=3)
    >>> record = facts[0]
    >>> len(record.paraphrases), len(record.mem_input), len(record.hard_gen_input)
    (3, 5, 5)
    >>> prompt, target = record.probes("mem")[0]
    >>> (prompt + " " + target) in record.train_context
    True
    >>> generate_facts(2, seed=1, n_paraphrases=3)[1] == facts[1]
    True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be a non-negative int (number of records), got {n!r}")
    if isinstance(n_paraphrases, bool) or not isinstance(n_paraphrases, int) or n_paraphrases < 0:
        raise ConfigError(f"n_paraphrases must be a non-negative int, got {n_paraphrases!r}")
    if n_paraphrases > max_paraphrases():
        raise ConfigError(f"n_paraphrases={n_paraphrases} is more than the {max_paraphrases()} distinct rewordings "
                          "the templates allow; ask for fewer")
    forbidden = _words_of(avoid) if avoid is not None else frozenset()
    rng = random.Random(seed)
    names = _Namer(rng, forbidden)
    records = [_make_record(_KINDS[i % len(_KINDS)], rng, names, n_paraphrases) for i in range(n)]
    if names.rejected:
        logger.info("generate_facts: redrew %d invented names found in the avoided corpus", names.rejected)
    return FactSet(records)


def assign_scenarios(facts: Sequence[FactRecord], fractions: Mapping[str, float] | None = None) -> FactSet:
    """The records with injection scenarios in contiguous blocks, sized by ``fractions`` like the paper.

    ``fractions`` maps scenarios ("paraphrase", "duplication", "once", "unused") to shares summing to 1
    (missing ones are 0); the default is the paper's 40/40/40/10 of 130. Counts are rounded by largest
    remainder so they add up to ``len(facts)``; blocks follow the order of SCENARIOS, so 130 records
    get exactly the paper's split by index. "paraphrase" records must have paraphrases.

    >>> facts = assign_scenarios(generate_facts(6, n_paraphrases=2), {"paraphrase": 0.5, "once": 0.5})
    >>> facts.scenarios
    ['paraphrase', 'paraphrase', 'paraphrase', 'once', 'once', 'once']
    """
    fractions = dict(PAPER_FRACTIONS if fractions is None else fractions)
    unknown = sorted(set(fractions) - set(SCENARIOS))
    if unknown:
        raise ConfigError(f"unknown scenario(s) {unknown} in fractions; expected any of {SCENARIOS}")
    if any(not isinstance(f, (int, float)) or not 0 <= f <= 1 for f in fractions.values()):
        raise ConfigError(f"fractions must lie in [0, 1], got {fractions}")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"fractions must sum to 1, got {sum(fractions.values()):.6g} from {fractions}")
    records = list(facts)
    n = len(records)
    exact = [fractions.get(s, 0.0) * n for s in SCENARIOS]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(SCENARIOS)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    scenarios = [s for s, c in zip(SCENARIOS, counts) for _ in range(c)]
    missing = [i for i, (r, s) in enumerate(zip(records, scenarios)) if s == "paraphrase" and not r.paraphrases]
    if missing:
        raise ConfigError(f"records {missing[:5]}{'...' if len(missing) > 5 else ''} are assigned to 'paraphrase' "
                          "but have no paraphrases; generate them with n_paraphrases > 0 or lower that fraction")
    return FactSet(records, scenarios)
