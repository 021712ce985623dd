"""Synthetic spec-compliance retrieval pairs: (requirement, the clause that satisfies it).

A topic (ground clearance, pole setting depth, vegetation clearance...) has a clause
pattern, a few requirement wordings, and two or three facets (voltage class, surface,
structure, fire zone, pole length...). Each combination of facet values is one clause, and
the clauses of a topic differ only in their facets, so they are each other's hard
negatives.

Requirements and clauses name a facet differently, as a person asking and a rule book
answering would: "a 12 kV line" against "0.75-22.5 kV conductors", "a 45-foot pole"
against "41-50 ft poles", "farmland" against "cultivated or grazed land". Lexical overlap
alone therefore does not pick the right clause, while the facet wordings are shared by
all topics, so what training teaches carries over to the held-out topics, whose clause
patterns and requirement wordings training never sees.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Facet:
    """One way clauses vary: how a clause says each value, and how requirements say it."""

    clause_words: tuple[str, ...]
    request_words: tuple[tuple[str, ...], ...]


def _lengths(low: int, high: int, noun: str) -> tuple[str, ...]:
    """Requirement wordings for one length range, strictly inside it, so no endpoint
    number is shared with the clause ("45-foot pole" for "41-50 ft poles")."""
    numbers = range(low + 1, high)
    return tuple(f"{n}-foot {noun}" for n in numbers) + tuple(f"{n} ft {noun}" for n in numbers)


VOLTAGE = Facet(
    ("0-750 V", "0.75-22.5 kV", "22.5-300 kV", "300-550 kV"),
    (
        ("120/240 V", "480 V", "240 V", "secondary", "low-voltage"),
        ("4.16 kV", "12 kV", "12.47 kV", "13.8 kV", "21 kV", "primary distribution"),
        ("34.5 kV", "60 kV", "69 kV", "115 kV", "230 kV", "subtransmission"),
        ("345 kV", "500 kV", "bulk transmission", "backbone transmission"),
    ),
)
SURFACE = Facet(
    (
        "roads, streets and alleys",
        "railroad tracks",
        "areas accessible to pedestrians only",
        "water areas suitable for sailboating",
        "cultivated or grazed land",
        "residential driveways and parking lots",
    ),
    (
        ("highways", "city streets", "public roadways", "a county road"),
        ("rail lines", "train tracks", "a railway crossing", "freight rail"),
        ("sidewalks", "footpaths", "walking trails", "a pedestrian plaza"),
        ("navigable rivers", "a lake used by sailboats", "boating channels", "a marina"),
        ("farmland", "orchards", "pastures", "crop fields"),
        ("a home driveway", "a parking lot", "private drives", "a carport entrance"),
    ),
)
STRUCTURE = Facet(
    ("buildings", "signs and billboards", "bridges", "swimming pools"),
    (
        ("a house", "an office building", "a warehouse", "a school"),
        ("a billboard", "a roadside sign", "an advertising display"),
        ("an overpass", "a bridge deck", "a freeway overcrossing"),
        ("a backyard pool", "a public pool", "a pool deck"),
    ),
)
DIRECTION = Facet(
    ("horizontal", "vertical"),
    (("beside", "alongside", "next to"), ("above", "over", "overhanging")),
)
FIRE_ZONE = Facet(
    ("non-HFTD areas", "Tier 2 HFTD areas", "Tier 3 HFTD areas"),
    (
        ("ordinary terrain", "areas with no special fire risk", "urban areas outside fire districts"),
        ("elevated fire-risk areas", "Tier 2 fire zones", "moderate wildfire-risk terrain"),
        ("extreme fire-risk areas", "Tier 3 fire zones", "the highest wildfire-risk terrain"),
    ),
)
POLE = Facet(
    ("30-35 ft", "36-40 ft", "41-50 ft", "51-60 ft", "61-75 ft"),
    (
        _lengths(30, 35, "pole"),
        _lengths(36, 40, "pole"),
        _lengths(41, 50, "pole"),
        _lengths(51, 60, "pole"),
        _lengths(61, 75, "pole"),
    ),
)
SOIL = Facet(
    ("firm soil", "solid rock", "swampy or loose soil"),
    (
        ("ordinary dirt", "normal ground", "compacted earth"),
        ("bedrock", "rocky ground", "granite"),
        ("marshland", "wet sandy ground", "a boggy field"),
    ),
)
SPAN = Facet(
    ("spans up to 150 ft", "spans of 150-300 ft", "spans over 300 ft"),
    (
        tuple(f"{n}-foot span" for n in range(60, 150, 10)),
        tuple(f"{n}-foot span" for n in range(160, 300, 10)),
        tuple(f"{n}-foot span" for n in range(320, 700, 20)),
    ),
)
WIRE = Facet(
    ("communication cables", "guys", "span wires"),
    (
        ("telephone cables", "fiber-optic lines", "cable TV lines"),
        ("anchor guys", "guy wires", "down guys"),
        ("streetlight span wires", "traffic signal span wires"),
    ),
)
INSPECTION = Facet(
    ("detailed inspections", "patrols"),
    (
        ("close-up inspection", "climbing inspection", "hands-on check"),
        ("drive-by visual check", "quick visual patrol", "windshield survey"),
    ),
)
CONDUCTOR = Facet(
    ("ACSR", "all-aluminum conductor", "hard-drawn copper"),
    (
        ("steel-reinforced aluminum", "aluminum with a steel core"),
        ("all-aluminum", "plain aluminum"),
        ("bare copper", "copper"),
    ),
)


@dataclass(frozen=True)
class Topic:
    """Clauses ``clause.format(**facet clause words, value=value(*facet indices))``;
    requirements from ``requests`` with each facet's requirement wording."""

    facets: dict[str, Facet]
    clause: str
    value: Callable[..., object]
    requests: tuple[str, ...]

    def combinations(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(len(f.clause_words)) for f in self.facets.values())))

    def clause_text(self, combo: tuple[int, ...]) -> str:
        words = {name: f.clause_words[i] for (name, f), i in zip(self.facets.items(), combo)}
        return self.clause.format(**words, value=self.value(*combo))

    def request_text(self, combo: tuple[int, ...], rng: np.random.Generator) -> str:
        words = {name: _choice(rng, f.request_words[i]) for (name, f), i in zip(self.facets.items(), combo)}
        return _choice(rng, self.requests).format(**words)


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


