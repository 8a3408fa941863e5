"""`duo serve`: load the Engine once, then serve the OpenAI API on it (uvicorn) until Ctrl-C / SIGTERM.

Registered in the entry point group "duo.commands" (pyproject.toml). Binds to 127.0.0.1 unless --host
says otherwise; --api-key (or $DUO_API_KEY) makes every route but /health ask for 'Authorization: Bearer'.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

from ..cli import (add_adapter_flags, add_common_flags, add_model_flags, add_retrieval_flags, adapter_kwargs,
                   budget_value, formatter, number, retrieval_kwargs)
from ..errors import UsageError
from ..exits import EXIT_OK

log = logging.getLogger("duo")
LOCAL = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    s = sub.add_parser("serve", formatter_class=formatter, help="an OpenAI-compatible HTTP server",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics "
                                   "on one engine; generations run one at a time from a bounded queue.")
    add_model_flags(s)
    add_retrieval_flags(s)
    add_adapter_flags(s)
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=number(int, "in 1..65535", lo=1, hi=65535), default=8000, metavar="N",
                   help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("DUO_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default $DUO_API_KEY; none: no key asked)")
    g.add_argument("--max-queue", type=number(int, ">= 1", lo=1), default=16, metavar="N",
                   help="requests that may wait for the engine; more get 429 (default 16)")
    g.add_argument("--queue-timeout", type=number(float, "> 0", lo=0, lo_open=True), default=300.0, metavar="S",
                   help="a request waiting longer gets 503 (default 300 s)")
    g.add_argument("--max-body", type=number(int, ">= 1024", lo=1024), default=1 << 20, metavar="BYTES",
                   help="largest request body accepted; larger get 413 (default 1048576)")
    g.add_argument("--default-max-tokens", type=number(int, ">= 1", lo=1), default=512, metavar="N",
                   help="max_tokens of a request that gives none (default 512)")
    g.add_argument("--budget", type=budget_value, default="auto", metavar="B",
                   help="drafted tokens per round: auto or B >= 1")
    g.add_argument("--profile", choices=["auto", "saved", "off"], default=os.environ.get("DUO_PROFILE", "auto"),
                   metavar="P", help="auto (quick profile if none is saved), saved, off")
    add_common_flags(s)
    s.set_defaults(func=cmd_serve)


def check_port_free(host: str, port: int) -> None:
    """Before the models load: a port in use is a usage error, not a crash a minute later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot bind --host {host!r}: {e.strerror}; use an address of this machine") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port") from None


def cmd_serve(args) -> int:
    import uvicorn

    from ..engine import Engine
    from .app import create_app

    check_port_free(args.host, args.port)
    if args.host not in LOCAL and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    with Engine(args.model, args.draft, device=args.device, dtype=args.dtype, budget=args.budget,
                progress=not args.quiet, profile=args.profile, compile=args.compile,
                draft_quant=args.draft_quant, **retrieval_kwargs(args),
                **adapter_kwargs(args)) as engine:
        app = create_app(engine, model_name=engine.target.name, api_key=args.api_key, max_queue=args.max_queue,
                         queue_timeout_s=args.queue_timeout, max_body_bytes=args.max_body,
                         default_max_tokens=args.default_max_tokens)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=args.verbose,
                                               log_level="info" if args.verbose else "warning"))
        url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/v1"
        threading.Thread(target=_say_when_ready, args=(server, engine, url, args.quiet), daemon=True).start()
        server.run()
    return EXIT_OK


def _say_when_ready(server, engine, url: str, quiet: bool) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started and not quiet:
        print(f"duo: ready: {engine.target.name} ({engine.target.precision}, {engine.plan.mode}) at {url}; "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
