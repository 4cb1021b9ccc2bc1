"""The ``evd`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from evd.config import dump_config, load_config, with_overrides
from evd.core.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evd", description="evd event delivery server")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="YAML config file (defaults apply without one)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--data-dir", help="directory of the embedded log (default ./evd-data)")
    serve.add_argument("--workers", help="worker processes: a number, or auto (default: one per CPU)")
    serve.add_argument(
        "--roles",
        help="comma-separated roles: edge, process, deliver (default: all three;"
        " a subset needs log.backend: kafka)",
    )
    serve.add_argument("--log-level", default="INFO", help="logging level (default INFO)")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")

    read = sub.add_parser("log-read", help="print records of the embedded log as JSON lines")
    read.add_argument("--data-dir", default="./evd-data")
    read.add_argument("--stream", default="raw", help="any stream: raw (default), dead_letter, events, late, sessions, charts")

    audit = sub.add_parser(
        "audit",
        help="per hour and event type: accepted, rejected, duplicate, late, delivered per sink;"
        " exit 1 when an hour does not add up",
    )
    audit.add_argument("--hour", help="one UTC hour, YYYY-MM-DDTHH (default: every hour)")
    audit.add_argument("--data-dir", help="the server's data_dir (default: from --config, else ./evd-data)")
    audit.add_argument("--config", help="the server's YAML config (for its data_dir)")
    audit.add_argument("--json", action="store_true", help="one JSON object per row")

    sub.add_parser("bench", help="load-test a server (see evd bench --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``evd`` command line; returns the exit status."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "bench":
        from evd.bench.harness import main as bench_main

        return bench_main(args_list[1:])
    args = _parser().parse_args(args_list)
    if args.command == "check-config":
        try:
            cfg = load_config(args.file)
        except ConfigError as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.command == "log-read":
        from evd.logtool import print_stream

        return print_stream(args.data_dir, args.stream)
    if args.command == "audit":
        return _audit(args)
    if args.command == "serve":
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        try:
            workers = args.workers
            if workers is not None and workers != "auto":
                workers = int(workers)
            cfg = with_overrides(
                load_config(args.config),
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                workers=workers,
                roles=_roles(args.roles),
            )
        except (ConfigError, ValueError) as exc:
            print(f"evd: {exc}", file=sys.stderr)
            return 2
        from evd.supervisor import run

        return run(cfg, logging.getLogger().getEffectiveLevel())
    raise AssertionError(args.command)



def _roles(flag: str | None) -> list[str] | None:
    """``--roles edge,process``: the list, checked (None: the config's)."""
    if flag is None:
        return None
    roles = [r.strip() for r in flag.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ("edge", "process", "deliver")]
    if unknown or not roles:
        raise ValueError(f"--roles: {','.join(unknown) or flag!r}: use edge, process, deliver")
    return roles


def _audit(args: argparse.Namespace) -> int:
    import msgspec

    from evd.sinks.audit.report import parse_hour, render, report

    try:
        hour = None if args.hour is None else parse_hour(args.hour)
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = load_config(args.config).server.data_dir if args.config else "./evd-data"
    except (ConfigError, ValueError) as exc:
        print(f"evd audit: {exc}", file=sys.stderr)
        return 2
    rows = report(data_dir, hour)
    if args.json:
        for row in rows:
            sys.stdout.write(msgspec.json.encode(row).decode() + "\n")
    else:
        sys.stdout.write(render(rows))
    return 1 if any(row.discrepancies for row in rows) else 0
