"""`vmkeep server`: the long-running process that fires schedules and runs jobs
(docs/SERVER.md). The engine does the work (engine/server.serve); this wires signals and
logging: one line per event on stderr, for journald or a terminal."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from vmkeep.engine.server import Clock

# engine.server.DEFAULT_GRACE_S, repeated here so that registering the command does not
# import the engine (SQLAlchemy, croniter, pydantic) at every start-up; a test keeps them equal.
DEFAULT_GRACE_S = 30.0

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def log_to_stderr() -> None:
    """vmkeep's loggers (server, runner, reports) to stderr, one unwrapped line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("vmkeep")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def register(app: typer.Typer) -> None:
    @app.command("server")
    def server_command(
        tick: float = typer.Option(
            1.0, "--tick", help="Seconds between two looks at the schedules.", min=0.01
        ),
        grace: float = typer.Option(
            DEFAULT_GRACE_S,
            "--grace",
            help="On SIGTERM, seconds to wait for cancelled runs to end before marking them.",
            min=0,
        ),
        clock_rate: float | None = typer.Option(
            None, "--clock-rate", hidden=True, help="Testing: schedule time runs N times faster."
        ),
    ) -> None:
        """Fire the stored schedules and run their jobs until SIGTERM or SIGINT.

        Missed runs are caught up at start-up by each schedule's missed policy; runs a
        killed server left behind are marked interrupted. One line per event on stderr.
        """
        # The engine is imported only when the server runs (start-up of every other command).
        from vmkeep.engine.server import scaled_clock, serve, stop_on_signals, utc_now

        log_to_stderr()
        clock: Clock = utc_now if clock_rate is None else scaled_clock(clock_rate)
        stop = threading.Event()
        stop_on_signals(stop)
        code = serve(tick=tick, stop=stop, grace=grace, clock=clock)
        raise typer.Exit(code)
