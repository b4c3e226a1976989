"""osis.py — turn one verse of OSIS markup into plain text: one line, words kept, apparatus removed.

Keeps the words of Strong's-tagged `<w>`, `transChange`, `divineName`, `q` and canonical titles (psalm
superscriptions); drops notes, cross references, section titles and speaker labels. Knows nothing of SWORD
files, verse numbering or alignment.
"""

import html
import re

# Elements whose whole content is apparatus, not text of the verse.
DROPPED_ELEMENTS = {"note", "speaker", "title", "rdg"}
TAG = re.compile(r"<(/?)([A-Za-z][\w:.-]*)([^>]*?)(/?)>", re.DOTALL)
CANONICAL = re.compile(r"""\bcanonical\s*=\s*["']true["']""")
# Inline elements: their tags vanish without a word break, except where one closes right where the next
# opens ("<w>hay allí</w><transChange>también" is two words).
INLINE = "w|transChange|divineName|q|seg|name|hi|foreign"
INLINE_TAG = re.compile(rf"</?(?:{INLINE})\b[^>]*>")
INLINE_JOIN = re.compile(rf"(</(?:{INLINE})>)(?=<(?:{INLINE})\b)")
SPACE_BEFORE_CLOSING = re.compile(r"\s+([,.;:!?)\]’”»])")


def osis_to_text(markup: str) -> str:
    """Plain text of one verse's OSIS markup: tags removed as described in the module docstring, entities
    decoded, whitespace collapsed to single spaces, words that adjacent markup glued together separated."""
    text = _strip_tags(markup)
    text = html.unescape(text).replace("¶", " ")
    return normalize_spacing(text)


def _strip_tags(markup: str) -> str:
    """Markup with tags removed; dropped elements vanish with their content, leaving a word break, and so
    does every non-inline tag (line, paragraph and chapter boundaries separate words)."""
    markup = INLINE_TAG.sub("", INLINE_JOIN.sub(r"\1 ", markup))
    pieces: list[str] = []
    dropping: list[str] = []  # names of the open elements inside a dropped one, innermost last
    position = 0
    for tag in TAG.finditer(markup):
        before, position = markup[position:tag.start()], tag.end()
        closing, name, attributes, self_closing = tag.groups()
        if dropping:
            if closing and dropping[-1] == name:
                dropping.pop()
                if not dropping:
                    pieces.append(" ")
            elif not closing and not self_closing:
                dropping.append(name)
            continue
        pieces.append(before)
        if not closing and not self_closing and _drops_content(name, attributes):
            dropping.append(name)
        else:
            pieces.append(" ")
    if not dropping:
        pieces.append(markup[position:])
    return "".join(pieces)


def _drops_content(name: str, attributes: str) -> bool:
    return name in DROPPED_ELEMENTS and not (name == "title" and CANONICAL.search(attributes))


def normalize_spacing(text: str) -> str:
    """One line with single spaces and no space before closing punctuation (a removed note leaves one)."""
    return SPACE_BEFORE_CLOSING.sub(r"\1", " ".join(text.split()))
