"""The fastmask command: run the sparse-network pipeline into a run folder, show its configuration,
rebuild its report, describe the installation.

  fastmask run --preset digits-convnet3 --out runs/demo imp.rounds=3    (rerun the same line to resume)
  fastmask config --preset digits-convnet3                              (every config key, as YAML)
  fastmask report runs/demo
  fastmask info

A mistake in the input (a config key, a file, a folder) is one line on stderr and exit status 2;
--debug shows its traceback.
"""
from __future__ import annotations

import argparse
import sys

# The subcommands import fastmask's torch-based modules when they run, never at import, so that
# ``fastmask --help`` answers at once.


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


def _config(args) -> int:
    import yaml

    from fastmask.config import load_config, to_dict

    cfg = load_config(args.preset, args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _report(args) -> int:
    from fastmask import report

    path = report.write_report(args.folder)
    print(f"report: {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser; with ``lists_presets`` its help ends with the presets, read only when
    the help is asked for (they live beside the config's torch-based sections)."""

    lists_presets = False

    def format_help(self) -> str:
        if not self.lists_presets:
            return super().format_help()
        from fastmask.config import DEFAULT_PRESET, PRESETS

        names = ", ".join(f"{name} (default)" if name == DEFAULT_PRESET else name for name in PRESETS)
        self.epilog = (f"presets: {names}. Every config key, with its value: fastmask config --preset NAME "
                       "[key=value ...]. Example: fastmask run --preset digits-convnet3 --out runs/demo imp.rounds=3 "
                       "data.root=~/data")
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,config,report,info}", parser_class=_Parser)

    run = sub.add_parser("run", help="run the pipeline into a run folder (resumes when rerun)",
                         description="Run the pipeline's stages into a run folder; rerunning the same command resumes.")
    run.add_argument("--config", metavar="FILE", help="YAML config file, applied over the preset")
    run.add_argument("--out", metavar="FOLDER", help="run folder (default: runs/<preset>)")
    run.add_argument("--preset", metavar="NAME", help="named preset (listed below; default: digits-convnet3)")
    run.add_argument("--force", action="store_true",
                     help="start over: first remove the folder's earlier run (results, checkpoints, masks, experts, "
                          "report, plots), whatever its config")
    run.add_argument("--quiet", action="store_true", help="no progress bars (the stage lines stay)")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config overrides, values in YAML: imp.rounds=3 distill.method=dsa train.milestones=[0.5,0.75]")
    run.set_defaults(func=_run)
    run.lists_presets = True

    config = sub.add_parser("config", help="print the full configuration (preset, file, overrides) as YAML",
                            description="Print every config key with its value: the preset, then --config, then the "
                                        "overrides, as `fastmask run` would use them.")
    config.add_argument("--preset", metavar="NAME", help="named preset (default: digits-convnet3)")
    config.add_argument("--config", metavar="FILE", help="YAML config file, applied over the preset")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    config.set_defaults(func=_config)
    config.lists_presets = True

    report = sub.add_parser("report", help="rebuild report.md and plots of a run folder")
    report.add_argument("folder")
    report.set_defaults(func=_report)

    sub.add_parser("info", help="versions, device, backend, interpreter").set_defaults(func=_info)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None) -> int:
    import pickle

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    # A bad input: a config key or value, a missing or malformed file (a YAML, JSON, IDX or CIFAR file,
    # refused by the restricted unpickler included), a folder that is a file.
    except (ValueError, TypeError, OSError, pickle.UnpicklingError) as error:
        if args.debug:
            raise
        print(f"fastmask: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
