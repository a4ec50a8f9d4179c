"""Match what was read on a pill, and what the user says about it, against candidate classes; re-rank the
classifier's top-k with that evidence. Pure functions of plain values: no OCR, no torch.

Class entries are `class_map.json` entries (`print_front`, `print_back`, `colors`, `shape`, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Words the labels write inside `print_front`/`print_back` that are not letters on the pill: "마크" is a logo,
# "분할선" a score line ("마크213", "I분할선Y"). OCR never reads them, so they must not count against a read.
LABEL_MARKERS = ("마크", "분할선")
_KEEP = re.compile(r"[0-9A-Z\uac00-\ud7a3]")  # ASCII letters, digits and Hangul syllables; OCR noise goes

# Characters a recogniser mistakes for each other on engraved, low-contrast imprints. A substitution inside a
# group costs CONFUSION_COST instead of 1, so "B5P" still reads as "BSP" without rewriting the read.
CONFUSABLE_GROUPS = ("O0DQC", "I1LJT7", "S5", "B83", "Z2", "G6", "UV", "EF", "PR", "MN", "A4")
CONFUSION_COST = 0.35
_GROUP_OF = {ch: i for i, group in enumerate(CONFUSABLE_GROUPS) for ch in group}

# Label vocabulary (MFDS pill-identification scheme, as AI Hub labels write it) with the words people use.
COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "하양": ("하양", "흰색", "하얀색", "흰", "하얀", "백색", "white"),
    "노랑": ("노랑", "노란색", "노랑색", "노란", "황색", "yellow"),
    "주황": ("주황", "주황색", "오렌지", "orange"),
    "분홍": ("분홍", "분홍색", "핑크", "pink"),
    "빨강": ("빨강", "빨간색", "빨강색", "빨간", "적색", "red"),
    "갈색": ("갈색", "밤색", "brown"),
    "연두": ("연두", "연두색", "light green", "yellow green", "yellowgreen", "lime"),
    "초록": ("초록", "초록색", "녹색", "green"),
    "청록": ("청록", "청록색", "teal", "turquoise", "cyan", "blue green"),
    "파랑": ("파랑", "파란색", "파랑색", "파란", "청색", "blue"),
    "남색": ("남색", "navy", "navy blue", "dark blue"),
    "자주": ("자주", "자주색", "magenta", "wine", "reddish purple"),
    "보라": ("보라", "보라색", "purple", "violet"),
    "회색": ("회색", "grey", "gray"),
    "검정": ("검정", "검정색", "검은색", "검은", "black"),
    "투명": ("투명", "clear", "transparent"),
}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "원형": ("원형", "원", "동그라미", "round", "circle", "circular"),
    "타원형": ("타원형", "타원", "oval", "ellipse", "elliptical"),
    "장방형": ("장방형", "장방", "oblong", "caplet", "capsule", "capsule shaped", "capsule-shaped"),
    "반원형": ("반원형", "반원", "half round", "half-round", "semicircle", "half moon"),
    "삼각형": ("삼각형", "삼각", "세모", "triangle", "triangular"),
    "사각형": ("사각형", "사각", "네모", "square", "rectangle", "rectangular"),
    "마름모형": ("마름모형", "마름모", "diamond", "rhombus"),
    "오각형": ("오각형", "오각", "pentagon", "pentagonal"),
    "육각형": ("육각형", "육각", "hexagon", "hexagonal"),
    "팔각형": ("팔각형", "팔각", "octagon", "octagonal"),
    "기타": ("기타", "other"),
}
# Hues and outlines people easily name the other way: a hint naming a neighbour neither helps nor hurts.
COLOR_NEIGHBOURS = {
    frozenset(p) for p in (("하양", "투명"), ("하양", "회색"), ("노랑", "주황"), ("노랑", "연두"), ("주황", "분홍"),
                           ("주황", "빨강"), ("주황", "갈색"), ("분홍", "빨강"), ("분홍", "자주"), ("빨강", "갈색"),
                           ("연두", "초록"), ("초록", "청록"), ("청록", "파랑"), ("파랑", "남색"), ("남색", "보라"),
                           ("자주", "보라"), ("회색", "검정"))
}
SHAPE_NEIGHBOURS = {frozenset(p) for p in (("타원형", "장방형"), ("원형", "타원형"), ("사각형", "마름모형"))}
_COLOR_LOOKUP = {syn.casefold(): name for name, syns in COLOR_SYNONYMS.items() for syn in syns}
_SHAPE_LOOKUP = {syn.casefold(): name for name, syns in SHAPE_SYNONYMS.items() for syn in syns}


def normalize_imprint(text: str | None) -> str:
    """Upper-case letters, digits and Hangul only, without the labels' logo / score-line words.

    O/0, I/1 and the like are left as read: the fuzzy match forgives them, rewriting would lose information."""
    text = (text or "").upper()
    for marker in LABEL_MARKERS:
        text = text.replace(marker, " ")
    return "".join(_KEEP.findall(text))


def _sub_cost(a: str, b: str) -> float:
    if a == b:
        return 0.0
    group = _GROUP_OF.get(a)
    return CONFUSION_COST if group is not None and group == _GROUP_OF.get(b) else 1.0


def _edit_rows(short: str, long: str, free_ends: bool) -> list[float]:
    """Last row of the weighted edit distance of `short` against `long`; with free_ends, `short` may start
    anywhere in `long` (a semi-global alignment: "GTH" inside "DGTH" costs nothing)."""
    prev = [0.0] * (len(long) + 1) if free_ends else [float(j) for j in range(len(long) + 1)]
    for i, a in enumerate(short, 1):
        row = [float(i)] + [0.0] * len(long)
        for j, b in enumerate(long, 1):
            row[j] = min(prev[j] + 1.0, row[j - 1] + 1.0, prev[j - 1] + _sub_cost(a, b))
        prev = row
    return prev


def edit_distance(a: str, b: str) -> float:
    """Levenshtein distance in which confusable characters (CONFUSABLE_GROUPS) substitute cheaply."""
    short, long = sorted((a, b), key=len)
    return _edit_rows(short, long, free_ends=False)[-1]


def imprint_similarity(read: str | None, imprint: str | None) -> float:
    """How well a read matches one imprint, in [0, 1], both normalised first; 0 when either is empty.

    The better of a whole-string match (1 - distance / longer length) and a partial match (the shorter string
    found inside the longer one, discounted by how much of the longer it covers): OCR often drops or adds a
    character at the ends ("GTH" for "DGTH") or reads a logo as a letter ("OUU" for "마크 UU")."""
    a, b = normalize_imprint(read), normalize_imprint(imprint)
    if not a or not b:
        return 0.0
    short, long = sorted((a, b), key=len)
    whole = 1.0 - edit_distance(a, b) / len(long)
    if len(short) < 2:  # one character found inside a longer imprint proves little
        return max(0.0, whole)
    partial = 1.0 - min(_edit_rows(short, long, free_ends=True)) / len(short)
    return max(0.0, whole, partial * (0.5 + 0.5 * len(short) / len(long)))


def class_imprints(entry: Mapping) -> tuple[str, ...]:
    """The normalised, non-empty imprints of a class's two sides."""
    sides = (normalize_imprint(entry.get("print_front")), normalize_imprint(entry.get("print_back")))
    return tuple(s for s in sides if s)


