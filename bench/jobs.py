"""Jobs benchmark (issue 14): one backup job over N small `files` VMs with concurrency 4,
against N separate `vmkeep backup` commands in a shell loop; same VMs, same run, each into a
fresh repository of its own.

    .venv/bin/python bench/jobs.py [--vms 100] [--size-mib 32] [--concurrency 4] [--json]
                                   [--workdir bench/work-jobs] [--keep]

The loop pays, per VM, an interpreter start, the imports, opening the repository and the key
derivation (Argon2). The job pays them once: one process (this script re-run as a child with
--child) opens the engine context, registers the remote and the job, and calls the runner's
run_job, whose repository cache unlocks the key once for every VM. Both are timed with
os.wait4 (bench/core.py's `run`), which also gives the job process's peak RSS.

Targets: job seconds <= 1/3 of the loop's; job process peak RSS < 300 MiB. Also printed: the
per-VM overhead, (loop - job) / N, what a separate command costs beyond the work itself.
The demo VMs (connectors/files/demo.py) are sparse disks of --size-mib holding an ext4 file
system with a few MiB of random data each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from core import PASSPHRASE, prepare_workdir, run, run_in_workdir, speaker

HERE = Path(__file__).resolve().parent
VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
JOB = "bench-jobs"
RATIO_TARGET = 1 / 3
RSS_TARGET_MIB = 300.0


def load_runner() -> tuple[Any, Any]:
    """EngineContext and run_job, imported late: the bench runs (and says why it skips)
    where the runner is not installed."""
    context = importlib.import_module("vmkeep.engine.runs.context")
    runner = importlib.import_module("vmkeep.engine.runs.runner")
    return context.EngineContext, runner.run_job


def runner_missing() -> str | None:
    """Why the job side cannot run here, or None."""
    try:
        load_runner()
    except ImportError as exc:
        return f"the job runner (vmkeep.engine.runs) is not installed: {exc}"
    return None


def child(data_dir: Path, repo: Path, root: Path, concurrency: int) -> int:
    """The job process: register the remote and the job, run it, print the run as JSON."""
    from vmkeep.engine.jobs.load import load_jobs
    from vmkeep.engine.jobs.spec import job_to_dict

    engine_context, run_job = load_runner()

    text = (
        f"kind: backup\nname: {JOB}\nmode: full\nremotes: [bench]\n"
        f"connector: {{type: files, root: {json.dumps(str(root))}}}\n"
        f'vms: ["*"]\nconcurrency: {{vms: {concurrency}}}\nprune: false\n'
    )
    ctx = engine_context.open(data_dir)
    try:
        ctx.registry.add("bench", str(repo))
        (spec,) = load_jobs(text, "bench-job.yaml", remotes={"bench"})
        ctx.jobs.put_job(JOB, "backup", job_to_dict(spec))
        began = time.perf_counter()
        run_id = run_job(ctx, JOB, trigger="manual")
        seconds = time.perf_counter() - began
        view = ctx.ledger.get_run(run_id)
        vms = [t for t in view.tasks for t in [t, *t.children] if t.kind == "vm"]
        ok = sum(1 for t in vms if t.state == "success")
        print(json.dumps({"run": run_id, "state": view.state, "vms_ok": ok, "seconds": seconds}))
    finally:
        ctx.close()
    return 0


def make_vms(root: Path, count: int, size_mib: int) -> list[Path]:
    from vmkeep.connectors.files.demo import create_demo_vm

    root.mkdir(parents=True)
    return [Path(create_demo_vm(root, f"vm{i:03d}", size_mib << 20)) for i in range(count)]


def init_repo(path: Path, env: dict[str, str]) -> None:
    done = run([VMKEEP, "init", str(path)], env)
    if done.returncode:
        raise RuntimeError(f"vmkeep init {path}: {done.stderr.strip()[-500:]}")


def benchmark(work: Path, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    env = dict(os.environ, VMKEEP_PASSPHRASE=PASSPHRASE, VMKEEP_CONFIG_DIR=str(work / "config"))
    env["VMKEEP_DATA_DIR"] = str(work / "data")
    say(f"creating {args.vms} VMs of {args.size_mib} MiB")
    vms = make_vms(work / "vms", args.vms, args.size_mib)
    for name in ("repo-loop", "repo-job"):
        init_repo(work / name, env)

    say(f"loop: {args.vms} separate `vmkeep backup` commands")
    script = "set -e\n" + "".join(
        f"{shlex.quote(VMKEEP)} backup {shlex.quote(str(vm))} --remote "
        f"{shlex.quote(str(work / 'repo-loop'))} --mode full >/dev/null\n"
        for vm in vms
    )
    loop = run(["bash", "-c", script], env)
    if loop.returncode:
        raise RuntimeError(f"the loop failed: {loop.stderr.strip()[-500:]}")

    say(f"job: one run over {args.vms} VMs, concurrency {args.concurrency}")
    argv = [sys.executable, __file__, "--child", str(work / "data"), str(work / "repo-job")]
    job = run([*argv, str(work / "vms"), str(args.concurrency)], env)
    if job.returncode:
        raise RuntimeError(f"the job failed: {job.stderr.strip()[-500:]}")
    outcome = json.loads(job.stdout.strip().splitlines()[-1])
    ratio = job.seconds / loop.seconds
    checks = {
        "all_vms_backed_up": outcome["vms_ok"] == args.vms and outcome["state"] == "success",
        "ratio_within_target": ratio <= RATIO_TARGET,
        "rss_within_target": job.rss_mib < RSS_TARGET_MIB,
    }
    return {
        "vms": args.vms,
        "size_mib": args.size_mib,
        "concurrency": args.concurrency,
        "loop": {"seconds": loop.seconds, "cpu_seconds": loop.cpu_seconds},
        "job": {
            "seconds": job.seconds,
            "run_seconds": outcome["seconds"],
            "cpu_seconds": job.cpu_seconds,
            "peak_rss_mib": job.rss_mib,
            "state": outcome["state"],
            "vms_ok": outcome["vms_ok"],
        },
        "ratio": ratio,
        "per_vm_overhead_seconds": (loop.seconds - job.seconds) / args.vms,
        "targets": {"ratio": RATIO_TARGET, "rss_mib": RSS_TARGET_MIB},
        "checks": checks,
        "ok": all(checks.values()),
    }


def print_report(result: dict[str, Any]) -> None:
    loop, job = result["loop"], result["job"]
    print(
        f"{result['vms']} VMs of {result['size_mib']} MiB, job concurrency {result['concurrency']}"
    )
    print(f"  loop of separate commands  {loop['seconds']:8.1f} s")
    print(f"  one job                    {job['seconds']:8.1f} s  (run {job['run_seconds']:.1f} s)")
    mark = "ok" if result["checks"]["ratio_within_target"] else "FAIL"
    print(f"  ratio job / loop           {result['ratio']:8.2f}    target <= 0.33  {mark}")
    print(f"  per-VM overhead (loop-job) {result['per_vm_overhead_seconds']:8.2f} s")
    mark = "ok" if result["checks"]["rss_within_target"] else "FAIL"
    print(f"  job process peak RSS       {job['peak_rss_mib']:8.0f} MiB  target < 300  {mark}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        data_dir, repo, root, concurrency = argv[1:5]
        return child(Path(data_dir), Path(repo), Path(root), int(concurrency))
    parser = argparse.ArgumentParser(description="One job over N VMs vs N backup commands.")
    parser.add_argument("--vms", type=int, default=100, help="number of VMs (default 100)")
    parser.add_argument("--size-mib", type=int, default=32, help="disk size (default 32)")
    parser.add_argument("--concurrency", type=int, default=4, help="job concurrency (4)")
    parser.add_argument("--workdir", type=Path, default=HERE / "work-jobs")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args(argv)
    say = speaker(args.json)
    missing = runner_missing()
    if missing:
        say(f"skipped: {missing}")
        if args.json:
            print(json.dumps({"skipped": missing, "ok": False}))
        return 3
    work = args.workdir.resolve()
    prepare_workdir(work)
    measure = partial(benchmark, work, args, say)
    return run_in_workdir(work, args, measure, print_report, say)


if __name__ == "__main__":
    sys.exit(main())
