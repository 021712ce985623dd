"""Synthetic named-entity data: utility-engineering work notes with word-level BIO tags.

Sentences are filled-in templates such as "Replace the {EQUIPMENT} on {LOCATION} per
{SPEC_CODE} ." The held-out split is built from templates *and* entity values that the
training split never uses, so its score measures generalisation rather than memory:

- names from closed lists (equipment, materials, organisations, substations) come from two
  disjoint hand-written lists that share head words ("pad-mounted transformer" in training,
  "pole-mounted transformer" held out);
- pattern-built values (codes such as "TD-2305M", measurements such as "12.47 kV", pole
  numbers) are sent to one split or the other by a stable hash of their text, so a held-out
  value is new but has a shape seen in training.

`split_overlap` checks both properties on generated data.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

ENTITY_TYPES = ("EQUIPMENT", "MATERIAL", "SPEC_CODE", "MEASUREMENT", "LOCATION", "ORG")
LABEL_NAMES = ["O"] + [f"{prefix}-{kind}" for kind in ENTITY_TYPES for prefix in ("B", "I")]

Sampler = Callable[[np.random.Generator, bool], str]


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _listed(train: list[str], heldout: list[str]) -> Sampler:
    """Closed-class values: each split draws from its own list."""
    overlap = set(train) & set(heldout)
    assert not overlap, overlap
    return lambda rng, heldout_split: _choice(rng, heldout if heldout_split else train)


def _is_heldout_value(text: str) -> bool:
    return zlib.crc32(text.encode()) % 3 == 0


def _shaped(*builders: Callable[[np.random.Generator], str]) -> Sampler:
    """Pattern-built values; a stable hash of the text decides the split a value belongs to."""

    def sample(rng: np.random.Generator, heldout_split: bool) -> str:
        while True:
            text = _choice(rng, builders)(rng)
            if _is_heldout_value(text) == heldout_split:
                return text

    return sample


def _digits(rng, low, high) -> str:
    return str(int(rng.integers(low, high)))


_EQUIPMENT = _listed(
    [
        "pad-mounted transformer",
        "step-down transformer",
        "recloser",
        "crossarm",
        "sectionalizer",
        "fuse cutout",
        "capacitor bank",
        "guy anchor",
        "pole-top switch",
        "gang-operated switch",
        "lightning arrester",
        "suspension insulator",
        "line post insulator",
        "primary riser",
        "service drop",
    ],
    [
        "pole-mounted transformer",
        "voltage regulator",
        "vacuum recloser",
        "double crossarm",
        "load-break switch",
        "surge arrester",
        "pin insulator",
        "dead-end insulator",
        "down guy",
        "fault indicator",
        "secondary pedestal",
    ],
)
_CONDUCTOR = _listed(
    ["ACSR conductor", "AAC conductor", "hard-drawn copper", "copperweld wire", "triplex cable"],
    ["AAAC conductor", "ACSS conductor", "annealed copper", "aluminum-clad steel", "quadruplex cable"],
)
_POLE_MATERIAL = _listed(
    [
        "Douglas fir",
        "southern yellow pine",
        "galvanized steel",
        "ductile iron",
        "prestressed concrete",
        "creosote-treated wood",
    ],
    [
        "western red cedar",
        "lodgepole pine",
        "weathering steel",
        "spun concrete",
        "fiberglass composite",
        "penta-treated wood",
    ],
)
_ORG = _listed(
    [
        "PG&E",
        "Caltrans",
        "SCE",
        "CAL FIRE",
        "AT&T",
        "Comcast",
        "SMUD",
        "County Public Works",
        "Union Pacific",
    ],
    [
        "SDG&E",
        "PacifiCorp",
        "Verizon",
        "BNSF Railway",
        "Liberty Utilities",
        "City Public Works",
        "Frontier Communications",
    ],
)
_SPEC_CODE = _shaped(
    lambda r: f"TD-{_digits(r, 1000, 10000)}{_choice(r, 'ABMPS')}",
    lambda r: "G.O. " + _choice(r, ["95", "128", "131-D", "165", "166", "167", "174", "112-F"]),
    lambda r: f"ANSI C29.{_digits(r, 1, 20)}",
    lambda r: f"ANSI C57.12.{_digits(r, 10, 100)}",
    lambda r: f"IEEE {_digits(r, 400, 1800)}",
    lambda r: f"NESC Rule {_digits(r, 200, 300)}",
    lambda r: f"ASTM A{_digits(r, 100, 1000)}",
)
_LOCATION_CODES = _shaped(
    lambda r: f"Pole {_digits(r, 100, 10000)}-{_choice(r, 'ABCDEFGH')}",
    lambda r: f"Pole {_digits(r, 100, 10000)}",
    lambda r: f"Span {_digits(r, 1, 200)}",
    lambda r: f"Vault V-{_digits(r, 100, 1000)}",
    lambda r: f"Manhole MH-{_digits(r, 10, 1000)}",
    lambda r: f"Circuit {_digits(r, 1000, 10000)}",
)
_SUBSTATIONS = _listed(
    [
        "Substation Elm Creek",
        "Substation Oak Ridge",
        "Substation Mill Valley",
        "Substation Cedar Hill",
        "Substation Stony Point",
        "Substation Bay Meadows",
        "Substation Las Lomas",
        "Substation Round Valley",
    ],
    [
        "Substation Pine Flat",
        "Substation Willow Pass",
        "Substation Granite Bay",
        "Substation Fox Hollow",
        "Substation Del Monte",
    ],
)


def _location(rng: np.random.Generator, heldout_split: bool) -> str:
    sampler = _SUBSTATIONS if rng.random() < 0.2 else _LOCATION_CODES
    return sampler(rng, heldout_split)


_LENGTH = _shaped(lambda r: f"{_digits(r, 3, 151)} ft", lambda r: f"{_digits(r, 2, 49)} in")
_VOLTAGE = _shaped(
    lambda r: (
        _choice(
            r,
            [
                "2.4",
                "4.16",
                "4.8",
                "7.2",
                "12",
                "12.47",
                "13.2",
                "13.8",
                "17.2",
                "21",
                "25",
                "34.5",
                "44",
                "60",
                "69",
                "115",
                "138",
            ],
        )
        + " kV"
    )
)
_CURRENT = _shaped(lambda r: f"{int(r.integers(20, 2500)) * 10} A")
_SIZE = _shaped(
    lambda r: _choice(r, ["266.8", "336.4", "397.5", "477", "556.5", "636", "795", "954", "1033.5", "1272"]) + " kcmil",
    lambda r: _choice(r, ["#6", "#4", "#2", "1/0", "2/0", "3/0", "4/0"]) + " AWG",
)
_KVA = _shaped(lambda r: _choice(r, ["10", "15", "25", "37.5", "50", "75", "100", "167", "250", "333", "500"]) + " kVA")

# Template slot -> (entity type, sampler). Measurement and material slots are typed so that
# sentences stay plausible ("336.4 kcmil ACSR conductor", never "336.4 kcmil Douglas fir").
_SLOTS: dict[str, tuple[str, Sampler]] = {
    "EQUIPMENT": ("EQUIPMENT", _EQUIPMENT),
    "CONDUCTOR": ("MATERIAL", _CONDUCTOR),
    "POLE_MATERIAL": ("MATERIAL", _POLE_MATERIAL),
    "SPEC_CODE": ("SPEC_CODE", _SPEC_CODE),
    "LENGTH": ("MEASUREMENT", _LENGTH),
    "VOLTAGE": ("MEASUREMENT", _VOLTAGE),
    "CURRENT": ("MEASUREMENT", _CURRENT),
    "SIZE": ("MEASUREMENT", _SIZE),
    "KVA": ("MEASUREMENT", _KVA),
    "LOCATION": ("LOCATION", _location),
    "ORG": ("ORG", _ORG),
}

TRAIN_TEMPLATES = [
    "Replace the {EQUIPMENT} on {LOCATION} per {SPEC_CODE} .",
    "Crew found a cracked {EQUIPMENT} at {LOCATION} during the patrol .",
    "Install {LENGTH} of {SIZE} {CONDUCTOR} between {LOCATION} and {LOCATION} .",
    "{ORG} requires {LENGTH} of clearance over the roadway near {LOCATION} .",
    "The {EQUIPMENT} is rated {VOLTAGE} and must meet {SPEC_CODE} .",
    "Per {SPEC_CODE} , the new pole at {LOCATION} shall be {POLE_MATERIAL} .",
    "Notify {ORG} before energizing the {EQUIPMENT} at {LOCATION} .",
    "Set a {LENGTH} {POLE_MATERIAL} pole at {LOCATION} .",
    "Reconductor {LOCATION} with {SIZE} {CONDUCTOR} to meet {SPEC_CODE} .",
    "Inspection of {LOCATION} shows the {EQUIPMENT} leaning toward the street .",
    "{ORG} approved the encroachment permit for work on {LOCATION} .",
    "The {EQUIPMENT} at {LOCATION} tripped twice on {CURRENT} of fault current .",
    "Framing at {LOCATION} uses a {EQUIPMENT} bolted to a {POLE_MATERIAL} pole .",
    "Maintain {LENGTH} of vertical clearance as specified in {SPEC_CODE} .",
    "Transfer the {EQUIPMENT} from {LOCATION} to {LOCATION} .",
    "{ORG} crews will replace {LENGTH} of damaged wire near {LOCATION} .",
    "Mount the {EQUIPMENT} {LENGTH} below the top of the pole at {LOCATION} .",
    "Work at {LOCATION} is on hold until {ORG} signs off on the {SPEC_CODE} review .",
    "Tree trimming near {LOCATION} must keep {LENGTH} from the {VOLTAGE} lines .",
    "Order two {EQUIPMENT} units and one reel of {CONDUCTOR} for {LOCATION} .",
    "Pole loading at {LOCATION} exceeds {SPEC_CODE} limits with the added {EQUIPMENT} .",
    "The joint use agreement with {ORG} covers the {EQUIPMENT} on {LOCATION} .",
    "Storm damage at {LOCATION} : a broken {EQUIPMENT} and a downed span of {CONDUCTOR} .",
    "Submit the {SPEC_CODE} checklist to {ORG} by Friday .",
    "Load on {LOCATION} has grown past the {KVA} rating .",
    "Operating voltage on {LOCATION} is {VOLTAGE} .",
    "{ORG} measured {CURRENT} on the feeder leaving {LOCATION} .",
    "Specify {POLE_MATERIAL} poles for the rebuild along {LOCATION} .",
    "The {EQUIPMENT} at {LOCATION} needs a {LENGTH} ground lead .",
    "Sag on {LOCATION} with {SIZE} {CONDUCTOR} is within {SPEC_CODE} limits .",
]

HELDOUT_TEMPLATES = [
    "Swap out the {EQUIPMENT} at {LOCATION} following {SPEC_CODE} .",
    "Field check at {LOCATION} found a leaking {EQUIPMENT} .",
    "String {LENGTH} of {SIZE} {CONDUCTOR} from {LOCATION} to {LOCATION} .",
    "{ORG} asked for {LENGTH} of clearance above the driveway at {LOCATION} .",
    "Each {EQUIPMENT} must be rated at least {VOLTAGE} under {SPEC_CODE} .",
    "According to {SPEC_CODE} the replacement pole at {LOCATION} will be {POLE_MATERIAL} .",
    "Call {ORG} before the {EQUIPMENT} on {LOCATION} is switched back in .",
    "Crews set a {LENGTH} {POLE_MATERIAL} pole next to {LOCATION} yesterday .",
    "Upgrade {LOCATION} to {SIZE} {CONDUCTOR} so it complies with {SPEC_CODE} .",
    "Photos from {LOCATION} show the {EQUIPMENT} hanging loose .",
    "{ORG} issued a traffic control permit for {LOCATION} .",
    "Relay records show {CURRENT} through the {EQUIPMENT} at {LOCATION} .",
    "Raise the {EQUIPMENT} {LENGTH} higher on the pole at {LOCATION} .",
    "{ORG} will inspect {LOCATION} for {SPEC_CODE} compliance next week .",
    "Feeder voltage at {LOCATION} dropped below {VOLTAGE} during the heat wave .",
    "Customer load at {LOCATION} now exceeds {KVA} .",
]


def _fill(template: str, rng: np.random.Generator, heldout_split: bool) -> dict:
    tokens: list[str] = []
    tags: list[str] = []
    for word in template.split():
        if word.startswith("{") and word.endswith("}"):
            kind, sampler = _SLOTS[word[1:-1]]
            words = sampler(rng, heldout_split).split()
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def _make_split(n: int, seed: int, heldout_split: bool) -> list[dict]:
    # One generator per split, so the held-out data does not depend on n_train.
    rng = np.random.default_rng([seed, int(heldout_split)])
    templates = HELDOUT_TEMPLATES if heldout_split else TRAIN_TEMPLATES
    return [_fill(_choice(rng, templates), rng, heldout_split) for _ in range(n)]


def make_ner_corpus(n_train: int, n_heldout: int, seed: int = 0):
    """Returns ``(train, heldout, label_names)``.

    Each example is ``{"tokens": [words], "tags": [BIO tags]}``; ``label_names`` lists the
    tags, "O" first, in the order a classifier's output units use.
    """
    return (
        _make_split(n_train, seed, heldout_split=False),
        _make_split(n_heldout, seed, heldout_split=True),
        list(LABEL_NAMES),
    )


def entity_mentions(example: dict) -> list[tuple[str, str]]:
    """The ``(type, text)`` of each entity in an example, read from its BIO tags."""
    mentions: list[tuple[str, list[str]]] = []
    for word, tag in zip(example["tokens"], example["tags"]):
        if tag.startswith("B-"):
            mentions.append((tag[2:], [word]))
        elif tag.startswith("I-"):
            mentions[-1][1].append(word)
    return [(kind, " ".join(words)) for kind, words in mentions]


def sentence_template(example: dict) -> str:
    """The sentence with each entity replaced by ``{TYPE}``."""
    words = [
        word if tag == "O" else "{" + tag[2:] + "}"
        for word, tag in zip(example["tokens"], example["tags"])
        if not tag.startswith("I-")
    ]
    return " ".join(words)


def template_skeleton(template: str) -> str:
    """A template with its typed slots ({CONDUCTOR}, {LENGTH}...) named by entity type."""
    return " ".join("{" + _SLOTS[word[1:-1]][0] + "}" if word.startswith("{") else word for word in template.split())


def split_overlap(train: list[dict], heldout: list[dict]) -> dict[str, set]:
    """The sentence templates and entity mentions that occur in both splits.

    Both sets are empty for data from `make_ner_corpus`; a non-empty one means the held-out
    score would partly measure memorisation.
    """
    return {
        "templates": {sentence_template(ex) for ex in train} & {sentence_template(ex) for ex in heldout},
        "entities": {m for ex in train for m in entity_mentions(ex)}
        & {m for ex in heldout for m in entity_mentions(ex)},
    }


def encode_for_token_classification(examples, tokenizer, label_names, max_length: int = 64):
    """Tokenizes word lists and aligns the word tags to sub-word tokens.

    Only the first sub-word of each word carries its label; continuations, special tokens
    and padding get -100, which the cross-entropy loss ignores. Every sequence is padded
    (and truncated) to ``max_length``, so a batch is just ``torch.tensor`` of each field.
    Needs a fast tokenizer (for ``word_ids``).
    """
    label_ids = {name: i for i, name in enumerate(label_names)}
    encoded = []
    for example in examples:
        enc = tokenizer(
            example["tokens"],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding="max_length",
        )
        labels = []
        previous = None
        for word in enc.word_ids():
            labels.append(-100 if word is None or word == previous else label_ids[example["tags"][word]])
            previous = word
        encoded.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return encoded


def word_tags(predicted_ids, labels, label_names) -> list[list[str]]:
    """Word-level tag names from per-token predictions, one list per sequence.

    Keeps the positions whose label is not -100 (the first sub-word of each word), so the
    result lines up with the gold tags of the words that fit in ``max_length``.
    """
    return [
        [label_names[int(p)] for p, gold in zip(pred_row, label_row) if gold != -100]
        for pred_row, label_row in zip(predicted_ids, labels)
    ]


def entity_f1(pred_tag_sequences, gold_tag_sequences) -> float:
    """Entity-level micro F1 (seqeval): an entity counts only if its span and type both match."""
    try:
        from seqeval.metrics import f1_score
    except ImportError as exc:
        raise ImportError("entity_f1 needs seqeval: pip install nexa-nb[tutorials]") from exc
    return float(f1_score(gold_tag_sequences, pred_tag_sequences, zero_division=0))
