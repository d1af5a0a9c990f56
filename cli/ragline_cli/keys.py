"""`ragline keys new`: a fresh API key, printed once, and the entry that goes into the
gateway's keys file (which stores only the key's SHA-256, never the key)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from ragline_gateway.auth import KeyEntry, KeysFile, hash_key, new_key


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="make API keys for the gateway")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="a new key: prints the key, adds or prints its entry")
    new.add_argument("--id", required=True, help="a name for the key (logs and limits use it)")
    new.add_argument("--tenant", required=True)
    new.add_argument(
        "--collection", action="append", required=True, dest="collections",
        help="a collection, or a prefix like acme_* (repeatable)",
    )  # fmt: skip
    new.add_argument("--scope", action="append", choices=["chat", "admin"], dest="scopes")
    new.add_argument("--requests-per-minute", type=int, default=None)
    new.add_argument("--max-streams", type=int, default=None)
    new.add_argument("--file", type=Path, help="add the entry to this keys file")


def run(args: argparse.Namespace) -> int:
    key = new_key()
    entry = KeyEntry(
        id=args.id,
        tenant=args.tenant,
        sha256=hash_key(key),
        scopes=args.scopes or ["chat"],
        collections=args.collections,
        requests_per_minute=args.requests_per_minute,
        max_streams=args.max_streams,
    )
    if args.file is not None:
        existing = (
            KeysFile.model_validate_json(args.file.read_text())
            if args.file.exists()
            else KeysFile()
        )
        # Validating the whole file refuses a duplicate id or a collection of another tenant.
        try:
            updated = KeysFile(keys=[*existing.keys, entry])
        except ValueError as exc:
            raise SystemExit(f"not added: {exc}") from None
        args.file.write_bytes(
            orjson.dumps(updated.model_dump(exclude_none=True), option=orjson.OPT_INDENT_2)
        )
        print(f"added key {entry.id!r} to {args.file}", file=sys.stderr)
    else:
        print(orjson.dumps(entry.model_dump(exclude_none=True)).decode(), file=sys.stderr)
    print(key)
    return 0
