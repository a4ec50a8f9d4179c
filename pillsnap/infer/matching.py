"""Match what was read on a pill, and what the user says about it, against candidate classes: imprint similarity,
the hint vocabulary and each hint's agreement with a class. Pure functions of plain values: no OCR, no torch; the
answer these feed is decided in pillsnap.infer.answer.

Class entries are `class_map.json` entries (`print_front`, `print_back`, `colors`, `shape`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pillsnap.data.aihub import COLORS, SHAPES

# Words the labels write inside `print_front`/`print_back` that are not letters on the pill: "마크" is a logo,
# "분할선" a score line ("마크213", "I분할선Y"). OCR never reads them as such: a logo is read as nothing or as a
# stray letter or two ("O213"), a score line as nothing, "|", "-" or an "I"/"1" between the characters.
LOGO_WORD, SCORE_WORD = "마크", "분할선"
LABEL_MARKERS = (LOGO_WORD, SCORE_WORD)
# In an imprint key (imprint_key) a logo stands as LOGO_KEY and a score line as SCORE_KEY: the matcher may skip
# either for free, read a logo as any one character cheaply and a score line as a stroke-like character.
LOGO_KEY, SCORE_KEY = "*", "|"
LOGO_READ_COST = 0.3
SCORE_READ_COST = 0.15
SCORE_LIKE = "I1LJT!7"  # what a recogniser makes of a straight groove between two characters
_KEEP = re.compile(r"[0-9A-Z\uac00-\ud7a3]")  # ASCII letters, digits and Hangul syllables; OCR noise goes
_KEY_KEEP = re.compile(r"[0-9A-Z\uac00-\ud7a3*|]")

# Characters a recogniser mistakes for each other on engraved, low-contrast imprints. A substitution inside a
# group costs CONFUSION_COST instead of 1, so "B5P" still reads as "BSP" without rewriting the read. A character
# may be in several groups. The digits drawn in loops and curves ("O0689", "569") and B/D are what the reader
# makes of debossed imprints on crops drawn from the real labels (bench/reader_real_labels.py: "5" read as "9" or
# "0", "30" as "8", "BSP" as "DSP"), and of the demo's ("76" read as "70", "Y9" as "YO").
CONFUSABLE_GROUPS = ("O0DQC", "I1LJT7", "S5", "B83", "Z2", "G6", "UV", "EF", "PR", "MN", "A4", "O0689", "569", "BD")
CONFUSION_COST = 0.35
_CONFUSABLE = {(a, b) for group in CONFUSABLE_GROUPS for a in group for b in group if a != b}

# The words people use for each colour and shape of the label vocabulary (MFDS pill-identification scheme, as AI Hub
# labels write it: pillsnap.data.aihub.COLORS / SHAPES), besides the label word itself.
_COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "하양": ("흰색", "하얀색", "흰", "하얀", "백색", "white"),
    "노랑": ("노란색", "노랑색", "노란", "황색", "yellow"),
    "주황": ("주황색", "오렌지", "orange"),
    "분홍": ("분홍색", "핑크", "pink"),
    "빨강": ("빨간색", "빨강색", "빨간", "적색", "red"),
    "갈색": ("밤색", "brown"),
    "연두": ("연두색", "light green", "yellow green", "yellowgreen", "lime"),
    "초록": ("초록색", "녹색", "green"),
    "청록": ("청록색", "teal", "turquoise", "cyan", "blue green"),
    "파랑": ("파란색", "파랑색", "파란", "청색", "blue"),
    "남색": ("navy", "navy blue", "dark blue"),
    "자주": ("자주색", "magenta", "wine", "reddish purple"),
    "보라": ("보라색", "purple", "violet"),
    "회색": ("grey", "gray"),
    "검정": ("검정색", "검은색", "검은", "black"),
    "투명": ("clear", "transparent"),
}
_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "원형": ("원", "동그라미", "round", "circle", "circular"),
    "타원형": ("타원", "oval", "ellipse", "elliptical"),
    "장방형": ("장방", "oblong", "caplet", "capsule", "capsule shaped", "capsule-shaped"),
    "반원형": ("반원", "half round", "half-round", "semicircle", "half moon"),
    "삼각형": ("삼각", "세모", "triangle", "triangular"),
    "사각형": ("사각", "네모", "square", "rectangle", "rectangular"),
    "마름모형": ("마름모", "diamond", "rhombus"),
    "오각형": ("오각", "pentagon", "pentagonal"),
    "육각형": ("육각", "hexagon", "hexagonal"),
    "팔각형": ("팔각", "octagon", "octagonal"),
    "기타": ("other",),
}
# Keyed by the vocabulary, in its order (tests check that the word tables name no other value).
COLOR_SYNONYMS = {name: (name, *_COLOR_WORDS.get(name, ())) for name in COLORS}
SHAPE_SYNONYMS = {name: (name, *_SHAPE_WORDS.get(name, ())) for name in SHAPES}
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


def imprint_key(label: str | None) -> str:
    """A label's imprint as the matcher compares it: normalize_imprint's letters with each logo as LOGO_KEY and
    each score line as SCORE_KEY, in place ("마크 A1" -> "*A1", "I분할선Y" -> "I|Y"); "" when nothing on the side
    is readable (a plain side, or a logo alone: OCR has nothing to read there)."""
    text = (label or "").upper().replace(LOGO_WORD, LOGO_KEY).replace(SCORE_WORD, SCORE_KEY)
    key = "".join(_KEY_KEEP.findall(text))
    return key if normalize_imprint(key) else ""


def logo_only(label: str | None) -> bool:
    """Whether a side's label is a logo with nothing readable ("마크"): a side that counts as unreadable."""
    return LOGO_WORD in (label or "") and not normalize_imprint(label)


