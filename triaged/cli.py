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


def _setup_logging(level: str, phi: bool = False) -> None:
    from triaged.logsetup import setup_logging

    setup_logging(level, phi)


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
    _setup_logging(settings.logging.level, settings.logging.phi)
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
        if r["ood_reason"] and r["ood_reason"] != r["state_reason"]:
            r["state_reason"] = "; ".join(x for x in (r["state_reason"], r["ood_reason"]) if x)
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


# -- deliveries -------------------------------------------------------------------------------
def cmd_deliveries(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from triaged.worklist import db, deliveries

    settings = _settings(args)
    engine = db.make_engine(settings.database.url)
    try:
        db.ensure_schema(engine)
        with Session(engine) as s, s.begin():
            if args.action == "retry":
                n = deliveries.requeue_dead(s, destination=args.destination, study_uid=args.study)
                print(f"requeued {n} dead-lettered deliver{'y' if n == 1 else 'ies'}")
                return 0
            counts = deliveries.counts_by_destination(s)
    finally:
        engine.dispose()
    names = [d.name for d in settings.destinations] + sorted(
        set(counts) - {d.name for d in settings.destinations}
    )
    rows = [
        {"destination": n, **asdict(counts.get(n, deliveries.DestinationCounts()))} for n in names
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(
            _fmt_table(
                rows, [("destination", "DESTINATION"), ("pending", "PENDING"), ("dead", "DEAD")]
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


# -- worker ----------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from triaged.processing import processor_for
    from triaged.worker import Worker
    from triaged.worklist import db

    settings = _settings(args)
    _setup_logging(settings.logging.level, settings.logging.phi)
    processor = processor_for(settings)
    if processor is None:
        raise UserError("no pipeline configured ([pipelines] in the config)")
    engine = db.make_engine(settings.database.url, log_phi=settings.logging.phi)
    db.ensure_schema(engine)
    workers = [Worker(settings, engine, processor) for _ in range(args.threads)]

    def stop(signum: int, _frame: object) -> None:
        for w in workers:
            w.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threads = [
        threading.Thread(target=w.run_forever, name=f"worker-{i}") for i, w in enumerate(workers)
    ]
    for t in threads:
        t.start()
    logging.getLogger("triaged.worker").info(
        "%d worker(s) running as %s", len(workers), ", ".join(w.name for w in workers)
    )
    for t in threads:
        t.join()
    engine.dispose()
    return 0


# -- score -------------------------------------------------------------------------------------
def cmd_score(args: argparse.Namespace) -> int:
    from triaged.pipeline.scoring import Skip
    from triaged.processing import group_by_study, processor_for, write_results
    from triaged.worklist.result_details import ScoredStudy, SkippedStudy

    settings = _settings(args)
    _setup_logging("WARNING")
    processor = processor_for(settings)
    if processor is None:
        raise UserError("no pipeline configured ([pipelines] in the config)")
    studies = group_by_study([Path(p) for p in args.paths])
    if not studies:
        raise UserError("no DICOM study found in the given paths")
    report: list[ScoredStudy | SkippedStudy] = []
    for uid, files in studies.items():
        outcome = processor.score(files)
        if isinstance(outcome, Skip):
            report.append(SkippedStudy(study_instance_uid=uid, reason=outcome.reason))
            continue
        entry = ScoredStudy.model_validate(outcome.to_dict())
        if args.output:
            files_written, _, _ = write_results(outcome, Path(args.output) / uid, "offline")
            entry.files = [str(f.path) for f in files_written]
        report.append(entry)
    if args.json:
        print(
            json.dumps(
                [r.to_json() if isinstance(r, ScoredStudy) else r.model_dump() for r in report],
                indent=1,
            )
        )
        return 0
    for r in report:
        if isinstance(r, SkippedStudy):
            print(f"{r.study_instance_uid}  SKIPPED  {r.reason}")
            continue
        cbam = r.cbam_probability
        print(
            f"{r.study_instance_uid}  fusion {r.fusion_probability:.3f}  "
            f"cbam {'-' if cbam is None else f'{cbam:.3f}'}  "
            f"priority {r.priority}{'  FLAG' if r.flag else ''}"
            + (
                f"  calibrated on {r.calibrated_on}, operating point "
                f"{r.operating_point or '-'}, raw {r.raw_probability:.3f}"
                if r.calibrated_on is not None and r.raw_probability is not None
                else ""
            )
        )
    return 0


# -- validate / render ---------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from triaged.processing import processor_for
    from triaged.validation.evaluate import LabelsError, read_labels, validate
    from triaged.validation.report import write_report

    if args.resamples < 1:
        raise UserError("--resamples must be at least 1")
    settings = _settings(args)
    _setup_logging("WARNING")
    processor = processor_for(settings)
    if processor is None:
        raise UserError("no pipeline configured ([pipelines] in the config)")
    labels = Path(args.labels)
    try:
        read_labels(labels)  # a bad labels file is reported before any model loads
        if processor.live_model() is None:
            entry = processor.pipeline.model("fusion")
            raise UserError(
                f"no live model: {entry.name if entry else 'fusion'} has no "
                f"{'live ' if entry is None or entry.version == 'live' else ''}"
                f"version in the model store"
            )
        if args.fit:
            return _validate_fit(args, settings, labels, processor)
        report = validate(settings, labels, processor, args.resamples, args.seed)
    except LabelsError as err:
        raise UserError(str(err)) from None
    json_path, md_path = write_report(report, Path(args.out))
    c, auc = report["counts"], report["metrics"]["auc"]
    auc_text = "undefined" if auc["value"] is None else f"{auc['value']:.3f}"
    print(
        f"{c['scored']} of {c['studies']} studies scored ({c['skipped']} skipped, "
        f"{c['failed']} failed), {c['patients']} patients; AUC {auc_text}; "
        f"report {md_path}, data {json_path}"
    )
    return 0


def _validate_fit(
    args: argparse.Namespace, settings: Settings, labels: Path, processor: Any
) -> int:
    """`validate --fit`: fit the study decision, register it as a new fusion version."""
    from triaged.pipeline.calibration import DEFAULT_TARGETS
    from triaged.validation.fit import FitError, fit, parse_target

    try:
        targets = (
            [parse_target(t) for t in args.operating_point]
            if args.operating_point
            else list(DEFAULT_TARGETS)
        )
        out = fit(settings, labels, processor, targets, promote=args.promote)
    except FitError as err:
        raise UserError(str(err)) from None
    d = out.decision
    f = d.fitted_on
    print(
        f"fitted on {f.n_studies} studies ({f.n_patients} patients, {f.n_positive} positive) "
        f"scored by {out.fitted_from}: aggregation {d.aggregation.describe()}, "
        f"Platt a={d.calibration.a:.3g} b={d.calibration.b:.3g}, AUC {f.auc:.3f}"
    )
    for op in d.operating_points:
        print(
            f"  operating point {op.name}: {op.target} >= {op.minimum:g} -> p >= "
            f"{op.threshold:.3f} (sensitivity {op.val_sensitivity:.2f}, "
            f"specificity {op.val_specificity:.2f} on these studies)"
        )
    print(f"registered {out.version.ref}{' (live)' if out.promoted else ''}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from triaged.validation.rendition import RenditionError, render_covid_ct

    try:
        summary = render_covid_ct(Path(args.data), args.split, Path(args.out))
    except RenditionError as err:
        raise UserError(str(err)) from None
    print(
        f"{summary.studies} studies ({summary.patients} patients, {summary.images} images) "
        f"of the {args.split} split written to {args.out}; labels {summary.labels}"
    )
    return 0


# -- models -----------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from triaged.registry import ModelStore, RegistryError

    settings = _settings(args)
    store = ModelStore(Path(args.store) if args.store else settings.models.store)
    try:
        if args.action == "list":
            for name in store.names():
                live = store.live(name)
                for v in store.list(name):
                    mark = "*" if live is not None and live.version == v.version else " "
                    metrics = _card_summary(v.card.metrics)
                    if v.card.study_decision is not None:
                        n = v.card.study_decision.fitted_on.n_studies
                        metrics = f"{metrics}  study decision fitted on {n} studies".strip()
                    print(f"{mark} {v.ref:<28} {v.card.created:%Y-%m-%d %H:%M}  {metrics}")
        elif args.action == "show":
            mv = store.resolve(args.ref)
            print(
                json.dumps(
                    {
                        "ref": mv.ref,
                        "live": (store.live(mv.name) or mv).version == mv.version,
                        **mv.card.model_dump(mode="json"),
                    },
                    indent=1,
                )
            )
        elif args.action == "fit-ood":
            _fit_ood(store, args)
        elif args.action == "promote":
            name, _, version = args.ref.partition(":")
            if not version:
                raise UserError("promote needs NAME:VERSION")
            print(f"live: {store.promote(name, version, reason='triaged models promote').ref}")
        else:
            print(f"live: {store.rollback(args.ref, reason='triaged models rollback').ref}")
    except RegistryError as err:
        raise UserError(str(err)) from None
    return 0


def _fit_ood(store: Any, args: argparse.Namespace) -> None:
    """``triaged models fit-ood NAME:VERSION --data KIND:PATH``: a new version with the fit."""
    from pydantic import ValidationError

    from triaged.pipeline.ood import OodError
    from triaged.training.retrain import RetrainError, fit_existing

    if not args.ref or not args.data:
        raise UserError("fit-ood needs NAME[:VERSION] and at least one --data KIND:PATH")
    try:
        mv = fit_existing(
            store, args.ref, list(args.data), quantile=args.quantile, max_share=args.max_share
        )
    except ValidationError as err:
        raise UserError(f"--data: {err.errors()[0]['msg']}") from None
    except (OodError, RetrainError) as err:
        raise UserError(str(err)) from None
    assert mv.card.ood is not None
    print(
        f"registered {mv.ref} (OOD fit on {mv.card.ood.slices} slices, threshold "
        f"{mv.card.ood.threshold:.3g}); promote it with: triaged models promote {mv.ref}"
    )


def _card_summary(metrics: dict[str, object]) -> str:
    """The headline validation figures of a card (``val`` block, or flat floats)."""
    block = metrics.get("val", metrics)
    if not isinstance(block, dict):
        return ""
    keys = ("auc", "accuracy", "f1", "dice")
    return "  ".join(
        f"val {k} {block[k]:.3f}" for k in keys if isinstance(block.get(k), (int, float))
    )


# -- retrain -----------------------------------------------------------------------------------
def cmd_retrain(args: argparse.Namespace) -> int:
    from triaged.training import cli as training_cli

    settings = load(args.daemon_config) if args.daemon_config else _settings_or_none()
    return training_cli.run(args, settings)


def _settings_or_none() -> Settings | None:
    return load(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).is_file() else None


# -- web ---------------------------------------------------------------------------------------
def _password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the two passwords differ")
    return first


def _cli_actor() -> str:
    """Who the audit log names for a CLI change: the operating-system account."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"[:64]
    except (KeyError, OSError):
        return "cli"


def _set_user_enabled(engine: Any, settings: Settings, action: str, name: str | None) -> None:
    from triaged.web.auth import disable_user, enable_user

    if not name:
        raise UserError(f"{action} needs NAME")
    if any(u.name == name for u in settings.web.users):
        raise UserError(
            f"{name} is a [web] users entry of the config file: remove it there "
            "(config users cannot be disabled from the command line)"
        )
    change = disable_user if action == "disable-user" else enable_user
    if not change(engine, name, _cli_actor()):
        raise UserError(f"no database user {name}")
    print(
        f"user {name} disabled; their sessions were ended"
        if action == "disable-user"
        else f"user {name} enabled"
    )


def cmd_web(args: argparse.Namespace) -> int:
    from triaged.web.auth import UserError as WebUserError
    from triaged.web.auth import add_user, hash_password

    try:
        if args.action == "hash-password":
            print(hash_password(_password(args)))
            return 0
        from triaged.worklist import db

        settings = _settings(args)
        engine = db.make_engine(settings.database.url)
        try:
            db.ensure_schema(engine)
            if args.action == "add-user":
                if not args.name or not args.role:
                    raise UserError("add-user needs NAME and --role")
                created = add_user(engine, args.name, args.role, _password(args), _cli_actor())
                print(
                    f"user {args.name} {'created' if created else 'updated'} ({args.role})"
                    + ("" if created else "; their sessions were ended")
                )
            elif args.action in ("disable-user", "enable-user"):
                _set_user_enabled(engine, settings, args.action, args.name)
            else:
                from triaged.web.queries import export_labels

                if not args.name:
                    raise UserError("export-labels needs a PATH")
                n = export_labels(engine, args.name, spool_root=settings.storage.spool_dir)
                print(f"{n} labels written to {args.name}")
        finally:
            engine.dispose()
    except WebUserError as err:
        raise UserError(str(err)) from None
    return 0


# -- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from triaged.demo import QUICK, DemoSize, run_demo

    _setup_logging("WARNING")
    size = QUICK if args.quick else DemoSize()
    if args.studies:
        size = DemoSize(**{**size.__dict__, "studies": args.studies})
    return run_demo(Path(args.workdir), size, keep_running=args.keep_running, fresh=args.fresh)


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

    p = sub.add_parser(
        "deliveries",
        help="result deliveries: pending and dead-lettered counts, or resend the dead ones",
        description="`list` counts pending and dead-lettered objects per destination; "
        "`retry` gives dead-lettered deliveries a fresh retry budget (after a PACS outage "
        "or a configuration fix); the running daemon sends them with the same SOP "
        "Instance UIDs.",
    )
    _add_config(p)
    p.add_argument("action", choices=["list", "retry"])
    p.add_argument("--destination", help="only this destination (retry)")
    p.add_argument("--study", metavar="UID", help="only this Study Instance UID (retry)")
    p.add_argument("--json", action="store_true", help="print JSON (list)")
    p.set_defaults(func=cmd_deliveries)

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

    p = sub.add_parser("worker", help="run scoring workers against the shared database")
    _add_config(p)
    p.add_argument("--threads", type=int, default=1, help="workers in this process")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("score", help="score DICOM files or folders offline (no daemon, no DB)")
    _add_config(p)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument("--output", metavar="DIR", help="also write the SR, SC and SEG files here")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "validate",
        help="study-level AUC, sensitivity/specificity and calibration on labelled studies",
        description="Score labelled DICOM studies through the daemon's own scoring path and "
        "write validation.json and validation.md (ROC and reliability plots) with "
        "patient-level bootstrap intervals. See docs/training.md.",
    )
    _add_config(p)
    p.add_argument(
        "--labels",
        required=True,
        metavar="CSV",
        help="columns study (folder relative to the CSV, or Study Instance UID), "
        "label (0/1), optional patient",
    )
    p.add_argument(
        "--out", default="validation", metavar="DIR", help="report folder (default: ./validation)"
    )
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--fit",
        action="store_true",
        help="fit aggregation, calibration and operating points on these studies "
        "and register them as a new version of the fusion model",
    )
    p.add_argument(
        "--operating-point",
        action="append",
        metavar="NAME=METRIC:VALUE",
        help="with --fit: e.g. urgent=specificity:0.9 (repeatable; default "
        "urgent=specificity:0.9 and review=sensitivity:0.9)",
    )
    p.add_argument("--promote", action="store_true", help="with --fit: make the new version live")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "render",
        help="write a public dataset's split as DICOM CT studies (renditions, for validate)",
        description="covid-ct: each image of one official COVID-CT split becomes an axial "
        "slice of its patient's study, marked as a rendition of a published figure; also "
        "writes labels.csv for `triaged validate`. Use val for fitting, test for reporting "
        "only, once.",
    )
    p.add_argument("dataset", choices=["covid-ct"])
    p.add_argument("--data", required=True, metavar="DIR", help="the COVID-CT folder")
    p.add_argument("--split", required=True, choices=["train", "val", "test"])
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("models", help="the model store: list, show, promote, rollback, fit-ood")
    _add_config(p)
    p.add_argument("--store", help="model store folder (default: [models] store)")
    p.add_argument("action", choices=["list", "show", "promote", "rollback", "fit-ood"])
    p.add_argument("ref", nargs="?", default="", help="NAME[:VERSION]")
    p.add_argument(
        "--data",
        action="append",
        metavar="KIND:PATH",
        help="fit-ood: training data, as for retrain (repeatable)",
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=0.99,
        help="fit-ood: slice threshold = this quantile of training distances",
    )
    p.add_argument(
        "--max-share",
        type=float,
        default=0.5,
        help="fit-ood: a study is out of distribution above this share of slices",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("retrain", help="train and register a new model version")
    p.add_argument(
        "--daemon-config",
        metavar="PATH",
        help="daemon config.toml (model store location); default ./config.toml",
    )
    from triaged.training import cli as training_cli

    training_cli.add_arguments(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("web", help="web users and radiologist labels")
    _add_config(p)
    p.add_argument(
        "action",
        choices=["add-user", "disable-user", "enable-user", "hash-password", "export-labels"],
    )
    p.add_argument(
        "name",
        nargs="?",
        help="user NAME (add-user, disable-user, enable-user) or output PATH (export-labels)",
    )
    p.add_argument("--role", choices=["radiologist", "admin"])
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("demo", help="end-to-end demo on synthetic studies (not for clinical use)")
    p.add_argument("--workdir", default="demo", help="folder for everything the demo makes")
    p.add_argument("--studies", type=int, default=0, help="how many studies (default 6)")
    p.add_argument(
        "--quick", action="store_true", help="fewer, smaller studies and a smaller model"
    )
    p.add_argument("--fresh", action="store_true", help="start from an empty work folder")
    p.add_argument(
        "--keep-running",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the daemon and web page up at the end (default: on a terminal)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from triaged.dicom.spool import SpoolError
    from triaged.pipeline.definition import PipelineError
    from triaged.pipeline.models import ModelMismatchError
    from triaged.worklist.db import DatabaseError

    return (
        ConfigError,
        UserError,
        DatabaseError,
        SpoolError,
        PipelineError,
        ModelMismatchError,
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
    except BrokenPipeError:  # `triaged worklist | head`
        sys.stderr.close()
        return 0
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
