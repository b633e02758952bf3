"""Write a generated block into a docs page between two marker comments."""

from __future__ import annotations

from pathlib import Path


def write_between(doc: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between ``begin`` and ``end`` in ``doc`` with ``body``;
    append the markers with the body when the page has none yet."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    doc.write_text(text)
    print(f"updated {doc}")