def _indel_cost(ch: str) -> float:
    return 0.0 if ch in (LOGO_KEY, SCORE_KEY) else 1.0


def _sub_cost(a: str, b: str) -> float:
    if a == b:
        return 0.0
    if LOGO_KEY in (a, b):
        return LOGO_READ_COST
    if SCORE_KEY in (a, b):
        return SCORE_READ_COST if (b if a == SCORE_KEY else a) in SCORE_LIKE else 1.0
    return CONFUSION_COST if (a, b) in _CONFUSABLE else 1.0


def _edit_rows(short: str, long: str, free_ends: bool) -> list[float]:
    """Last row of the weighted edit distance of `short` against `long`; with free_ends, `short` may start
    anywhere in `long` (a semi-global alignment: "GTH" inside "DGTH" costs nothing). Logo and score-line keys
    cost nothing to skip."""
    prev = [0.0] * (len(long) + 1)
    if not free_ends:
        for j, b in enumerate(long, 1):
            prev[j] = prev[j - 1] + _indel_cost(b)
    for a in short:
        row = [prev[0] + _indel_cost(a)] + [0.0] * len(long)
        for j, b in enumerate(long, 1):
            row[j] = min(prev[j] + _indel_cost(a), row[j - 1] + _indel_cost(b), prev[j - 1] + _sub_cost(a, b))
        prev = row
    return prev


def edit_distance(a: str, b: str) -> float:
    """Levenshtein distance in which confusable characters (CONFUSABLE_GROUPS) substitute cheaply."""
    short, long = sorted((a, b), key=len)
    return _edit_rows(short, long, free_ends=False)[-1]


def _readable_len(key: str) -> int:
    return len(key) - key.count(LOGO_KEY) - key.count(SCORE_KEY)


def imprint_similarity(read: str | None, imprint: str | None) -> float:
    """How well a read matches one imprint, in [0, 1]; 0 when either has nothing readable. The read is
    normalised (normalize_imprint), the imprint keyed (imprint_key: a logo or a score line in it is skipped for
    free, or matched cheaply by what OCR makes of it).

    The better of a whole-string match (1 - distance / longer length) and a partial match (the shorter string
    found inside the longer one, discounted by how much of the longer it covers): OCR often drops or adds a
    character at the ends ("GTH" for "DGTH") or reads a logo as a letter ("OUU" for "마크 UU")."""
    a, b = normalize_imprint(read), imprint_key(imprint)
    if not a or not b:
        return 0.0
    longest = max(len(a), _readable_len(b))
    whole = 1.0 - edit_distance(a, b) / longest
    short, long = sorted((a, b), key=_readable_len)
    n_short = _readable_len(short)
    # One character found inside a longer imprint proves little; and a string is not found "inside" one as long as
    # itself: there the partial match would only shift it over the end ("CO" against "HC" would score 0.5).
    if n_short < 2 or n_short == _readable_len(long):
        return max(0.0, whole)
    partial = 1.0 - min(_edit_rows(short, long, free_ends=True)) / n_short
    return max(0.0, whole, partial * (0.5 + 0.5 * n_short / longest))


def class_imprints(entry: Mapping) -> tuple[str, ...]:
    """The readable sides of a class, as imprint keys (imprint_key): a plain side and a side with a logo alone
    are left out (nothing there for OCR to read, so a read that matches nothing may come from them)."""
    sides = (imprint_key(entry.get("print_front")), imprint_key(entry.get("print_back")))
    return tuple(s for s in sides if s)


