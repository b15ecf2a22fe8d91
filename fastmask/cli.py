"""The ``fastmask`` command: ``fastmask info``, ``fastmask run``, ``fastmask report``."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from fastmask.backend import describe

    for key, value in describe().items():
        print(f"{key:20s} {value}")
    return 0


def _run(args) -> int:
    from fastmask import distributed, pipeline

    try:
        folder = pipeline.run(
            config_file=args.config, out=args.out, preset=args.preset, overrides=args.overrides,
            force=args.force, quiet=args.quiet,
        )
    except KeyboardInterrupt:
        if distributed.is_main():
            print(_interrupted(pipeline.run_folder(args.out, args.preset)), file=sys.stderr)
        return 130  # the shell's code for a run stopped by Ctrl-C
    if distributed.is_main():
        print(f"report: {folder / 'report.md'}")
    return 0


def _interrupted(folder) -> str:
    """One line for Ctrl-C: what the run folder kept, and that rerunning resumes."""
    import json

    results = folder / "results.json"
    try:
        finished = json.loads(results.read_text()).get("completed", [])
    except (OSError, ValueError, AttributeError):
        finished = []
    kept = f"finished stages ({', '.join(finished)})" if finished else "no finished stage"
    return (f"fastmask: interrupted; {folder} keeps its {kept} and the saved progress of the stage that was "
            f"running: rerun the same command to resume")


def _report(args) -> int:
    from fastmask import report

    path = report.write_report(args.folder)
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmask", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, device, backend, interpreter").set_defaults(func=_info)

    run = sub.add_parser("run", help="run the pipeline into a run folder (resumes when rerun)")
    run.add_argument("--config", help="YAML config file")
    run.add_argument("--out", help="run folder (default: runs/<preset>)")
    run.add_argument("--preset", help="named preset (default: digits-convnet3)")
    run.add_argument("--force", action="store_true", help="reuse a folder made with another config")
    run.add_argument("--quiet", action="store_true", help="logs instead of progress bars")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="rebuild report.md and plots of a run folder")
    report.add_argument("folder")
    report.set_defaults(func=_report)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"fastmask: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
