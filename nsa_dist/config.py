"""The run config: one dataclass per config group, registered with Hydra as schemas, converted once.

Each group of nsa_dist.conf names its schema first in its defaults list (`defaults: [model_schema,
_self_]`) and states only what differs from the dataclass's defaults; `config.yaml` starts from
`run_schema`, the whole `RunConfig`. Hydra therefore rejects an unknown key or a value of the wrong
type while composing, and `run_config(cfg)` — the only place that reads a `DictConfig` — turns the
composed config into a validated `RunConfig` with `OmegaConf.to_object`. Everything below it takes
the dataclass of its own section.
"""
from __future__ import annotations

import math
import sysconfig
from dataclasses import fields

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from nsa_dist.training.config import RunConfig

# `${mul:a,b}` in a config: a weak-scaling sweep keeps the tokens per GPU fixed, so its sequence length is
# `${mul:${parallel.sp_size},TOKENS_PER_GPU}` (conf/experiment/scaling_weak.yaml). Registered with the schemas,
# which every reader of a run config (the trainer, the report, bench/project.py) imports.
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda *factors: math.prod(int(f) for f in factors))

# `${stdlib:}`: the running Python's standard library sources, a corpus every machine has (conf/data/stdlib.yaml).
# Resolved when the config is composed, so the run records the directory it read.
if not OmegaConf.has_resolver("stdlib"):
    OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"])

SECTIONS = {f.name: f.default_factory for f in fields(RunConfig)}


def schema(cls) -> DictConfig:
    """`cls` as a Hydra schema node. A frozen dataclass makes a read-only node, which config files
    could not override; the dataclass built from the composed config is frozen again."""
    node = OmegaConf.structured(cls)
    _make_writable(node)
    return node


def _make_writable(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, None)
    for child in node.values():
        if isinstance(child, DictConfig):
            _make_writable(child)


def register_schemas() -> None:
    """`run_schema` for config.yaml and `<group>_schema` in each group, for the files' defaults lists."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=schema(RunConfig))
    for group, cls in SECTIONS.items():
        store.store(group=group, name=f"{group}_schema", node=schema(cls))


# The model and nsa sections' checks name the key; from the command line, a preset is the other way out.
_PRESET_HINTS = {"invalid model config": ": fix the model.* override or pick a preset (model=tiny|small|base)",
                 "invalid NSA config": ": fix the nsa.* override or pick a preset (nsa=paper|fla|tiny)"}


def run_config(cfg: DictConfig) -> RunConfig:
    """The validated `RunConfig` of a composed config (its `hydra` node, if any, is left out).

    Raises ValueError naming the bad key and the fix.
    """
    try:
        # Plain values, so that the schema judges every key: a composed node would bring along keys that
        # `+group.key=value` appended to it.
        sections = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in SECTIONS if k in cfg]))
        typed = OmegaConf.merge(schema(RunConfig), sections)
        run = OmegaConf.to_object(typed)
    except MissingMandatoryValue as e:
        raise ValueError(f"{e.full_key} has no value: set it on the command line ({e.full_key}=...)") from e
    except (ConfigAttributeError, ConfigKeyError) as e:
        section = str(e.full_key).split(".")[0]
        known = ", ".join(f.name for f in fields(SECTIONS[section])) if section in SECTIONS else ", ".join(SECTIONS)
        raise ValueError(f"unknown setting {e.full_key}: {section} takes {known}") from e
    except OmegaConfBaseException as e:
        reason = str(e.msg).splitlines()[0]
        raise ValueError(f"{e.full_key}: {reason}: fix the {e.full_key} override") from e
    except ValueError as e:  # a section's own check, run as its dataclass was built
        hint = next((h for prefix, h in _PRESET_HINTS.items() if str(e).startswith(prefix)), "")
        raise ValueError(f"{e}{hint}") from e
    return run
