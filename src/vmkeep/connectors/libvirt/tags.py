"""A libvirt domain's tags, for job VM selection. libvirt has no tag field, so three places
of the domain XML are read (docs/LIBVIRT-NOTES.md, "Tags"), and their tags united:

- vmkeep's own metadata element, set with
  `virsh metadata DOM --uri urn:vmkeep:tags:1 --key vmkeep --set '<tags><tag>prod</tag></tags>'`;
- words of the `<title>` that start with `#` ("Web front end #prod #web");
- lines of the `<description>` that start with `tags:` ("tags: prod, web").

Words that are not valid tags (connectors/base.py is_valid_tag) are ignored, not fatal: a
title is free text written for people."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from vmkeep.connectors.base import is_valid_tag

TAGS_NAMESPACE = "urn:vmkeep:tags:1"
_SEPARATORS = re.compile(r"[\s,]+")
_DESCRIPTION_LINE = re.compile(r"^\s*tags\s*:(.*)$", re.IGNORECASE)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _metadata_tags(root: ET.Element) -> list[str]:
    found = []
    for element in root.findall(f"metadata/{{{TAGS_NAMESPACE}}}tags"):
        for child in element:
            if _local(child.tag) == "tag" and child.text:
                found.append(child.text.strip())
    return found


def _title_tags(root: ET.Element) -> list[str]:
    text = root.findtext("title") or ""
    return [word[1:] for word in text.split() if word.startswith("#")]


def _description_tags(root: ET.Element) -> list[str]:
    found: list[str] = []
    for line in (root.findtext("description") or "").splitlines():
        match = _DESCRIPTION_LINE.match(line)
        if match:
            found.extend(w for w in _SEPARATORS.split(match.group(1)) if w)
    return found


def domain_tags(xml: str) -> list[str]:
    """The tags of a domain XML: metadata element, then title, then description; each once.
    Malformed XML has no tags (the connector reports such a domain elsewhere)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []
    tags = _metadata_tags(root) + _title_tags(root) + _description_tags(root)
    return list(dict.fromkeys(t for t in tags if is_valid_tag(t)))
