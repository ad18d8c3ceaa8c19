"""`flywheel serve` and `flywheel keys …`: the gateway's commands (registered on cli.app).

    flywheel serve [--host H] [--port P]      the OpenAI-compatible gateway (README: Gateway)
    flywheel keys create --tenant T [--save F] a new API key for tenant T, shown once
    flywheel keys list [--json]               key ids, tenants, created, revoked
    flywheel keys revoke KEY_ID               the key stops working at its next request
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from flywheel_assets.cli import EXIT_NOT_FOUND, EXIT_USAGE, app, fail

keys_app = typer.Typer(no_args_is_help=True, help="API keys of the gateway: each names a tenant.")
app.add_typer(keys_app, name="keys")


def _store(ctx: typer.Context):
    from flywheel_assets.lib.gateway.keys import KeyStore

    return KeyStore(ctx.obj.config.home / "gateway" / "keys.json")


@keys_app.command("create")
def keys_create(ctx: typer.Context, tenant: str = typer.Option(..., "--tenant", help="The tenant the key speaks for."),
                save: Optional[Path] = typer.Option(None, "--save", help="Also write the key to this file (mode 600).")):
    """Create a key; it is printed once (only its SHA-256 is stored)."""
    try:
        key, record = _store(ctx).create(tenant)
    except ValueError as error:
        fail(str(error), EXIT_USAGE)
    if save is not None:
        from flywheel_assets.lib.gateway.keys import write_private

        write_private(save, key + "\n")
    typer.echo(key)
    typer.echo(f"key id {record.key_id} for tenant {record.tenant}; store it now, it is not shown again", err=True)


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")):
    """Every key's id, tenant, creation and revocation (never the key)."""
    records = [{k: v for k, v in asdict(r).items() if k != "sha256"} for r in _store(ctx).list()]
    if as_json:
        typer.echo(json.dumps(records, indent=1))
        return
    for r in records:
        typer.echo(f"{r['key_id']}  {r['tenant']:<20} created {r['created_at']}"
                   + (f"  REVOKED {r['revoked_at']}" if r["revoked_at"] else ""))


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str = typer.Argument(..., help="The key id (its first 10 characters).")):
    """Revoke a key: a running gateway refuses it from its next request on."""
    try:
        record = _store(ctx).revoke(key_id)
    except KeyError as error:
        fail(str(error.args[0]), EXIT_NOT_FOUND)
    except ValueError as error:
        fail(str(error), EXIT_USAGE)
    typer.echo(f"revoked {record.key_id} (tenant {record.tenant}) at {record.revoked_at}")


@app.command()
def serve(ctx: typer.Context,
          host: Optional[str] = typer.Option(None, help="Default gateway.host (127.0.0.1)."),
          port: Optional[int] = typer.Option(None, help="Default gateway.port (8000).")):
    """Serve the registry's models behind an OpenAI-compatible API, logging every conversation."""
    import uvicorn

    from flywheel_assets.lib.gateway.app import create_app
    from flywheel_assets.lib.gateway.service import Gateway

    config = ctx.obj.config
    ctx.obj.require_home()
    gateway = Gateway(config)
    settings = config.gateway
    typer.echo(f"gateway: {gateway.backend.name} backend, FLYWHEEL_HOME {config.home}, "
               f"recovered {gateway.recovered}", err=True)
    uvicorn.run(create_app(gateway), host=host or settings.host, port=port or settings.port,
                log_level="warning", timeout_graceful_shutdown=10)
