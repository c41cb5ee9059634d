"""`cxr predict`: placeholder wiring; the full client is built in issue 3."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict pneumonia probability for X-ray files or folders")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=lambda args: 1)
