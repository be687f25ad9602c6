"""Replicas: the record a replica domain carries, finding and deleting them, their rollback
snapshots."""
