"""A job file with one job of every kind, written as an administrator would (shorthands, units,
comments), shared by the job tests. Line numbers matter to the tests: edit with care."""

REMOTES = ("nas", "s3", "offsite")

ALL_KINDS = """\
# every kind of job
kind: backup
name: nightly
description: web and database servers
mode: delta
remotes: [nas, s3]
connector: {type: files, root: /srv/vms}
vms:
  include:
    - name: "web*"
    - tags: [prod]
  exclude:
    - name: web-test
  power: any
compression_level: 3
full_interval: 7
schedules:
  - name: daily
    cron: "0 2 * * *"
    timezone: Europe/Paris
    keep: 7
  - name: hourly
    cron: "5 * * * *"
    keep: 24
    missed: skip
    overlap: queue
retention: {daily: 7, weekly: 4, monthly: 12, yearly: 2, timezone: Europe/Paris}
prune: true
gc: true
concurrency: {vms: 4, per_host: 2, per_remote: 3}
vm_timeout: 2h
retries: {count: 2, backoff: 5m}
max_rate: 50MiB/s
report: {when: failure, email: [ops], webhook: [chat]}
---
kind: replication
name: standby
mode: incremental
connector: {type: libvirt, uri: "qemu:///system", nbd_host: 10.0.0.12}
vms: [db01, db02]
target: {pool: standby, uri: "qemu+ssh://root@kvm2/system"}
keep: 5
schedules:
  - {name: every-4h, cron: "0 */4 * * *"}
---
kind: mirror
name: offsite-copy
source: nas
targets: [offsite]
mode: incremental
vms:
  include: [{tags: [prod]}]
verified_only: true
retention: {keep_last: 14, monthly: 6}
schedules:
  - {name: weekly, cron: "0 5 * * 6", timezone: UTC}
max_rate: 10MB/s
---
kind: metadata
name: config
remote: offsite
include_hypervisor: true
libvirt_uris: ["qemu:///system"]
retention: {keep_last: 30}
schedules:
  - {name: daily-config, cron: "30 1 * * *"}
---
kind: sequence
name: weekend
jobs: [nightly, offsite-copy, config]
on_failure: continue
schedules:
  - {name: saturday, cron: "0 1 * * 6", enabled: false}
"""
