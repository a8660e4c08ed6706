"""Flower run config <-> the driver's FedConfig.

Every FedConfig field is a run-config key with '_' written '-' (the kseed-fed flag names): method
(fedkseed | fedmezo | mezo | ferret: kseed.methods; where the run config leaves a key at FedConfig's
default, the method's own default, e.g. Ferret's lr, and a field the method fixes, e.g. MeZO's one
client, take its place, as with kseed-fed), rounds,
num-clients, clients-per-round, local-steps, num-seeds, lr, eps, sampling, ... .  TOML has no null, so an
optional field (model, data, eval-category) is "" for None.  Besides those: device, out (where the
ServerApp writes metrics.jsonl and its checkpoint; "" = no files), resume (true: continue the
checkpoint in out; the rest of the run config must match the checkpoint's, except rounds and the
evaluation cadence) and the Flower-side options
revision (of an ORG/NAME model in the local Hugging Face cache: kseed.hub), round-timeout (seconds a
round waits for replies), node-wait-timeout (seconds the ServerApp waits for
the nodes at start), max-upload-bytes (0 = the driver's own limit only) and tensorboard (a
directory where the ServerApp writes each round's metrics as TensorBoard scalars; "" = none).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Tuple

from kseed.config import FedConfig

from .common import config_value

EXTRA_DEFAULTS = {
    "device": "cpu",
    "out": "",
    "resume": False,
    "round-timeout": 600.0,
    "node-wait-timeout": 300.0,
    "max-upload-bytes": 0,
    "revision": "main",
    "tensorboard": "",
}
EXTRA_KINDS = {"device": str, "out": str, "resume": bool, "round-timeout": float,
               "node-wait-timeout": float, "max-upload-bytes": int, "revision": str,
               "tensorboard": str}


def key_of(field_name: str) -> str:
    return field_name.replace("_", "-")


def _field_kind(f: dataclasses.Field) -> Tuple[type, bool]:
    """(scalar kind, optional) of a FedConfig field from its annotation."""
    hints = typing.get_type_hints(FedConfig)
    t = hints[f.name]
    optional = False
    if typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = len(args) < len(typing.get_args(t))
        t = args[0]
    if t not in (int, float, str, bool):
        raise TypeError(f"FedConfig.{f.name}: type {t} has no run-config form")
    return t, optional


def default_run_config() -> dict:
    """The app's [tool.flwr.app.config]: FedConfig's defaults plus the extra keys."""
    cfg = FedConfig()
    out = {}
    for f in dataclasses.fields(FedConfig):
        v = getattr(cfg, f.name)
        out[key_of(f.name)] = "" if v is None else v
    out.update(EXTRA_DEFAULTS)
    return out


def fed_config(run_config: Mapping[str, Any]) -> FedConfig:
    """A validated FedConfig from a Flower run config (missing keys take FedConfig's defaults)."""
    base = FedConfig()
    values = {}
    for f in dataclasses.fields(FedConfig):
        kind, optional = _field_kind(f)
        key = key_of(f.name)
        if key not in run_config:
            values[f.name] = getattr(base, f.name)
            continue
        raw = run_config[key]
        if optional and raw == "":
            values[f.name] = None
            continue
        values[f.name] = config_value(run_config, key, kind)
    if isinstance(values["model"], str):  # ORG/NAME: its snapshot in this machine's hub cache
        from kseed.hub import resolve
        values["model"] = resolve(values["model"], extra(run_config, "revision"))
    if isinstance(values["data"], str):  # ORG/NAME: a data set's snapshot in the hub cache
        from kseed.hub import resolve
        values["data"] = resolve(values["data"], "main", kind="dataset")
    from kseed import methods
    if values["method"] in methods.NAMES:  # else validate() names it
        # The app's [tool.flwr.app.config] always holds every key, so a key the run config leaves at
        # FedConfig's default counts as not given: the method's own defaults (e.g. Ferret's lr) and
        # the fields it fixes (e.g. MeZO's one client) take their place, through the one
        # Method.configure kseed-fed uses.  A fixed field set to another value stays, for validate()
        # to refuse by name.
        method = methods.get(values["method"])
        given = {n: v for n, v in values.items() if v != getattr(base, n)}
        values.update(method.configure(given))
        values.update({n: v for n, v in given.items() if n in method.fixed})
    from kseed.task import resolve_dtype  # dtype / rounding auto: the base model's own
    return resolve_dtype(FedConfig(**values).validate())


def extra(run_config: Mapping[str, Any], key: str):
    return config_value(run_config, key, EXTRA_KINDS[key], EXTRA_DEFAULTS[key])


def pyproject_config_section() -> str:
    """The [tool.flwr.app.config] TOML text for default_run_config() (used to write the app dir)."""
    lines = ["[tool.flwr.app.config]"]
    for k, v in default_run_config().items():
        if isinstance(v, bool):
            s = "true" if v else "false"
        elif isinstance(v, (int, float)):
            s = repr(v)
        else:
            s = '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{k} = {s}")
    return "\n".join(lines) + "\n"


def write_app_pyproject(path=None) -> bool:
    """Rewrite the [tool.flwr.app.config] section (the file's last) of the shipped app's pyproject.toml
    from FedConfig; True if it changed.  Run `python -m kseed.flower.runconfig` after adding a
    FedConfig field."""
    from pathlib import Path

    from . import app_dir

    p = Path(path) if path is not None else app_dir() / "pyproject.toml"
    text = p.read_text()
    head = text[:text.index("[tool.flwr.app.config]")]
    new = head + pyproject_config_section()
    if new == text:
        return False
    p.write_text(new)
    return True


if __name__ == "__main__":
    print("updated" if write_app_pyproject() else "already up to date")
