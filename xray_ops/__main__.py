"""``python -m xray_ops info [--json]``."""

import argparse
import json
import sys

from ._info import format_info, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xray_ops")
    p.add_argument("command", choices=["info"])
    p.add_argument("--json", action="store_true", help="print the dict as JSON")
    a = p.parse_args(argv)
    d = info()
    print(json.dumps(d, indent=2) if a.json else format_info(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
