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


def write_table_and_checks(doc: Path, marker: str, table: str, checks: list[tuple[str, bool]], heading: str) -> int:
    """Print a table and its acceptance checks (PASS/FAIL lines), write both into ``doc``
    between ``<!-- marker -->`` and ``<!-- /marker -->``; 0 when every check passes, else 1."""
    accept = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks)
    print(table)
    print(accept)
    write_between(Path(doc), f"<!-- {marker} -->", f"<!-- /{marker} -->", f"{table}\n\n{heading}\n\n{accept}")
    return 0 if all(ok for _, ok in checks) else 1
