"""Write the HTTP API's OpenAPI document from the protos (make openapi), or check it.

python -m scripts.openapi            # writes api_gateway/http/openapi.json
python -m scripts.openapi --check    # exits 1 when the committed file is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from api_gateway.http.openapi import generate
from api_gateway.http.server import OPENAPI_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OPENAPI_FILE)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    document = generate()
    current = args.output.read_text() if args.output.is_file() else None
    if args.check:
        if current != document:
            print(f"{args.output} differs from the protos: run make openapi", file=sys.stderr)
            return 1
        print(f"{args.output} matches the protos")
        return 0
    if current != document:
        args.output.write_text(document)
        print(f"wrote {args.output}")
    else:
        print(f"{args.output} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
