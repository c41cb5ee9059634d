"""Checks that a server answers before hours of work depend on it: one request each, one clear line if not."""

from __future__ import annotations

import os

from cxr_model.errors import ServerError


def check_prefect_server(timeout: float = 10.0) -> None:
    """When a Prefect API is configured (PREFECT_API_URL, in the environment or the active Prefect profile), one
    request to its /health; any HTTP answer counts. Without one the flow starts a temporary server of its own."""
    url = os.environ.get("PREFECT_API_URL")
    if url is None:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    if not url:
        return
    import requests

    try:
        requests.get(url.rstrip("/") + "/health", timeout=timeout).close()
    except requests.exceptions.RequestException as exc:
        raise ServerError(f"Prefect API {url} does not answer ({root_cause(exc)}). Start it (`prefect "
                          "server start`), or unset PREFECT_API_URL to let the flow start a temporary "
                          "server of its own.") from None


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """For an http(s) tracking URI, one request to the server's /health before hours of training depend on it.

    Any HTTP answer counts as reachable (an auth proxy may refuse /health); no answer at all is a clear error,
    and so is a TLS handshake that fails. TLS is checked as the MLflow client checks it
    (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_CLIENT_CERT_PATH).
    Local stores (sqlite, file, postgresql through a server) need no check here.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=creds.verify,
                     cert=creds.client_cert_path).close()
    except requests.exceptions.SSLError as exc:
        raise ServerError(
            f"MLflow tracking server {uri}: the TLS handshake failed ({root_cause(exc)}). For a private "
            "certificate authority, set MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle (or "
            "MLFLOW_TRACKING_INSECURE_TLS=true to skip verification), as for the MLflow client.") from None
    except requests.exceptions.RequestException as exc:
        raise ServerError(f"MLflow tracking server {uri} does not answer ({root_cause(exc)}). Start it "
                          "(see docker/), or point MLFLOW_TRACKING_URI at one that runs.") from None


def root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error chain (its message, without the wrappers' retries)."""
    while exc.__cause__ is not None or (exc.args and isinstance(exc.args[0], BaseException)):
        exc = exc.__cause__ if exc.__cause__ is not None else exc.args[0]
    reason = getattr(exc, "reason", None)
    return str(reason if isinstance(reason, BaseException | str) else exc)


def check_search_role(tuner: str) -> None:
    """`cxr train` runs a search in its own process or as a distributed search's chief, never as a worker; a chief
    must be able to listen on its address, with a tuner that can run distributed. ConfigError or ServerError
    otherwise, before the flow starts."""
    from cxr_model.distributed import check_can_serve, flow_role

    role = flow_role(tuner)
    if role is not None:
        check_can_serve(role)
