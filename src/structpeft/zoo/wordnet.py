"""WordNet glosses as a definition-generation task: ``Define the noun 'quern':`` -> ``a primitive stone
mill for grinding corn by hand``. About 117,000 synsets from Debian's ``wordnet-base`` package (WordNet
3.0, under the WordNet licence); the split is by gloss, fixed by a hash of its text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
PARTS_OF_SPEECH = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


@dataclass(frozen=True)
class Gloss:
    synset: str  # "<offset>.<file>": unique across the four files
    word: str  # the synset's first word, spaces for underscores
    part_of_speech: str
    definition: str  # the gloss before its quoted examples


def _parse_line(line: str, part_of_speech: str) -> Gloss | None:
    if line.startswith("  ") or " | " not in line:  # the licence header, or a synset without a gloss
        return None
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    offset, word_count = parts[0], int(parts[3], 16)
    if word_count < 1:
        return None
    word = parts[4].split("(")[0].replace("_", " ")  # adjectives carry a marker: "galore(ip)"
    definition = re.split(r';\s*"', gloss)[0].strip().rstrip(";").strip()  # examples follow as ; "..."
    if not definition:
        return None
    return Gloss(f"{offset}.{part_of_speech}", word, PARTS_OF_SPEECH[part_of_speech], definition)


def load_glosses(folder: Path = WORDNET_DIR) -> list[Gloss]:
    """Every synset with a gloss, in file order (noun, verb, adjective, adverb)."""
    glosses = []
    for part_of_speech in PARTS_OF_SPEECH:
        path = folder / f"data.{part_of_speech}"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the WordNet glosses come from Debian's wordnet-base (apt-get install wordnet-base)"
            )
        with path.open(encoding="utf-8", errors="replace") as f:
            glosses += [g for line in f if (g := _parse_line(line, part_of_speech)) is not None]
    return glosses


def is_test_gloss(gloss: Gloss) -> bool:
    """One gloss in ten is held out for test, by a hash of what it says (word, part of speech and
    definition): synsets that read the same (a few hundred) fall on the same side. md5 keeps the split
    the same everywhere."""
    text = f"{gloss.word}|{gloss.part_of_speech}|{gloss.definition}"
    return int(hashlib.md5(text.encode()).hexdigest(), 16) % 10 == 0


def definition_prompt(gloss: Gloss) -> str:
    return f"Define the {gloss.part_of_speech} '{gloss.word}':"
