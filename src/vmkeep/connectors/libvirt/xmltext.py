"""Text and attribute values for the XML documents vmkeep sends libvirt (domain, checkpoint,
job, volume, snapshot XML). Own helpers instead of xml.sax.saxutils, whose import pulls in
urllib.request, http.client, email and ssl: about a third of the libvirt connector's import
time, paid by every backup (docs/RUN-OVERHEAD.md). Names and paths come from domains and VM
directories an attacker may have written: every character that means something in XML is
replaced, and an attribute value is always double-quoted."""

from __future__ import annotations

_TEXT = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_ATTRIBUTE = {**_TEXT, '"': "&quot;", "'": "&apos;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}
_TEXT_TABLE = str.maketrans(_TEXT)
_ATTRIBUTE_TABLE = str.maketrans(_ATTRIBUTE)


def escape(text: str) -> str:
    """`text` as element content: &, < and > escaped."""
    return text.translate(_TEXT_TABLE)


def quoteattr(value: str) -> str:
    """`value` as a double-quoted attribute value, quotes and white space (which an
    attribute would normalise to spaces) escaped too."""
    return '"' + value.translate(_ATTRIBUTE_TABLE) + '"'
