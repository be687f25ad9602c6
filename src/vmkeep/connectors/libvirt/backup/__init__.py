"""Backing a domain up: live pull-mode jobs with checkpoints, shut-off domains read without
starting them, guest freeze."""
