"""Hypervisor connectors: they read VMs and their disks, and create VMs on restore.

A connector never knows about repositories (see DESIGN.md)."""
