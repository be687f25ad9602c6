"""Names and paths an attacker chose (domain names, disk paths, checkpoint names) go into the
XML vmkeep sends libvirt through connectors/libvirt/xmltext.py: whatever the text, the parsed
document holds exactly that text, in an element and in an attribute, and nothing else (no
extra element or attribute can be smuggled in)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from vmkeep.connectors.libvirt.backup.jobxml import checkpoint_xml
from vmkeep.connectors.libvirt.xmltext import escape, quoteattr

# Every character XML 1.0 allows (other control characters cannot appear in XML at all).
XML_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff").filter(
        lambda c: c >= " " or c in "\t\n\r"
    ),
    max_size=60,
)
NASTY = ['"', "'", "<", ">", "&", "&amp;", "]]>", "\n", "\r\n", "\t", "a' b='c", 'x" y="z', "</a>"]


def round_trip(value: str) -> tuple[str, str, ET.Element]:
    doc = ET.fromstring(f"<a b={quoteattr(value)}>{escape(value)}</a>")
    return doc.get("b", ""), doc.text or "", doc


@given(XML_TEXT)
def test_any_text_round_trips_in_an_element_and_an_attribute(value: str) -> None:
    attribute, text, doc = round_trip(value)
    assert attribute == value
    # XML parsers turn \r\n and lone \r in content into \n (XML 1.0 §2.11).
    assert text == value.replace("\r\n", "\n").replace("\r", "\n")
    assert list(doc.attrib) == ["b"] and len(doc) == 0


def test_quotes_markup_and_white_space_cannot_break_out() -> None:
    for value in NASTY:
        attribute, _, doc = round_trip(value)
        assert attribute == value and list(doc.attrib) == ["b"] and len(doc) == 0


def test_a_hostile_checkpoint_name_stays_one_name() -> None:
    name = "vmkeep-x</name><disks><disk name='vdb' checkpoint='no'/></disks><name>y"
    doc = ET.fromstring(checkpoint_xml(name, ["vda"]))
    assert doc.findtext("name") == name
    assert [d.get("name") for d in doc.iterfind("./disks/disk")] == ["vda"]
