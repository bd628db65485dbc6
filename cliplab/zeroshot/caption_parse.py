"""Caption parsers for compositional matching: a caption -> its entities (with attributes) and relations.

ComCLIP (and other region-aware matchers) need a caption split into *entities* ("large red circle": a head noun with
its attributes) and *relations* (subject, predicate, object). The paper asks an LLM for that JSON; here two parsers
stand in for it, both returning :class:`CaptionParts`:

* :func:`parse_synthetic_caption`: exact, for the synthetic world's short captions (it inverts the caption grammar
  with :func:`cliplab.data.synthetic.captions.parse_short_caption`);
* :func:`parse_caption_rules`: rule-based, for short free text ("a dog chasing a cat", "the cup is on the table"):
  determiners dropped, the last word of a noun phrase is its head, the words before it its attributes, and the first
  relation phrase (a preposition list, longest first) or verb (``-ing``/``-s`` word, or one of a few common verbs)
  splits subject from object;
* :func:`parse_caption`: the synthetic grammar when the text is in it, else the rules.

A parser is any callable ``str -> CaptionParts`` (:data:`CaptionParser`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Entity", "Relation", "CaptionParts", "CaptionParser", "parse_synthetic_caption", "parse_caption_rules",
           "parse_caption", "RELATION_PHRASES"]


@dataclass(frozen=True)
class Entity:
    """One thing a caption names. ``name``: the head noun (singular for the synthetic grammar; what region labels
    are matched against); ``attributes``: the words that qualify it, in caption order; ``count``: how many;
    ``phrase``: the text that is encoded for it (attributes + noun, as the official code's ``"{attributes} {key}"``)."""

    name: str
    attributes: tuple[str, ...] = ()
    count: int = 1
    phrase: str = ""

    def __post_init__(self):
        if not self.phrase:
            object.__setattr__(self, "phrase", " ".join((*self.attributes, self.name)))


@dataclass(frozen=True)
class Relation:
    """``subject`` and ``object`` are entity names; ``predicate`` the relation's words ("to the left of",
    "chasing")."""

    subject: str
    predicate: str
    object: str


@dataclass(frozen=True)
class CaptionParts:
    text: str
    entities: tuple[Entity, ...] = ()
    relations: tuple[Relation, ...] = ()
    parser: str = field(default="", compare=False)

    def entity(self, name: str) -> Entity | None:
        return next((e for e in self.entities if e.name == name), None)


CaptionParser = Callable[[str], CaptionParts]


# --- the synthetic grammar -------------------------------------------------------------------------------------------
def parse_synthetic_caption(text: str) -> CaptionParts:
    """Exact parse of a synthetic-world short caption (raises ``CaptionParseError``, a ``ValueError``, otherwise).

    One entity per object group of the caption, in caption order: name = shape, attributes = size, colour and texture
    as the caption states them (a single object's texture only when not plain, as the caption writes it), phrase =
    the caption's own noun phrase without its article or number. The relation (if any) keeps the caption's words
    ("to the left of"). A rendered word (``, and the word "cat"``) is not an entity: no region shows it as one."""
    from ..data.synthetic.captions import parse_short_caption
    from ..data.synthetic.vocabulary import PLURALS, RELATIONS

    content = parse_short_caption(text)
    entities = []
    for obj in content["objects"]:
        attrs = tuple(a for a in (obj["size"], obj["colour"], obj["texture"]) if a and a != "plain")
        noun = obj["shape"] if obj["count"] == 1 else PLURALS[obj["shape"]]
        entities.append(Entity(obj["shape"], attrs, obj["count"], " ".join((*attrs, noun))))
    relations = []
    if content["relation"] is not None:
        r = content["relation"]
        relations.append(Relation(r["subject"], RELATIONS[r["relation"]], r["object"]))
    return CaptionParts(text, tuple(entities), tuple(relations), parser="synthetic")


# --- rule-based free text --------------------------------------------------------------------------------------------
#: Relation phrases the rule-based parser recognises (matched longest first, on word boundaries).
RELATION_PHRASES: tuple[str, ...] = (
    "to the left of", "to the right of", "on the left of", "on the right of", "on top of", "in front of",
    "next to", "close to", "far from", "inside of", "out of", "on", "in", "under", "below", "above", "over",
    "behind", "beside", "near", "inside", "with", "at", "by", "holding", "wearing", "riding", "eating",
)
_AUX = {"is", "are", "was", "were", "be", "being", "been", "has", "have"}
_DETERMINERS = {"a", "an", "the", "some", "this", "that", "these", "those", "its", "his", "her", "their", "my",
                "our", "your"}
_NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                        "nine", "ten"))}
_VERB_EXCEPTIONS = {"glass", "grass", "bus", "dress", "class", "boss", "gas", "lens", "news", "this", "his", "is",
                    "was", "has", "ceiling", "building", "king", "ring", "thing", "string", "wing", "something",
                    "nothing", "everything", "painting", "clothing", "morning", "evening"}
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def _noun_phrase(words: list[str]) -> Entity | None:
    words = [w for w in words if w not in _AUX]
    count = 1
    while words and (words[0] in _DETERMINERS or words[0] in _NUMBERS or words[0].isdigit()):
        w = words.pop(0)
        if w in _NUMBERS:
            count = _NUMBERS[w]
        elif w.isdigit():
            count = int(w)
    if not words:
        return None
    return Entity(words[-1], tuple(words[:-1]), count)


