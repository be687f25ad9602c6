"""The throw-away domain XML of the libvirt health check (no libvirt needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from vmkeep.operations.healthcheck_libvirt import has_agent_channel, throwaway_xml


def test_throwaway_xml_has_no_network_and_no_shared_files() -> None:
    xml = """<domain type='qemu'><name>a</name><devices>
      <interface type='network'><source network='default'/></interface>
      <hostdev mode='subsystem' type='pci'/>
      <serial type='file'><source path='/var/lib/x/console.log'/><target port='0'/></serial>
      <console type='file'><source path='/var/lib/x/console.log'/><target type='serial'/></console>
      <channel type='unix'><source mode='bind' path='/run/libvirt/qemu/ch/1-a/ga.0'/>
        <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
      <graphics type='vnc' port='5901' autoport='no'/>
    </devices></domain>"""
    root = ET.fromstring(throwaway_xml(xml))
    devices = root.find("devices")
    assert devices is not None
    assert [el.tag for el in devices] == ["serial", "console", "channel", "graphics"]
    assert all(el.get("type") == "pty" and el.find("source") is None for el in devices[:2])
    channel = devices.find("channel")
    assert channel is not None and channel.find("source") is None
    target = channel.find("target")
    assert target is not None and target.get("state") is None
    graphics = devices.find("graphics")
    assert graphics is not None and graphics.get("port") is None
    assert graphics.get("autoport") == "yes"
    assert has_agent_channel(throwaway_xml(xml))
    assert not has_agent_channel("<domain><devices/></domain>")