def has_unreadable_side(entry: Mapping) -> bool:
    """Whether one side of a class carries nothing OCR can read (plain, or a logo alone): with that side up, a
    read that matches none of the class's imprints is what the class would give, not evidence against it."""
    return len(class_imprints(entry)) < 2


def candidate_imprints(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping]) -> list[str]:
    """The distinct readable imprints (keys) of the candidates' classes, both sides: what to give the reader."""
    sides = (side for c in candidates for side in class_imprints(class_map.get(str(c.get("mapping_code"))) or {}))
    return list(dict.fromkeys(sides))


def class_imprint_similarity(read: str | None, entry: Mapping) -> float:
    """Best similarity of a read with either readable side of a class (which side faced the camera is unknown)."""
    return max((imprint_similarity(read, side) for side in class_imprints(entry)), default=0.0)


class Closest(NamedTuple):
    """The known imprint a read is most like: its drug (None when no known drug has a readable imprint), the
    imprint key and the similarity."""

    code: str | None
    imprint: str
    similarity: float


class KnownImprints:
    """Every known drug's readable imprints, to find the drug whose imprint a read is (the answer policy names it
    when a pill's imprint is unlike the drugs it looks like).

    A look at all of them costs about 12 us per distinct imprint (about 0.1 s at 5,000 drugs, against 0.2 s for
    the read itself), so `closest` stops at the first imprint at least `enough`-alike and remembers what it found
    for a read it has seen."""

    CACHE = 4096  # reads remembered; cleared whole when full

    def __init__(self, class_map: Mapping[str, Mapping]) -> None:
        self.sides: dict[str, str] = {}  # imprint key -> the first drug that carries it
        for code, entry in class_map.items():
            for side in class_imprints(entry):
                self.sides.setdefault(side, str(code))
        self._cache: dict[tuple[str, float], Closest] = {}

    def __len__(self) -> int:
        return len(self.sides)

    def closest(self, read: str | None, enough: float = 1.0) -> Closest:
        """The known imprint most like `read` (normalised by normalize_imprint), or the first at least `enough`
        alike."""
        text = normalize_imprint(read)
        key = (text, enough)
        hit = self._cache.get(key)  # one lookup: another thread may clear the cache between two
        if hit is not None:  # what was found before answers either way: at least `enough`, or the best of all
            return hit
        best = Closest(None, "", 0.0)
        for side, code in self.sides.items() if text else ():
            sim = imprint_similarity(text, side)
            if sim > best.similarity:
                best = Closest(code, side, sim)
                if sim >= enough:
                    break
        if len(self._cache) >= self.CACHE:
            self._cache.clear()
        self._cache[key] = best
        return best


# ---- hints ---------------------------------------------------------------------------------------------------

# What a user may type, checked before any matching: the imprint match costs time in proportion to the hint's
# length (a 1,000,000-character imprint held a server worker for 68 s), and real imprints are a few characters
# ("마크213", "TYLENOLER"). Colour and shape hints are words of the vocabulary ("light green, reddish purple").
MAX_IMPRINT_CHARS = 32
MAX_WORD_HINT_CHARS = 64
IMPRINT_PUNCTUATION = " -./"  # besides letters (Hangul included) and digits


def _check_length(field: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ValueError(f"{field} hint is {len(text)} characters long; at most {limit} are accepted")


def check_hint_text(imprint: str | None, color: str | Sequence[str] | None, shape: str | None) -> None:
    """ValueError naming the field when a hint is longer than a pill could need, or an imprint holds a character
    no imprint has (control characters, symbols)."""
    _check_length("imprint", imprint or "", MAX_IMPRINT_CHARS)
    _check_length("color", color if isinstance(color, str) else ", ".join(color or ()), MAX_WORD_HINT_CHARS)
    _check_length("shape", shape or "", MAX_WORD_HINT_CHARS)
    odd = sorted({c for c in imprint or "" if not (c.isalnum() or c in IMPRINT_PUNCTUATION)})
    if odd:
        raise ValueError(f"imprint hint has characters no imprint has: {''.join(odd)!r}; use letters, digits, "
                         f"Hangul, spaces and {IMPRINT_PUNCTUATION.strip()!r}")

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
        check_hint_text(imprint, color, shape)
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


def class_entries(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping]) -> list[Mapping]:
    """The candidates' class-map entries ({} for a drug not in the map)."""
    return [class_map.get(str(c.get("mapping_code"))) or {} for c in candidates]
