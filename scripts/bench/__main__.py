"""Every benchmark of the platform, one subcommand each; ``--help`` on each lists its options.

\b
    all [--quick]   the platform against the broker's own limit (make bench)
    soak            1,000,000 readings on a stack of its own, RSS per round (make bench-soak)
    broker          the broker's own limit: aio-pika and PerfTest
    billing         billing alone draining a queue of readings (make bench-billing)
    auth            what device auth and rate limits cost per call (make bench-auth)
    import          the CSV importer: rows/s and peak RSS (make bench-import)
    query           read-side latency on a month of one device's readings
    bills           an open bill's read time against the account's issued months
    store           a MongoDB-wire server under billing's kind of work
    profile         py-spy on the running services (make dev) under load
"""

from __future__ import annotations

import typer

from scripts.bench import (
    auth,
    billing,
    bills,
    broker,
    imports,
    platform,
    profiling,
    query,
    store,
)

app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True, help=__doc__)
app.command("all", help=platform.__doc__)(platform.main)
app.command(
    "soak",
    help=platform.__doc__,
    # make bench-soak: the soak section alone, always on a stack of its own
    context_settings={
        "default_map": {"only": "soak", "own_stack": True, "output": "bench-soak.json"}
    },
)(platform.main)
app.command("broker", help=broker.__doc__)(broker.main)
app.command("billing", help=billing.__doc__)(billing.main)
app.command("auth", help=auth.__doc__)(auth.main)
app.command("import", help=imports.__doc__)(imports.main)
app.command("query", help=query.__doc__)(query.main)
app.command("bills", help=bills.__doc__)(bills.main)
app.command("store", help=store.__doc__)(store.main)
app.command("profile", help=profiling.__doc__)(profiling.main)

if __name__ == "__main__":
    app()