TRAIN_TOPICS = {
    "ground_clearance": Topic(
        {"voltage": VOLTAGE, "surface": SURFACE},
        "G.O. 95 Table 1 Case {value[0]}: {value[1]} ft minimum vertical clearance of {voltage} "
        "conductors above {surface}.",
        lambda v, s: ((3, 1, 6, 9, 4, 5)[s], (22, 28, 14, 26, 20, 18)[s] + (0, 3, 8, 16)[v]),
        (
            "Minimum ground clearance for {voltage} conductors over {surface}",
            "How high must a {voltage} line be strung above {surface}?",
            "Required height of {voltage} wires where they cross {surface}",
            "Lowest allowed sag point of a {voltage} circuit over {surface}",
        ),
    ),
    "vegetation_clearance": Topic(
        {"voltage": VOLTAGE, "zone": FIRE_ZONE},
        "G.O. 95 Rule 35: keep vegetation at least {value} ft from {voltage} conductors in {zone}.",
        lambda v, z: (0.5, 4, 6, 10)[v] * (1, 2, 3)[z],
        (
            "How far must tree branches be kept from a {voltage} line in {zone}?",
            "Tree trimming distance around {voltage} conductors in {zone}",
            "Required gap between foliage and a {voltage} circuit in {zone}",
        ),
    ),
    "setting_depth": Topic(
        {"pole": POLE, "soil": SOIL},
        "Pole setting table: {pole} poles in {soil} are set {value} ft deep.",
        lambda p, s: (5.5, 6, 6.5, 7.5, 8.5)[p] + (0, -1.5, 1.5)[s],
        (
            "How deep should a {pole} be buried in {soil}?",
            "Embedment depth for a {pole} set in {soil}",
            "Hole depth needed to plant a {pole} into {soil}",
        ),
    ),
    "conductor_clearance_from_structures": Topic(
        {"voltage": VOLTAGE, "structure": STRUCTURE, "direction": DIRECTION},
        "G.O. 95 Table 2 Case {value[0]}: {value[1]} ft {direction} clearance of {voltage} "
        "conductors from {structure}.",
        lambda v, s, d: ((13, 14, 15, 16)[s], (3, 6, 10, 15)[v] + (2, 0, 4, 8)[s] + 4 * d),
        (
            "Minimum distance for a {voltage} line running {direction} {structure}",
            "How close can {voltage} conductors pass {direction} {structure}?",
            "Clearance needed when a {voltage} circuit is strung {direction} {structure}",
        ),
    ),
    "conductor_size": Topic(
        {"voltage": VOLTAGE, "span": SPAN},
        "G.O. 95 Rule 49.4: {voltage} conductors in {span} must be at least {value}.",
        lambda v, s: ("#8 AWG", "#6 AWG", "#4 AWG", "#2 AWG", "1/0 AWG", "2/0 AWG")[v + s],
        (
            "Smallest wire size allowed for a {voltage} line with a {span}",
            "Minimum conductor gauge on a {span} of {voltage} line",
            "What size conductor does a {voltage} circuit need across a {span}?",
        ),
    ),
}

