"""`duo datastore`: build and inspect retrieval datastores.

    duo datastore build OUT --from PATH [PATH ...] [--model M] [--ext py,md,...] [--max-tokens N] [--force]
    duo datastore info PATH [--json]

`build` tokenizes the files of the PATHs with the target's tokenizer and indexes them by suffix
(duo.datastore.build); `info` prints a datastore's meta.json and a retrieval timing measured now.
Wire-up (duo/cli.py): `datastore_cli.add_parser(sub)` in build_parser; errors are UsageError (exit 2) and
DuoError (exit 1), printed as one line by duo.cli's main.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli import Parser, add_common_flags, comma_list, formatter, number
from ..errors import UsageError
from ..exits import EXIT_OK, EXIT_USAGE


def add_parser(sub) -> None:
    d = sub.add_parser("datastore", formatter_class=formatter, help="build or inspect retrieval datastores",
                       description="A retrieval datastore is a corpus tokenized with the target's tokenizer and "
                                   "indexed by suffix, for drafting from what followed the same text there.")
    actions = d.add_subparsers(dest="datastore_command", parser_class=Parser, metavar="ACTION")
    add_build_parser(actions)
    add_info_parser(actions)
    d.set_defaults(func=lambda args: no_action(d), verbose=False, quiet=False, debug=False)


def add_build_parser(actions) -> None:
    from .build import DEFAULT_EXTENSIONS

    b = actions.add_parser("build", formatter_class=formatter, help="build a datastore from files",
                           description="Tokenize files (directories walked recursively, text files, .jsonl "
                                       "conversations) with the target's tokenizer and index them by suffix. "
                                       "Only the tokenizer is loaded, never the weights.")
    b.add_argument("out", metavar="OUT", help="the datastore directory to write")
    b.add_argument("--from", dest="sources", nargs="+", required=True, metavar="PATH",
                   help="directories, text files or .jsonl conversation files")
    b.add_argument("--model", "-m", metavar="M",
                   help="target whose tokenizer to use: alias, GGUF file or HF directory (default: the default target)")
    b.add_argument("--ext", type=comma_list, default=None, metavar="E,E",
                   help=f"extensions of the files read in directories (default {','.join(DEFAULT_EXTENSIONS)})")
    b.add_argument("--max-tokens", type=number(int, ">= 1", lo=1), default=None, metavar="N",
                   help="stop after N tokens")
    b.add_argument("--force", action="store_true", help="replace OUT if it is a datastore already")
    add_common_flags(b)
    b.set_defaults(func=cmd_build)


def add_info_parser(actions) -> None:
    i = actions.add_parser("info", formatter_class=formatter, help="describe a datastore",
                           description="Print a datastore's size, model and build, and time a retrieval now.")
    i.add_argument("path", metavar="PATH", help="a datastore directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    add_common_flags(i)
    i.set_defaults(func=cmd_info)


def no_action(parser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


# ----------------------------------------------------------------------------- commands
def cmd_build(args) -> int:
    from .build import build_datastore

    progress = not args.quiet and (args.verbose or sys.stderr.isatty())
    meta = build_datastore(args.out, args.sources, model=args.model, extensions=args.ext,
                           max_tokens=args.max_tokens, force=args.force, progress=progress)
    print(format_summary(meta, Path(args.out).expanduser(), meta["retrieval"], "at build"))
    return EXIT_OK


def cmd_info(args) -> int:
    from .build import measure_retrieval
    from .index import SuffixIndex

    path = Path(args.path).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist; give a datastore directory (built with `duo datastore build`)")
    try:
        index = SuffixIndex.open(path, warm=False)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        retrieval, meta = measure_retrieval(index, seed=1), dict(index.meta)
    finally:
        index.close()
    if args.json:
        print(json.dumps({"path": str(path.resolve()), **meta, "retrieval_now": retrieval}, indent=1))
    else:
        print(format_summary(meta, path, retrieval, "now"))
    return EXIT_OK


# ----------------------------------------------------------------------------- report
def format_summary(meta: dict, path: Path, retrieval: dict, when: str) -> str:
    """The lines of `build`'s summary and of `info`."""
    files, secs = meta.get("files", {}), meta.get("build_seconds", {})
    lines = [
        f"datastore  {path}",
        f"model      {meta.get('model', '?')} (vocabulary {meta.get('vocab_size', 0):,} tokens)",
        f"tokens     {meta.get('tokens', 0):,} in {meta.get('documents', 0):,} documents from "
        f"{files.get('read', 0):,} files ({files.get('skipped', 0):,} skipped, {files.get('duplicates', 0):,} "
        f"duplicates, {files.get('empty', 0):,} empty"
        + (f", {meta['bad_lines']:,} bad JSONL lines" if meta.get("bad_lines") else "") + ")"
        + (f"; stopped at --max-tokens {meta['max_tokens']:,}" if meta.get("capped") else ""),
        f"size       {mib(meta.get('size_bytes', 0))} on disk",
        f"built      {meta.get('built_at', '?')} in {secs.get('total', 0):.1f} s (tokenizer {secs.get('load_tokenizer', 0):.1f} s, "
        f"tokenize {secs.get('tokenize', 0):.1f} s, suffix array {secs.get('suffix_array', 0):.1f} s), peak memory "
        f"{mib(meta.get('peak_memory_bytes', 0))}",
        f"retrieval  {retrieval['median_ms']:.3f} ms median, {retrieval['max_ms']:.3f} ms max over "
        f"{retrieval['n']} contexts of {retrieval.get('window', 16)} tokens from the corpus ({when})",
    ]
    if meta.get("sources"):
        lines.append(f"sources    {', '.join(meta['sources'])} ({','.join(meta.get('extensions', []))})")
    return "\n".join(lines)


def mib(n: int) -> str:
    """A size in bytes, in GiB, MiB or KiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
