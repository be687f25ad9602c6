"""vmkeep: backup, replication and restore for virtual machines."""

__version__ = "0.1.0"
