"""The ``triaged`` command line.

A user mistake (bad config, unknown key, bad path, unreachable database) is one line on
stderr and exit status 2, never a traceback; bugs still show their traceback.
Heavy imports (torch, MONAI) happen inside the subcommands that need them, so that
``triaged --help`` and the SCP start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from triaged import __version__
from triaged.config import ConfigError, Settings, load

EXIT_USER_ERROR = 2
DEFAULT_CONFIG = "config.toml"


class UserError(Exception):
    """An error the user can fix; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "apscheduler", "alembic", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load(path)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help=f"config file (default: ./{DEFAULT_CONFIG} if present)"
    )


# -- serve -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from triaged.service import Service

    settings = _settings(args)
    _setup_logging(settings.logging.level)
    Service(settings).run_forever()
    return 0


# -- worklist ------------------------------------------------------------------------------
def _fmt_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[h for _, h in columns]] + [
        ["" if r[k] is None else str(r[k]) for k, _ in columns] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(c))) for c in cells)


def cmd_worklist(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from triaged.worklist import db
    from triaged.worklist.studies import list_studies

    settings = _settings(args)
    engine = db.make_engine(settings.database.url)
    try:
        db.ensure_schema(engine)
        with Session(engine) as s:
            rows = [asdict(r) for r in list_studies(s, args.limit)]
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        r["modalities"] = ",".join(r["modalities"])
        r["flag"] = "URGENT" if r["flag"] else ""
        r["received_at"] = r["received_at"][:19]
        r["completed_at"] = (r["completed_at"] or "")[:19]
    print(
        _fmt_table(
            rows,
            [
                ("flag", "FLAG"),
                ("priority", "PRIO"),
                ("state", "STATE"),
                ("patient_id", "PATIENT"),
                ("accession_number", "ACCESSION"),
                ("study_date", "DATE"),
                ("modalities", "MOD"),
                ("num_series", "SER"),
                ("num_instances", "INST"),
                ("received_at", "RECEIVED"),
                ("completed_at", "COMPLETED"),
                ("study_instance_uid", "STUDY UID"),
                ("state_reason", "REASON"),
            ],
        )
    )
    return 0


# -- db ---------------------------------------------------------------------------------------
def cmd_db(args: argparse.Namespace) -> int:
    from triaged.worklist import db

    settings = _settings(args)
    _setup_logging("WARNING")
    engine = db.make_engine(settings.database.url)
    try:
        if args.action == "upgrade":
            db.upgrade(engine)
        print(f"schema revision {db.current_revision(engine)} (head {db.head_revision()})")
    finally:
        engine.dispose()
    return 0


# -- synth -------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from triaged.synthetic import generate_study

    out = Path(args.out)
    for i in range(args.count):
        study = generate_study(
            out / f"study{i:03d}",
            seed=args.seed + i,
            positive=(i % 2 == 0) if args.positive is None else args.positive,
            slices=args.slices,
            size=args.size,
        )
        print(
            f"{study.study_instance_uid}\t{'positive' if study.positive else 'negative'}\t"
            f"{len(study.files)} files"
        )
    return 0


# -- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from triaged.demo import run_demo

    _setup_logging("WARNING")
    return run_demo(Path(args.workdir), studies=args.studies, slices=args.slices, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="triaged",
        description="DICOM/PACS-integrated COVID-19 chest-CT triage daemon "
        "(research software, NOT FOR DIAGNOSTIC USE).",
    )
    parser.add_argument("--version", action="version", version=f"triaged {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("serve", help="run the DICOM listener, scheduler, workers and web page")
    _add_config(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worklist", help="list studies in reading order")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument("--limit", type=int, default=None, help="at most this many studies")
    p.set_defaults(func=cmd_worklist)

    p = sub.add_parser("db", help="database schema: upgrade or show the revision")
    _add_config(p)
    p.add_argument("action", choices=["upgrade", "current"])
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("synth", help="write synthetic chest-CT studies (DICOM) for testing")
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    pos = p.add_mutually_exclusive_group()
    pos.add_argument("--positive", dest="positive", action="store_true", default=None)
    pos.add_argument("--negative", dest="positive", action="store_false")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("demo", help="end-to-end demo on synthetic studies (not for clinical use)")
    p.add_argument("--workdir", default="demo", help="folder for everything the demo makes")
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.set_defaults(func=cmd_demo)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from triaged.dicom.spool import SpoolError
    from triaged.worklist.db import DatabaseError

    return (
        ConfigError,
        UserError,
        DatabaseError,
        SpoolError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if isinstance(err, _user_errors()):
            print(f"triaged: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(err, OSError) and err.errno in (98, 99, 13):  # address in use/bad/denied
            print(f"triaged: error: {err.strerror}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
