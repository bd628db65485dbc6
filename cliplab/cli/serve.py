"""``cliplab serve``: the search service and page over an index (FastAPI + uvicorn; see docs/serve.md)."""

from __future__ import annotations

import json
import socket

import click

from .app import main
from .common import (MODEL_HELP, backend_option, fail, json_option, model_option, precision_option,
                     warnings_to_stderr)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_free(host: str, port: int) -> str | None:
    """None if ``host:port`` can be bound now, else why not (checked before the model loads, to fail fast)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


@main.command("serve")
@click.argument("index", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 exposes the service to the network (a warning is printed).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port; --json says which).")
@model_option(default=None, help="Query encoder [default: the model recorded in the index]. " + MODEL_HELP)
@backend_option()
@precision_option(int8=True)
@click.option("--max-upload-mb", type=click.FloatRange(0.01), default=20.0, show_default=True,
              help="Larger request bodies are refused with 413.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds a request may wait for the model before a 504.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Most queries encoded in one model call (micro-batching).")
@click.option("--batch-wait-ms", type=click.FloatRange(0), default=4.0, show_default=True,
              help="How long the first query of a batch waits for others to join it.")
@click.option("--k-max", type=click.IntRange(1), default=100, show_default=True, help="Most hits one query may ask for.")
@click.option("--no-mmap", is_flag=True, help="Read the index into memory instead of memory-mapping it.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (info logs every request).")
@json_option("Print one JSON line on stdout once the index and model are loaded: url, port, model, n, ... (for "
             "scripts that start the server).")
def serve_cmd(index, host, port, model, backend, precision, max_upload_mb, timeout_s, max_batch, batch_wait_ms, k_max, no_mmap,
              log_level, as_json):
    """Serve INDEX (a directory from `cliplab index`, or the embeddings directory holding it): a search page at /,
    a JSON API (/api/search, /api/embed, /api/explain; documented at /docs), thumbnails and /metrics.

    \b
    Examples:
      cliplab serve emb/                       # then open http://127.0.0.1:8000
      cliplab serve emb/ --precision bf16 --port 8080
      cliplab serve emb/ --port 0 --json       # any free port; the first stdout line says which
    """
    try:
        import uvicorn

        from ..server import SearchService, ServeSettings, create_app
    except ImportError as exc:
        fail(f"cliplab serve needs FastAPI, uvicorn and python-multipart ({exc.name} is missing): "
             "pip install 'cliplab[serve]'", 1)
    from ..export.deps import MissingDependencyError
    from ..index import Index

    if host not in LOOPBACK:
        click.echo(f"warning: --host {host} makes the service reachable from other machines; it has no "
                   "authentication. Put it behind a proxy with access control, or keep the default 127.0.0.1.",
                   err=True)
    if port == 0:
        port = _free_port(host)
    why = _port_free(host, port)
    if why is not None:
        fail(f"cannot listen on {host}:{port}: {why} (choose another --port)", 1)
    try:
        settings = ServeSettings(max_upload_mb=max_upload_mb, timeout_s=timeout_s, max_batch=max_batch,
                                 batch_wait_ms=batch_wait_ms, k_max=k_max, precision=precision, backend=backend)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--backend/--precision") from None
    with warnings_to_stderr():
        try:
            ix = Index.load(index, mmap=not no_mmap)
            enc = None
            if model is not None:
                from ..pipeline import resolve_model

                enc, _ = resolve_model(model)
            service = SearchService(ix, model=enc, settings=settings)
        except (FileNotFoundError, ValueError, MissingDependencyError) as exc:
            fail(str(exc), 2)
    h = service.health()
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}/"
    if as_json:
        click.echo(json.dumps({"url": url, "host": host, "port": port, **h}))
    click.echo(f"serving {h['n']:,} {h['field']} vectors of {h['model']} ({h['precision']}) at "
               f"{url}  (API docs: /docs; Ctrl-C stops)", err=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, server_header=False)
