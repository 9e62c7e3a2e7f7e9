"""`broker healthcheck`: probe this host's broker, for container and orchestrator healthchecks.

It reads the same configuration as `broker serve`, so it knows the port and whether the broker
serves HTTPS. Over HTTPS it pins the broker's own certificate (`http.tls_cert_file`) as the only
trust anchor: the probe talks to exactly the process it checks, whatever names the certificate
carries, and needs no CA bundle. Exit status 0 when the endpoint answers 200, 1 otherwise (with
the status or the transport error on stderr, never a response body).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import httpx
import typer

from broker.cli.serve import ConfigOption, _load


def tls_context_pinning(cert_file: Path) -> ssl.SSLContext:
    """Trust exactly `cert_file` (a leaf is accepted as its own anchor), no hostname check:
    the pinned certificate identifies the server better than a name would."""
    context = ssl.create_default_context(cafile=str(cert_file))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def healthcheck(
    config: ConfigOption = None,
    ready: Annotated[
        bool, typer.Option("--ready", help="Probe /readyz (dependencies) instead of /healthz.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 3.0,
) -> None:
    """Exit 0 when the local broker answers /healthz (or /readyz with --ready) with 200."""
    settings = _load(config)
    path = "/readyz" if ready else "/healthz"
    cert = settings.http.tls_cert_file
    scheme = "https" if cert is not None else "http"
    url = f"{scheme}://127.0.0.1:{settings.http.port}{path}"
    try:
        verify: ssl.SSLContext | bool = tls_context_pinning(cert) if cert is not None else True
        response = httpx.get(url, timeout=timeout, verify=verify)
    except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
        typer.echo(f"unhealthy: {url}: {type(exc).__name__}", err=True)
        raise typer.Exit(1) from None
    if response.status_code != 200:
        typer.echo(f"unhealthy: {url}: HTTP {response.status_code}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {url}")