HELDOUT_TOPICS = {
    "communication_crossing": Topic(
        {"voltage": VOLTAGE, "span": SPAN},
        "G.O. 95 Table 2 Case 8: {value} in vertical separation where {voltage} conductors cross "
        "communication lines in {span}.",
        lambda v, s: (24, 48, 72, 96)[v] + 12 * s,
        (
            "Gap required between a {voltage} line and a phone line it crosses on a {span}",
            "How much separation is needed where {voltage} wires pass over telecom cables in a {span}?",
        ),
    ),
    "equipment_clearance": Topic(
        {"voltage": VOLTAGE, "structure": STRUCTURE, "direction": DIRECTION},
        "Rule 54.8: transformers and regulators energized at {voltage} need {value} ft "
        "{direction} clearance from {structure}.",
        lambda v, s, d: (2, 5, 8, 12)[v] + (1, 0, 3, 6)[s] + 3 * d,
        (
            "How far must a {voltage} transformer be mounted {direction} {structure}?",
            "Placement limit for {voltage} pole-top equipment {direction} {structure}",
        ),
    ),
    "inspection_interval": Topic(
        {"voltage": VOLTAGE, "zone": FIRE_ZONE, "inspection": INSPECTION},
        "G.O. 165: {inspection} of {voltage} facilities in {zone} every {value} months.",
        lambda v, z, i: ((60, 36, 24), (24, 12, 6))[i][z] // (1, 1, 2, 2)[v],
        (
            "How often does a {voltage} line in {zone} need a {inspection}?",
            "Required interval between {inspection}s of {voltage} circuits in {zone}",
        ),
    ),
    "anchor_depth": Topic(
        {"pole": POLE, "soil": SOIL},
        "Guy anchor table: anchors for {pole} poles in {soil} need {value} ft rod embedment.",
        lambda p, s: (4, 4.5, 5, 6, 7)[p] + (0, -2, 2)[s],
        (
            "How deep must the guy anchor go to hold a {pole} in {soil}?",
            "Anchor rod burial depth supporting a {pole} on {soil}",
        ),
    ),
    "non_supply_clearance": Topic(
        {"wire": WIRE, "surface": SURFACE},
        "G.O. 95 Table 1 Column {value[0]}: {wire} require {value[1]} ft clearance above {surface}.",
        lambda w, s: ("ABC"[w], (18, 25, 9, 24, 15, 12)[s] + (0, -2, 2)[w]),
        (
            "How low can {wire} hang over {surface}?",
            "Minimum height of {wire} crossing {surface}",
        ),
    ),
    "conductor_sag": Topic(
        {"conductor": CONDUCTOR, "span": SPAN},
        "Sag table: {conductor} in {span} is limited to {value} in of sag at 60 F.",
        lambda c, s: (18, 42, 96)[s] + (0, 6, 3)[c],
        (
            "Allowed droop for {conductor} wire on a {span}",
            "Maximum sag of a {span} strung with {conductor} wire",
        ),
    ),
}


def make_pairs(n_train: int, n_heldout: int, seed: int = 0):
    """Returns ``(train_pairs, heldout_pairs)``, lists of ``(requirement, clause)``.

    Training pairs come from `TRAIN_TOPICS`, drawn with replacement, so a clause recurs
    with different requirement wordings (use a batch sampler without duplicates for
    in-batch-negative losses). Held-out pairs come from `HELDOUT_TOPICS`, one per clause,
    so with all held-out clauses as the candidates each requirement has exactly one right
    answer; at most ``len(heldout_clauses())`` of them exist.
    """
    train_rng = np.random.default_rng([seed, 0])
    train_combos = [(t, c) for t in TRAIN_TOPICS.values() for c in t.combinations()]
    train = []
    for _ in range(n_train):
        topic, combo = _choice(train_rng, train_combos)
        train.append((topic.request_text(combo, train_rng), topic.clause_text(combo)))

    heldout_rng = np.random.default_rng([seed, 1])
    heldout_combos = [(t, c) for t in HELDOUT_TOPICS.values() for c in t.combinations()]
    if n_heldout > len(heldout_combos):
        raise ValueError(f"n_heldout={n_heldout}: there are only {len(heldout_combos)} held-out clauses")
    order = heldout_rng.permutation(len(heldout_combos))[:n_heldout]
    heldout = []
    for i in order:
        topic, combo = heldout_combos[i]
        heldout.append((topic.request_text(combo, heldout_rng), topic.clause_text(combo)))
    return train, heldout


def heldout_clauses() -> list[str]:
    """Every held-out clause."""
    return [t.clause_text(c) for t in HELDOUT_TOPICS.values() for c in t.combinations()]


def retrieval_accuracy_at_1(query_embeddings, doc_embeddings) -> float:
    """Share of queries whose most cosine-similar document is their own (query i <-> doc i).

    Accepts numpy arrays or torch tensors of shape (n, dim).
    """
    queries = _as_unit_rows(query_embeddings)
    docs = _as_unit_rows(doc_embeddings)
    best = (queries @ docs.T).argmax(axis=1)
    return float((best == np.arange(len(queries))).mean())


def _as_unit_rows(embeddings) -> np.ndarray:
    if hasattr(embeddings, "detach"):  # a torch tensor, possibly on an accelerator
        embeddings = embeddings.detach().float().cpu().numpy()
    rows = np.asarray(embeddings, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)
