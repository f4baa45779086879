"""Find backends by name: samplers, embedders and reward kinds are entry points.

Three entry-point groups, one per extension point::

    qprobe.samplers    NAME = module:SamplerClass      called as SamplerClass(**options)
    qprobe.embedders   NAME = module:EmbedderClass     called as EmbedderClass(**options)
    qprobe.rewards     NAME = module:factory           called as factory(arg, timeout=...) -> reward fn

A plugin package declares its entry points in its own metadata (setup.cfg
``[options.entry_points]`` or pyproject ``[project.entry-points."qprobe.samplers"]``);
installed next to qprobe, its names appear in ``qprobe sample --sampler NAME`` and the rest.
qprobe's built-ins are declared the same way in setup.cfg. ``BUILTIN`` repeats them
so that a plain checkout on ``sys.path`` (no installed metadata) still finds them;
tests/test_registry.py checks that the two lists agree.

This module imports nothing heavy and never the backends themselves: a backend's
module is imported only when its name is asked for.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from qprobe.errors import QProbeError, missing_extra

SAMPLERS, EMBEDDERS, REWARDS = "qprobe.samplers", "qprobe.embedders", "qprobe.rewards"

# group -> name -> "module:attribute" (the same lines as setup.cfg's [options.entry_points])
BUILTIN: dict[str, dict[str, str]] = {
    SAMPLERS: {
        "hf": "qprobe.samplers.hf:HFSampler",
        "api": "qprobe.samplers.openai_api:OpenAISampler",
    },
    EMBEDDERS: {
        "hf": "qprobe.embedders.hf:HFEmbedder",
        "sentence": "qprobe.embedders.sentence:SentenceEmbedder",
        "api": "qprobe.embedders.openai_api:OpenAIEmbedder",
    },
    REWARDS: {
        "code": "qprobe.rewards.code:make_code_reward",
        "match": "qprobe.rewards.simple:make_match_reward",
        "regex": "qprobe.rewards.simple:make_regex_reward",
        "python": "qprobe.rewards.simple:make_python_reward",
    },
}
WHAT = {SAMPLERS: "sampler", EMBEDDERS: "embedder", REWARDS: "reward kind"}


def available(group: str) -> dict[str, str]:
    """name -> "module:attribute" for every backend of ``group``: built-ins, then installed entry points.

    An installed entry point with a built-in's name replaces it (so an installed qprobe's
    own metadata and this table never disagree silently: the metadata wins).
    """
    found = dict(BUILTIN.get(group, {}))
    for ep in entry_points(group=group):
        found[ep.name] = ep.value
    return found


def distribution(group: str, name: str) -> str | None:
    """``"dist-name==version"`` of the installed package that registers ``name`` in ``group``;
    None for qprobe's own backends (their changes are versioned by qprobe, e.g. ``REWARDS_VERSION``)."""
    for ep in entry_points(group=group):
        if ep.name == name:
            dist = getattr(ep, "dist", None)
            if dist is None or dist.metadata["Name"].lower().replace("_", "-") == "qprobe":
                return None
            return f"{dist.metadata['Name']}=={dist.version}"
    return None


def load(group: str, name: str):
    """The object registered as ``name`` in ``group`` (a class or a factory), imported now.

    Raises
    ------
    QProbeError
        Unknown name (the message lists the registered ones), a target that cannot be
        found, or a missing optional dependency (the message names the extra to install).
    """
    table = available(group)
    if name not in table:
        raise QProbeError(f"unknown {WHAT.get(group, group)} {name!r} (registered: {', '.join(sorted(table))})")
    module, _, attr = table[name].partition(":")
    try:
        obj = importlib.import_module(module.strip())
    except ModuleNotFoundError as e:
        if e.name and (e.name == module.strip() or module.strip().startswith(e.name + ".")):
            raise QProbeError(f"{WHAT.get(group, group)} {name!r}: module {module.strip()!r} is not installed") from None
        raise missing_extra(e) from None
    try:
        for part in attr.strip().split(".") if attr.strip() else ():
            obj = getattr(obj, part)
    except AttributeError:
        raise QProbeError(f"{WHAT.get(group, group)} {name!r}: {table[name]} not found") from None
    return obj


def build(group: str, name: str, options: dict):
    """``load(group, name)(**options)``: a sampler or embedder instance.

    An option the backend does not take is reported in one line naming it.
    """
    cls = load(group, name)
    try:
        import inspect

        inspect.signature(cls).bind(**options)
    except TypeError as e:
        raise QProbeError(f"{WHAT.get(group, group)} {name!r} does not take these options: {e}") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    try:
        return cls(**options)
    except ModuleNotFoundError as e:
        raise missing_extra(e) from None