def candidate_imprints(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping]) -> list[str]:
    """The distinct imprints of the candidates' classes, both sides: what to give the reader."""
    sides = (side for c in candidates for side in class_imprints(class_map.get(str(c.get("mapping_code"))) or {}))
    return list(dict.fromkeys(sides))


def class_imprint_similarity(read: str | None, entry: Mapping) -> float:
    """Best similarity of a read with either side of a class (which side faced the camera is unknown)."""
    return max((imprint_similarity(read, side) for side in class_imprints(entry)), default=0.0)


# ---- hints ---------------------------------------------------------------------------------------------------

def _lookup(text: str, table: Mapping[str, str], what: str, vocabulary: Sequence[str]) -> str:
    key = " ".join(text.replace("_", " ").split()).casefold()
    for candidate in (key, key.removesuffix("색"), key.removesuffix(" colour").removesuffix(" color")):
        if candidate in table:
            return table[candidate]
    raise ValueError(f"unknown {what} {text!r}; use one of: {', '.join(vocabulary)} (or its English name)")


def parse_colors(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Colour hint(s) -> label colour names: "white", "하양", "흰색", "white, blue", ["노랑", "투명"].
    ValueError names the unknown word and the vocabulary."""
    if not text:
        return ()
    parts = re.split(r"[,/+&]|\band\b", text) if isinstance(text, str) else list(text)
    names = [_lookup(p, _COLOR_LOOKUP, "colour", list(COLOR_SYNONYMS)) for p in parts if p.strip()]
    return tuple(dict.fromkeys(names))


def parse_shape(text: str | None) -> str | None:
    """Shape hint -> label shape name: "round" / "원형" / "원" -> "원형". ValueError for an unknown word."""
    if not text or not text.strip():
        return None
    return _lookup(text, _SHAPE_LOOKUP, "shape", list(SHAPE_SYNONYMS))


@dataclass(frozen=True)
class Hints:
    """What the user says about the pill; every field optional. Colours and shape are label names (하양, 원형):
    build from free text with Hints.parse."""

    imprint: str = ""
    colors: tuple[str, ...] = ()
    shape: str | None = None

    @classmethod
    def parse(cls, imprint: str | None = None, color: str | Sequence[str] | None = None,
              shape: str | None = None) -> Hints:
        return cls(imprint=(imprint or "").strip(), colors=parse_colors(color), shape=parse_shape(shape))

    def to_dict(self) -> dict:
        return {"imprint": self.imprint, "colors": list(self.colors), "shape": self.shape}

    def empty(self) -> bool:
        return not (normalize_imprint(self.imprint) or self.colors or self.shape)


def _agreement(said: str, have: Sequence[str], neighbours: set[frozenset]) -> int:
    """+1 when the class has what the user said, 0 when it has a look-alike value (or no value), -1 otherwise."""
    if not have or said in have:
        return 1 if said in have else 0
    return 0 if any(frozenset((said, h)) in neighbours for h in have) else -1


def color_agreement(colors: Sequence[str], entry: Mapping) -> int | None:
    """Agreement (+1 / 0 / -1) of hinted colours with a class's colours; the worst over the hinted colours
    (a pill said to be "white and blue" must have both). None without a colour hint."""
    if not colors:
        return None
    have = [str(c) for c in entry.get("colors") or []]
    return min(_agreement(c, have, COLOR_NEIGHBOURS) for c in colors)


def shape_agreement(shape: str | None, entry: Mapping) -> int | None:
    """Agreement (+1 / 0 / -1) of a hinted shape with a class's shape; None without a shape hint."""
    if not shape:
        return None
    have = [str(entry["shape"])] if entry.get("shape") else []
    return _agreement(shape, have, SHAPE_NEIGHBOURS)


# ---- re-ranking ----------------------------------------------------------------------------------------------

IMPRINT_ACCEPT = 0.6  # a read at least this similar to an imprint is taken as that imprint (BSF for BSP: 0.67)


@dataclass(frozen=True)
class RerankWeights:
    """Log-odds each piece of evidence adds to a candidate's log-probability.

    `imprint_floor` is the similarity that counts as no evidence at all: two unrelated 3-5 character strings
    rarely score above 0.5, so garbage reads cannot reorder the classifier's answer."""

    # A perfect OCR match, scaled by the recogniser's confidence. Strong, because the classifier cannot see an
    # imprint and its preference between look-alike twins is close to a guess: chosen on the demo's validation
    # crops, where 10 (with min_probability 0.01 in should_read_imprint) was right for 0.858 against 0.756 for 4.
    imprint: float = 10.0
    imprint_floor: float = 0.5
    hint_imprint: float = 12.0  # what the user typed is trusted more than OCR
    color: float = 2.5
    shape: float = 2.0


@dataclass(frozen=True)
class Reranked:
    """Candidates best first, each with what matched; whether the top answer changed, and which hints the
    top answer contradicts (`conflicts`: "imprint", "color", "shape")."""

    candidates: list[dict]
    changed: bool
    conflicts: tuple[str, ...] = ()
    imprint_read: str | None = None

    @property
    def hints_conflict(self) -> bool:
        return bool(self.conflicts)

    def flags(self) -> dict:
        """The answer-level fields: imprint_read, ranking_changed, hints_conflict, conflicts."""
        return {"imprint_read": self.imprint_read, "ranking_changed": self.changed,
                "hints_conflict": self.hints_conflict, "conflicts": list(self.conflicts)}


def _strength(similarity: float, floor: float) -> float:
    """Similarity above the floor, rescaled to [0, 1]."""
    return max(0.0, similarity - floor) / max(1e-6, 1.0 - floor)


def _verdict(agreement: int | None) -> str | None:
    return None if agreement is None else {1: "match", 0: "near", -1: "mismatch"}[agreement]


def _imprint_hint_agreement(text: str, entry: Mapping, floor: float) -> int | None:
    if not normalize_imprint(text):
        return None
    sim = class_imprint_similarity(text, entry)
    return 1 if sim >= IMPRINT_ACCEPT else (0 if sim > floor else -1)


def _hint_terms(hints: Hints, entry: Mapping, w: RerankWeights) -> tuple[dict[str, str | None], float]:
    """Per-hint verdicts for one class and the log-odds they add."""
    agreements = {"imprint": _imprint_hint_agreement(hints.imprint, entry, w.imprint_floor),
                  "color": color_agreement(hints.colors, entry), "shape": shape_agreement(hints.shape, entry)}
    if agreements["imprint"] is not None:  # graded, so a near miss of a typed imprint still ranks above a miss
        sim = class_imprint_similarity(hints.imprint, entry)
        logit = w.hint_imprint * (2.0 * _strength(sim, w.imprint_floor) - 1.0)
    else:
        logit = 0.0
    logit += w.color * (agreements["color"] or 0) + w.shape * (agreements["shape"] or 0)
    return {k: _verdict(v) for k, v in agreements.items()}, logit


def _scored(rank: int, cand: Mapping, entry: Mapping, read: str | None, read_score: float,
            hints: Hints | None, w: RerankWeights) -> tuple[float, dict]:
    out = dict(cand)
    logit = math.log(max(float(cand.get("probability", 0.0)), 1e-12))
    out["classifier_rank"] = rank
    if read is not None:
        sim = class_imprint_similarity(read, entry)
        out["imprint_similarity"], out["imprint_match"] = round(sim, 3), sim >= IMPRINT_ACCEPT
        logit += w.imprint * max(0.0, min(1.0, read_score)) * _strength(sim, w.imprint_floor)
    if hints is not None and not hints.empty():
        out["hint_match"], hint_logit = _hint_terms(hints, entry, w)
        logit += hint_logit
    return logit, out


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def rerank(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping], read: str | None = None,
           read_score: float = 1.0, hints: Hints | None = None,
           weights: RerankWeights = RerankWeights()) -> Reranked:
    """Re-rank the classifier's top-k (dicts with `mapping_code`, `probability`, best first) with an imprint
    read (`read`, the reader's text; `read_score`, its confidence in [0, 1]) and the user's hints.

    Each returned candidate is a copy whose `probability` is the posterior given the evidence: the classifier's
    probability times each piece of evidence's odds, renormalised together with the probability the classifier
    left outside these candidates (which no evidence speaks for). The classifier's own stays in
    `classifier_probability`; `classifier_rank` is its place in the classifier's order; when given,
    `imprint_similarity` / `imprint_match` and `hint_match` ({"imprint", "color", "shape"}: "match" | "near" |
    "mismatch" | None). Give calibrated probabilities: the evidence weights are log-odds. An empty read counts as
    no read."""
    if not candidates:
        return Reranked([], False, (), read)
    read = read if read and normalize_imprint(read) else None
    scored = [_scored(i, c, class_map.get(str(c.get("mapping_code"))) or {}, read, read_score, hints, weights)
              for i, c in enumerate(candidates)]
    rest = 1.0 - sum(float(c.get("probability", 0.0)) for c in candidates)
    posterior = _softmax([s for s, _ in scored] + ([math.log(rest)] if rest > 1e-9 else []))
    for (_, out), p in zip(scored, posterior, strict=False):
        out["classifier_probability"], out["probability"] = out.get("probability", 0.0), p
    ranked = [out for _, out in sorted(scored, key=lambda so: -so[0])]  # stable: ties keep the classifier's order
    verdicts = ranked[0].get("hint_match") or {}
    conflicts = tuple(k for k, v in verdicts.items() if v == "mismatch")
    changed = ranked[0].get("mapping_code") != candidates[0].get("mapping_code")
    return Reranked(ranked, changed, conflicts, read)


def should_read_imprint(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping], top_n: int = 3,
                        min_probability: float = 0.01, same_above: float = 0.8) -> bool:
    """Whether OCR can change the answer: the top-1 and another of the `top_n` candidates holding at least
    `min_probability` have imprints that differ (similarity below `same_above`, or one has text and the other
    none). When the contenders share an imprint, or only one is in the running, a read cannot tell them apart."""
    contenders = [c for c in candidates[:top_n] if float(c.get("probability", 0.0)) >= min_probability]
    if len(contenders) < 2:
        return False
    sides = [class_imprints(class_map.get(str(c.get("mapping_code"))) or {}) for c in contenders]
    return any(_imprints_differ(sides[0], other, same_above) for other in sides[1:])


def _imprints_differ(a: tuple[str, ...], b: tuple[str, ...], same_above: float) -> bool:
    """Two classes' imprints differ when some side of one has no look-alike side on the other: twins that share
    a back imprint ("5") but not the front can still be told apart when the front faces the camera."""
    def covered(xs: tuple[str, ...], ys: tuple[str, ...]) -> bool:
        return all(any(imprint_similarity(x, y) >= same_above for y in ys) for x in xs)

    return not (covered(a, b) and covered(b, a))
