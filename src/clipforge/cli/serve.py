"""``clipforge serve``: search embedded collections over HTTP, with a web page.

Examples::

    clipforge serve photos-out/ --model ckpt/              # http://127.0.0.1:1234/
    clipforge serve coco-out/ laion-out/ --model ViT-B-32.pt --port 8080

Each OUT is a folder written by ``clipforge embed`` (and ``clipforge index``); its folder name is
its ``indice_name`` in clip-retrieval's API. The server binds 127.0.0.1 unless ``--host`` says
otherwise, and serves only indexed images, by id.
"""
from __future__ import annotations

import argparse
import errno
import socket
import sys

from . import CliError
from ._common import add_model_arguments

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve``."""
    parser = subparsers.add_parser("serve", help="search collections by text or image: HTTP API and web page",
                                   description="Serve embedded collections: clip-retrieval's API "
                                   "(/knn-service, /metadata, /indices-list), /search and a page at /.")
    parser.add_argument("collections", nargs="+", metavar="OUT", help="collection folders from clipforge embed")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=1234, help="port (default: 1234)")
    parser.add_argument("--max-k", type=int, default=1000, metavar="K", help="most results per query (default: 1000)")
    parser.add_argument("--batch-wait-ms", type=_milliseconds, default=3.0, metavar="MS",
                        help="how long the encoder waits to batch concurrent queries (default: 3)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages from ORIGIN to call the API (e.g. a hosted clip-retrieval "
                        "front); repeatable; none by default")
    parser.set_defaults(func=run)


def _milliseconds(text: str) -> float:
    """argparse type of a finite wait of 0 ms or more (an infinite one would stall the encoder thread)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from None
    if not 0 <= value < 60_000:
        raise argparse.ArgumentTypeError(f"must be 0 to 60000 milliseconds, got {text}")
    return value


def build_app(args: argparse.Namespace):
    """The app for ``args``: collections read, model loaded, fingerprints compared (warned)."""
    from ..evaluate import model_fingerprint
    from ..runtime import resolve_device
    from ..search._batcher import QueryEncoder
    from ..search._guard import LOOPBACK_HOSTS
    from ..search.collection import load_collections
    from ..search.service import create_app
    from ._common import load_model_arg

    if args.max_k < 1:
        raise CliError(f"--max-k must be at least 1, got {args.max_k}")
    collections = load_collections(args.collections)
    device = resolve_device(args.device)
    model, preprocess = load_model_arg(args.model, device, args.seed)
    fingerprint = model_fingerprint(model)
    for collection in collections.values():
        if collection.dim != model.config.embed_dim:
            raise CliError(f"{collection.root}: embeddings have dim {collection.dim}, but --model {args.model} "
                           f"embeds to {model.config.embed_dim}; serve it with the model that embedded it")
        if not collection.manifest:
            print(f"warning: {collection.name}: no manifest.json, so the model that embedded it is unknown",
                  file=sys.stderr)
        elif collection.manifest.get("complete") is False:
            print(f"warning: {collection.name}: manifest says the embedding did not finish; serving the "
                  f"{collection.count} rows written so far", file=sys.stderr)
        expected = collection.manifest.get("model", {}).get("fingerprint")
        if expected and expected != fingerprint:
            print(f"warning: {collection.name}: --model {args.model} is not the model that embedded it "
                  f"(fingerprint {fingerprint[:12]} != {str(expected)[:12]}); text and image queries "
                  "will not match the stored embeddings", file=sys.stderr)
    encoder = QueryEncoder(model, device, args.precision, wait_ms=args.batch_wait_ms)
    # bound to loopback, answer loopback names only (no DNS rebinding); otherwise the operator decides
    allowed_hosts = LOOPBACK_HOSTS if args.host in LOOPBACK else ()
    return create_app(collections, encoder, preprocess, max_k=args.max_k, cors_origins=tuple(args.cors_origin),
                      allowed_hosts=allowed_hosts)


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or CliError in one line saying why not:
    checked before the model loads, so a taken port stops at once instead of after the announcement."""
    if not 1 <= port <= 65535:
        raise CliError(f"--port must be 1..65535, got {port}")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = open_bound_socket(host, port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise CliError(f"{address} is taken (another program listens on it); pass --port with a free "
                           "port") from None
        if error.errno == errno.EACCES:
            raise CliError(f"{address}: no permission to bind port {port}; pass --port 1024 or above") from None
        raise CliError(f"--host {host}: cannot bind {address} ({error.strerror or error}); pass --host with "
                       "an address of this machine") from None
    sock.set_inheritable(True)
    return sock


def open_bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn binds it; OSError (the socket closed) when it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def run(args: argparse.Namespace) -> int:
    """``clipforge serve``."""
    import uvicorn

    sock = bind_port(args.host, args.port)
    try:
        app = build_app(args)
        if args.host not in LOOPBACK:
            print(f"warning: binding {args.host}: anyone who can reach this machine can search these "
                  "collections and read their indexed images", file=sys.stderr)
        host = f"[{args.host}]" if ":" in args.host else args.host
        names = ", ".join(app.state.service.collections)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               access_log=False))
        print(f"serving {names} on http://{host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
    finally:
        sock.close()
    return 0 if server.started else 1
