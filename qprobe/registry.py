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

Every backend builds itself: ``build(group, name, **options)`` hands it the generic
options every command shares (its classmethod ``kwargs_from_options`` maps them), and
``rebuild(group, identity)`` makes the backend that recorded ``identity`` again (its
classmethod ``kwargs_from_identity``). Callers never branch on a backend's name.

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


# The backend a command uses when no name is given: the first whose option is set (None: always).
DEFAULTS: dict[str, tuple[tuple[str | None, str], ...]] = {
    SAMPLERS: (("api_base", "api"), (None, "hf")),
    EMBEDDERS: (("sentence_model", "sentence"), ("api_base", "api"), (None, "hf")),
}


def default_name(group: str, options: dict) -> str:
    """The backend of ``group`` that the generic ``options`` call for when no name is given."""
    return next(name for option, name in DEFAULTS[group] if option is None or options.get(option))


def uses_api(model: str | None, api_base: str | None, api_model: str | None) -> bool:
    """Whether the generic model options name an API model (else a local one); one line when they contradict."""
    if api_base and model:
        raise QProbeError("give --model or --api-base, not both")
    if api_base:
        if not api_model:
            raise QProbeError("--api-base needs --api-model")
        return True
    if api_model:
        raise QProbeError("--api-model needs --api-base")
    return False


def takes(cls, values: dict) -> dict:
    """The entries of ``values`` that ``cls(...)`` accepts as keywords, None values left out
    (a backend's default applies). Every entry when it takes ``**kwargs`` or shows no signature."""
    import inspect

    values = {k: v for k, v in values.items() if v is not None}
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return values
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return values
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in values.items() if k in names}


def construct(group: str, name: str, kwargs: dict):
    """``load(group, name)(**kwargs)``: a sampler or embedder from its own constructor arguments.

    An option the backend does not take is reported in one line naming it.
    """
    return _construct(group, name, load(group, name), kwargs)


def _construct(group: str, name: str, cls, kwargs: dict):
    import inspect

    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise QProbeError(f"{WHAT.get(group, group)} {name!r} does not take these options: {e}") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    try:
        return cls(**kwargs)
    except ModuleNotFoundError as e:
        raise missing_extra(e) from None


def build(group: str, name: str | None = None, overrides: dict | None = None, **options):
    """A sampler or embedder from the generic options every command shares.

    The backend maps them itself (its classmethod ``kwargs_from_options``: which it uses, its
    defaults, which it refuses); ``overrides`` (``-O KEY=VALUE``) then go to its constructor as
    they are. ``name`` None: `default_name`.

    Parameters
    ----------
    group : str
        `SAMPLERS` or `EMBEDDERS`.
    **options
        ``model``, ``api_base``, ``api_model``, ``api_key``, ``device``, ``dtype``, ``batch_size``,
        ``timeout``, ``max_retries``; samplers also ``temperature``, ``top_p``, ``max_new_tokens``,
        ``stop``, ``capture``, ``code_block``, ``prefix_every``, ``guide`` (``chunk``, ``branch``,
        ``beta``); embedders also ``layer``, ``pooling``, ``sentence_model``. None: not given.
    """
    name = name or default_name(group, options)
    cls = load(group, name)
    return _construct(group, name, cls, {**cls.kwargs_from_options(**options), **(overrides or {})})


def rebuild(group: str, identity: dict | None, **options):
    """The backend that recorded ``identity`` (its ``identity()``), built again.

    The backend maps the identity back to its arguments itself (classmethod
    ``kwargs_from_identity``); ``options`` are the run-time ones an identity leaves out
    (``api_key``, ``device``, ``batch_size``, ``max_retries``, ...), each passed where the backend
    takes it. The rebuilt backend's identity must agree with ``identity`` on every key both hold.

    Raises
    ------
    QProbeError
        No identity or no ``kind`` in it, an unknown kind, or a rebuilt identity that differs.
    """
    what = WHAT.get(group, group)
    if not identity or "kind" not in identity:
        raise QProbeError(f"no {what} recorded to rebuild (features made by `qprobe embed` or `sample --capture` "
                          "record theirs)")
    name = identity["kind"]
    cls = load(group, name)
    obj = _construct(group, name, cls, cls.kwargs_from_identity(identity, **options))
    mine = obj.identity()
    if any(mine[k] != identity[k] for k in set(mine) & set(identity)):
        raise QProbeError(f"the rebuilt {what} {mine} differs from the recorded {identity}")
    return obj
