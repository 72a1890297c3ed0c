"""A long-lived site worker for deployment: torch, data and trainer loaded once.

Flower 1.42's SuperNode runs every message in a fresh ``flwr-clientapp`` process (both
isolation modes: ``flwr-clientapp`` handles one message and exits), so each round would pay
the torch/Opacus imports and rebuild the trainer. ``privseg site`` therefore starts this
worker next to the SuperNode; the ClientApp (which then never imports torch) hands it the
weights over a local, authenticated Unix socket and gets the reply back. The worker runs the
same :func:`~privseg.federated.client_app.site_train` / ``site_evaluate`` as simulation.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def key_path(address: Path) -> Path:
    return address.with_name(address.name + ".key")


def call_worker(
    address: Path, kind: str, config: dict[str, Any], state: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Send one task to the site's worker; raise RuntimeError with its message on failure."""
    try:
        authkey = key_path(address).read_bytes()
        conn = Client(str(address), family="AF_UNIX", authkey=authkey)
    except (OSError, EOFError) as exc:
        raise RuntimeError(f"the site worker at {address} is not running ({exc})") from exc
    with conn:
        conn.send((kind, config, state))
        status, payload = conn.recv()
    if status != "ok":
        raise RuntimeError(f"site worker: {payload}")
    return payload


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _exit_with_parent(parent: int) -> None:
    """Stop when the ``privseg site`` process that started us is gone (even if killed)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def serve(settings: Any, address: Path) -> None:
    """Answer tasks until terminated (SIGTERM), one at a time."""
    import numpy as np
    import torch

    import privseg.training.trainer  # noqa: F401 - imported now, so the first round is fast
    from privseg.federated import client_app

    address.unlink(missing_ok=True)
    key = key_path(address)
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    listener = Listener(str(address), family="AF_UNIX", authkey=key.read_bytes())
    os.chmod(address, 0o600)
    signal.signal(signal.SIGTERM, _interrupt)
    _exit_with_parent(os.getppid())
    log.info("site worker for %s listening on %s", settings.site, address)
    try:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError) as exc:  # a client that failed authentication
                log.warning("site worker: refused a connection: %s", exc)
                continue
            with conn:
                kind, config, state = conn.recv()
                tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
                try:
                    if kind == "train":
                        new, metrics = client_app.site_train(config, tensors, settings)
                        out = (
                            None
                            if new is None
                            else {k: v.detach().cpu().numpy() for k, v in new.items()}
                        )
                        conn.send(("ok", (out, metrics)))
                    else:
                        conn.send(
                            ("ok", (None, client_app.site_evaluate(config, tensors, settings)))
                        )
                except Exception as exc:  # noqa: BLE001 - the reason goes back to the server
                    log.exception("site worker: %s failed", kind)
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        address.unlink(missing_ok=True)
        key.unlink(missing_ok=True)


def main() -> None:
    from privseg.federated.client_app import SiteSettings

    parser = argparse.ArgumentParser(description="privseg site worker (started by privseg site)")
    parser.add_argument("--site", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--address", required=True, type=Path)
    parser.add_argument("--privacy-config", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(
        SiteSettings(args.site, args.data, args.out, privacy_config=args.privacy_config),
        args.address,
    )


if __name__ == "__main__":
    main()