def _is_verb(word: str, position: int) -> bool:
    # a crude tagger: a present participle or 3rd-person verb after at least one noun word
    if position == 0 or word in _VERB_EXCEPTIONS or word in _DETERMINERS:
        return False
    return (word.endswith("ing") and len(word) > 4) or (word.endswith("s") and not word.endswith("ss")
                                                        and len(word) > 3 and word[:-1] in _KNOWN_VERB_STEMS)


_KNOWN_VERB_STEMS = {"chase", "eat", "hold", "ride", "wear", "watch", "push", "pull", "carrie", "follow", "hit",
                     "kick", "touch", "cover", "face", "hug", "feed", "lick", "bite", "throw", "catch", "drive",
                     "sit", "stand", "lie", "look", "drink", "play", "walk", "climb", "jump"}


def parse_caption_rules(text: str) -> CaptionParts:
    """Rule-based parse of one clause of free text into ``subject [predicate object]``.

    The first relation phrase (:data:`RELATION_PHRASES`, longest first) or verb after the first word splits the
    caption; the words before are the subject's noun phrase, the words after the object's (a trailing verb with no
    object leaves one entity). Determiners, numbers (which set ``count``) and auxiliaries ("is", "are") are dropped
    from noun phrases. Text with no split is one entity. Lower-cased; punctuation ignored."""
    words = _WORD.findall(text.lower())
    if not words:
        raise ValueError(f"nothing to parse in {text!r}")
    split = None
    phrases = sorted((p.split() for p in RELATION_PHRASES), key=len, reverse=True)
    for k in range(1, len(words)):
        hit = next((p for p in phrases if words[k: k + len(p)] == p), None)
        if hit is not None:
            split = (k, k + len(hit))
            break
        if _is_verb(words[k], k):
            end = k + 1
            # a particle or preposition right after the verb belongs to the predicate ("looking at")
            while end < len(words) and words[end] in {"at", "to", "on", "in", "into", "onto", "over", "up", "down",
                                                      "with", "from", "off", "out", "under"}:
                end += 1
            split = (k, end)
            break
    if split is None:
        entity = _noun_phrase(words)
        return CaptionParts(text, (entity,) if entity else (), (), parser="rules")
    subject, obj = _noun_phrase(words[: split[0]]), _noun_phrase(words[split[1]:])
    predicate = " ".join(w for w in words[split[0]: split[1]] if w not in _AUX)
    entities = tuple(e for e in (subject, obj) if e is not None)
    relations = (Relation(subject.name, predicate, obj.name),) if subject and obj else ()
    return CaptionParts(text, entities, relations, parser="rules")


def parse_caption(text: str) -> CaptionParts:
    """The synthetic grammar's exact parse when ``text`` is in it, else :func:`parse_caption_rules`."""
    from ..data.synthetic.captions import CaptionParseError

    try:
        return parse_synthetic_caption(text)
    except CaptionParseError:
        return parse_caption_rules(text)
