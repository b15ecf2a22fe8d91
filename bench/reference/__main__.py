"""The reference pipeline's command line::

    python -m bench.reference [--preset NAME] [--config FILE] [--out DIR] [--workers N] [--compile] [key=value ...]
"""
from __future__ import annotations

import argparse
import json

from fastmask.config import PRESETS, load_config

from bench.reference.pipeline import run_reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference",
                                     description="Run fastmask's pipeline as eager PyTorch (the benchmark baseline).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a fastmask preset (default digits-convnet3)")
    parser.add_argument("--config", default=None, help="a fastmask YAML config file")
    parser.add_argument("--out", default="runs/reference", help="folder for results.json (default runs/reference)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4 on CUDA, 0 on CPU)")
    parser.add_argument("--compile", action="store_true", help="train under torch.compile")
    parser.add_argument("--quiet", action="store_true", help="no stage messages")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for `fastmask run`")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    results = run_reference(cfg, args.out, num_workers=args.workers, compile=args.compile, quiet=args.quiet)
    print(json.dumps({"results": f"{args.out}/results.json", "timings": results["timings"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
