"""YAML -> ``GatewayConfig``, or ``ConfigError`` listing every problem.

The file is composed into YAML nodes (which keep line and column), walked once,
and every problem is collected as ``PATH:LINE:COL: key.path: message`` before
one error is raised: an operator fixes a file in one pass, not one
``gateway check`` per typo.

The walk follows the model: each field's ``Setting`` (gateway.config.model)
names its key and converter, so a plain section needs no code here. Lists and
unions (limits, routes, buckets' inheritance) are read by hand below. The rules
between keys are in gateway.config.validate; the reader keeps every key's node
so their problems are located too.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final, TypeVar

import yaml

from gateway.config import validate
from gateway.config.convert import as_text, parse_hostport, upstream_name
from gateway.config.model import (
    DEFAULT_BUCKET,
    DEFAULT_PER,
    DEFAULT_UPSTREAM,
    UNLIMITED,
    BucketSpec,
    GatewayConfig,
    LimitsConfig,
    Override,
    RouteSpec,
    Setting,
    TlsConfig,
    Unlimited,
    UpstreamConfig,
    settings,
    yaml_keys,
)
from gateway.config.tls import pair_problems
from gateway.errors import ConfigError, ConfigProblem

__all__ = ["load_config", "parse_config", "parse_hostport"]

T = TypeVar("T")


class _Missing:
    """Marks a value that could not be read; its problem is already recorded."""


_MISSING = _Missing()


class _Reader:
    """Walks composed YAML nodes, converting values and recording problems."""

    def __init__(self, path: str, loader: yaml.SafeLoader) -> None:
        self.path = path
        self._loader = loader
        self.problems: list[ConfigProblem] = []
        # Every mapping's and read key's node by key path, for problems found
        # after reading (gateway.config.validate).
        self._nodes: dict[str, yaml.Node] = {}
        # The sizes each bucket read from the file inherits, and from where
        # (validate.Written.inherited); keyed by id, the bucket kept alive.
        self._inherited: dict[int, tuple[BucketSpec, dict[str, str]]] = {}
        # limits.default is in the file but did not read: the built-in default
        # stands in for it, so sizes inherited from it are not the file's.
        self.default_stands_in = False

    def problem(self, node: yaml.Node | None, key: str, message: str) -> None:
        line, column = (1, 1)
        if node is not None:
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
        self.problems.append(ConfigProblem(self.path, line, column, key, message))

    def mapping(
        self, node: yaml.Node, key: str, allowed: tuple[str, ...]
    ) -> dict[str, yaml.Node] | None:
        """The mapping's value nodes by key; unknown and repeated keys are
        problems (a typo must not silently disable a limit)."""
        if not isinstance(node, yaml.MappingNode):
            if not key:
                self.problem(node, "<document>", "expected a mapping")
            else:
                expected = f"expected a mapping of {', '.join(allowed)}"
                self.problem(node, key, f"{expected}; got {self.shape(node)}")
            return None
        self._nodes.setdefault(key, node)
        values: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or name not in allowed:
                self.problem(key_node, full, _unknown_key(key, name, allowed))
            elif name in values:
                self.problem(key_node, full, "key given twice")
            else:
                values[name] = value_node
                self._nodes.setdefault(full, value_node)
        return values

    def node(self, key: str) -> yaml.Node | None:
        """The node of ``key`` or, when the file does not hold it, of the
        nearest enclosing key that it holds."""
        while key and key not in self._nodes:
            # routes[0].limit[1].name -> routes[0].limit[1] -> routes[0].limit
            key = key[: key.rindex("[")] if key.endswith("]") else key.rpartition(".")[0]
        return self._nodes.get(key)

    def located(self, problems: list[validate.Problem]) -> None:
        """Record problems found on the built model, each at its key's node or,
        when the file does not hold that key, the nearest enclosing one's."""
        for key, message in problems:
            self.problem(self.node(key), key, message)

    def value(self, node: yaml.Node) -> Any:
        return self._loader.construct_object(node, deep=True)

    def shape(self, node: yaml.Node) -> str:
        """What a node that has the wrong shape holds, for a message."""
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if node.tag.endswith(":null"):
            return "nothing"
        return repr(self.value(node))

    def written(self) -> validate.Written:
        """What the file holds, for the rules between keys."""
        return validate.Written(keys=self._nodes, inherited=self.inherited)

    def inherit(self, bucket: BucketSpec, sizes: dict[str, str]) -> None:
        self._inherited[id(bucket)] = (bucket, sizes)

    def inherited(self, bucket: BucketSpec) -> Mapping[str, str]:
        """The sizes ``bucket`` does not write, by YAML key, with their origin;
        the built-in default bucket (no limits.default in the file) writes none."""
        if bucket is DEFAULT_BUCKET:
            return dict.fromkeys(_SIZES, validate.DEFAULT)
        entry = self._inherited.get(id(bucket))
        return entry[1] if entry is not None and entry[0] is bucket else {}

    def convert(self, node: yaml.Node, key: str, convert: Callable[[Any], T]) -> T | _Missing:
        try:
            return convert(self.value(node))
        except (ValueError, TypeError) as exc:
            self.problem(node, key, str(exc))
            return _MISSING


def _unknown_key(section: str, name: str | None, allowed: tuple[str, ...]) -> str:
    """``unknown key; did you mean 'refill_tokens'? expected one of: ...``."""
    expected = f"expected one of: {', '.join(allowed)}"
    if name is None:
        return f"unknown key; {expected}"
    if section == "limits" and name in yaml_keys(BucketSpec):
        return (
            f"unknown key; a limit's keys go under limits.default "
            f"(limits: {{default: {{{name}: ...}}}}); {expected}"
        )
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}? {expected}"
    return f"unknown key; {expected}"


# -- sections --


def _section(
    r: _Reader, node: yaml.Node | None, key: str, cls: type[Any], parent: yaml.Node
) -> Any:
    """A mapping read as ``cls``; absent (``node`` None) it is read as empty,
    its required keys' problems placed at ``parent``."""
    if node is None:
        return cls(**_settings(r, {}, parent, key, cls))
    before = len(r.problems)
    values = r.mapping(node, key, yaml_keys(cls))
    kwargs = _settings(r, values or {}, node, key, cls)
    if values is None:
        # "upstream: expected a mapping of url, ..." says it all: not also
        # "upstream.url: is required" at the same place.
        del r.problems[before + 1 :]
    return cls(**kwargs)


def _settings(
    r: _Reader, values: dict[str, yaml.Node], where: yaml.Node, key: str, cls: type[Any]
) -> dict[str, Any]:
    """``cls``'s keyword arguments from ``values``, by each field's Setting. A key
    the file lacks or that fails to convert is left out, so the field's default
    applies (a required field gets its stand-in); ``by_hand`` fields are the
    caller's."""
    kwargs: dict[str, Any] = {}
    converted: dict[str, Any] = {}  # by YAML key: one key may fill several fields
    for name, yaml_key, spec in settings(cls):
        full = f"{key}.{yaml_key}" if key else yaml_key
        node = values.get(yaml_key)
        if spec.section is not None:
            if node is not None or not spec.optional:
                kwargs[name] = _section(r, node, full, spec.section, where)
            continue
        if spec.parse is None:
            continue
        if node is None:
            value: Any = _MISSING
            if spec.required:
                r.problem(where, full, spec.required)
        elif yaml_key in converted:
            value = converted[yaml_key]
        elif spec.each:
            value = converted[yaml_key] = _each(r, node, full, spec)
        else:
            value = converted[yaml_key] = r.convert(node, full, spec.parse)
        if not isinstance(value, _Missing):
            kwargs[name] = value if spec.part is None else value[spec.part]
        elif spec.required:
            kwargs[name] = spec.stand_in
    return kwargs


def _each(r: _Reader, node: yaml.Node, key: str, spec: Setting) -> Any:
    """A YAML list read item by item with ``spec.parse``, then gathered (a tuple
    by default); _MISSING when an item or the list fails (the field's default
    stands in)."""
    assert spec.parse is not None
    nodes = _sequence(r, node, key)
    if nodes is None:
        return _MISSING
    items = [r.convert(item, key, spec.parse) for item in nodes]
    if any(isinstance(item, _Missing) for item in items):
        return _MISSING
    if spec.gather is None:
        return tuple(items)
    try:
        return spec.gather(items)
    except ValueError as exc:
        r.problem(node, key, str(exc))
        return _MISSING


def _sequence(r: _Reader, node: yaml.Node, key: str) -> list[yaml.Node] | None:
    """The list's item nodes (none for a null); None, a problem recorded, when
    ``node`` is not a list."""
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
        return []
    if not isinstance(node, yaml.SequenceNode):
        hint = ""
        if isinstance(node, yaml.ScalarNode):
            hint = f"; for one item, write [{node.value}]"
        r.problem(node, key, f"expected a list{hint}")
        return None
    return list(node.value)


# -- limits: a mapping or a list of them, refining a base bucket --

_SIZES: Final = ("refill_period", "refill_tokens", "max_tokens")


def _example() -> str:
    b = DEFAULT_BUCKET
    period = f"{b.refill_period_seconds:g}s"
    return (
        f"{{refill_period: {period}, refill_tokens: {b.refill_tokens}, "
        f"max_tokens: {b.max_tokens}}} ({b.refill_tokens} tokens every {period}, "
        f"up to {b.max_tokens})"
    )


# "10/s" or "10" where a limit belongs: name the keys, show one.
_ONE_LIMIT: Final = f"a mapping of {', '.join(yaml_keys(BucketSpec))}, such as {_example()}"
_LIMIT_SHAPE: Final = f"{_ONE_LIMIT}, or a list of such mappings"


def _limit(
    r: _Reader, node: yaml.Node, key: str, base: BucketSpec, name: str
) -> tuple[BucketSpec, ...] | _Missing:
    """A limit wherever one is allowed: one mapping, or a list of mappings that
    must all admit. Each refines ``base`` (its missing refill_period,
    refill_tokens and max_tokens are base's). Unnamed, a single limit is
    ``name``; in a list, the first is ``name`` and later ones ``name-2``,
    ``name-3`` ... (by position). _MISSING after any problem."""
    items = _limit_items(r, node, key, base, name)
    if isinstance(items, _Missing) or None in items:
        return _MISSING
    return tuple(item for item in items if item is not None)


def _limit_items(
    r: _Reader, node: yaml.Node, key: str, base: BucketSpec, name: str
) -> list[BucketSpec | None] | _Missing:
    """_limit's items, None for one with a problem (also a name it shares)."""
    if isinstance(node, yaml.MappingNode):
        bucket = _bucket(r, node, key, base, name)
        return [None if isinstance(bucket, _Missing) else bucket]
    if not isinstance(node, yaml.SequenceNode):
        r.problem(node, key, f"expected {_LIMIT_SHAPE}; got {r.shape(node)}")
        return _MISSING
    if not node.value:
        r.problem(node, key, "an empty list of limits; give at least one")
        return _MISSING
    items: list[BucketSpec | None] = []
    for i, item in enumerate(node.value):
        item_name = name if i == 0 else f"{name}-{i + 1}"
        bucket = _bucket(r, item, f"{key}[{i}]", base, item_name)
        items.append(None if isinstance(bucket, _Missing) else bucket)
    problems = validate.limit_list_problems(items, key)
    if problems:
        r.located(problems)
        # A name is repeated by a later item, never by the first.
        items[1:] = [None] * (len(items) - 1)
    return items


def _bucket(
    r: _Reader, node: yaml.Node, key: str, base: BucketSpec, name: str
) -> BucketSpec | _Missing:
    if not isinstance(node, yaml.MappingNode):
        r.problem(node, key, f"expected {_ONE_LIMIT}; got {r.shape(node)}")
        return _MISSING
    before = len(r.problems)
    values = r.mapping(node, key, yaml_keys(BucketSpec))
    if values is None:
        return _MISSING
    return _bucket_fields(r, values, node, key, base, name, len(r.problems) == before)


def _bucket_fields(
    r: _Reader,
    values: dict[str, yaml.Node],
    node: yaml.Node,
    key: str,
    base: BucketSpec,
    name: str,
    known_keys: bool,
) -> BucketSpec | _Missing:
    """The keys ``values`` holds over ``base``'s sizes (``name`` and ``per`` are
    not inherited: ``name`` unless the file names it, per: client unless it
    says); _MISSING after any problem. ``known_keys``: the mapping had no
    unknown or repeated key."""
    problems_before = len(r.problems)
    read = {"name": name, "per": DEFAULT_PER, **_settings(r, values, node, key, BucketSpec)}
    bucket = replace(base, **read)
    base_sizes = r.inherited(base)
    inherited = {
        size: base_sizes.get(size, "limits.default") for size in _SIZES if size not in values
    }
    # The sizes are compared only when they are what the file says: not after
    # a problem in this mapping (max_token: 100, a typo, leaves max_tokens at
    # its default), nor with sizes that stand in for a limits.default that
    # did not read.
    read_cleanly = (
        known_keys
        and len(r.problems) == problems_before
        and not (r.default_stands_in and base is DEFAULT_BUCKET and inherited)
    )
    r.inherit(bucket, inherited)
    r.located(
        validate.bucket_problems(bucket, key, read_cleanly=read_cleanly, inherited=inherited)
    )
    if not known_keys or len(r.problems) > problems_before:
        return _MISSING
    return bucket


_OVERRIDE_KEYS: Final = ("client", *yaml_keys(BucketSpec), "limit")


def _limits(r: _Reader, node: yaml.Node | None) -> tuple[LimitsConfig, BucketSpec]:
    """limits, and the bucket route limits refine: limits.default's first."""
    if node is None:
        return LimitsConfig(), DEFAULT_BUCKET
    values = r.mapping(node, "limits", yaml_keys(LimitsConfig)) or {}
    default = LimitsConfig().default
    base = default[0]  # what other limits refine
    if "default" in values:
        items = _limit_items(r, values["default"], "limits.default", base, "default")
        if not isinstance(items, _Missing):
            if None not in items:
                default = tuple(item for item in items if item is not None)
            # A first item that read well is still what routes refine, even
            # when a later one has a problem (no bogus problems at routes).
            base = items[0] or base
        r.default_stands_in = base is DEFAULT_BUCKET
    overrides: list[Override] = []
    seen: set[str] = set()
    nodes = (
        _sequence(r, values["overrides"], "limits.overrides") if "overrides" in values else []
    )
    for i, item in enumerate(nodes or []):
        key = f"limits.overrides[{i}]"
        override = _override(r, item, key, base)
        if override is None:
            continue
        if override.client in seen:
            client_key = f"{key}.client"
            r.problem(r.node(client_key), client_key, f"{override.client!r} is listed twice")
            continue
        seen.add(override.client)
        overrides.append(override)
    return LimitsConfig(default=default, overrides=tuple(overrides)), base


def _override(r: _Reader, item: yaml.Node, key: str, base: BucketSpec) -> Override | None:
    """``{client: ID, <a bucket's keys>}`` or ``{client: ID, limit: <a limit>}``
    (the form for several limits); None after any problem."""
    before = len(r.problems)
    fields = r.mapping(item, key, _OVERRIDE_KEYS)
    if fields is None:
        return None
    known_keys = len(r.problems) == before
    client_node = fields.pop("client", None)
    if client_node is None:
        r.problem(item, f"{key}.client", "is required")
        return None
    client = r.convert(client_node, f"{key}.client", as_text)
    limit_node = fields.pop("limit", None)
    buckets: tuple[BucketSpec, ...] | _Missing
    if limit_node is None:
        bucket = _bucket_fields(r, fields, item, key, base, "override", known_keys)
        buckets = _MISSING if isinstance(bucket, _Missing) else (bucket,)
    elif fields:
        r.problem(
            limit_node,
            f"{key}.limit",
            "give the limit either inline (next to client) or under limit, not both; "
            f"inline here: {', '.join(fields)}",
        )
        buckets = _MISSING
    elif isinstance(limit_node, yaml.ScalarNode):
        r.problem(
            limit_node,
            f"{key}.limit",
            f"expected {_LIMIT_SHAPE} (clients.allow exempts a client from every "
            f"limit); got {r.shape(limit_node)}",
        )
        buckets = _MISSING
    else:
        buckets = _limit(r, limit_node, f"{key}.limit", base, "override")
    if isinstance(client, _Missing) or isinstance(buckets, _Missing):
        return None
    return Override(client, buckets)


def _routes(r: _Reader, node: yaml.Node | None, base: BucketSpec) -> tuple[RouteSpec, ...]:
    """One RouteSpec per item, also for an item with problems (a stand-in), so
    ``config.routes[i]`` is the file's ``routes[i]`` for the rules between
    routes (gateway.config.validate)."""
    if node is None:
        return ()
    routes: list[RouteSpec] = []
    for i, item in enumerate(_sequence(r, node, "routes") or []):
        key = f"routes[{i}]"
        values = r.mapping(item, key, yaml_keys(RouteSpec))
        if values is None:
            routes.append(RouteSpec("/"))
            continue
        read = _settings(r, values, item, key, RouteSpec)
        limit = _route_limit(r, values.get("limit"), f"{key}.limit", base, read["path_prefix"])
        routes.append(RouteSpec(**read, limit=limit))
    return tuple(routes)


def _route_limit(
    r: _Reader, node: yaml.Node | None, key: str, base: BucketSpec, prefix: str
) -> tuple[BucketSpec, ...] | Unlimited | None:
    if node is None:
        return None
    if isinstance(node, yaml.ScalarNode):
        if r.value(node) == "unlimited":
            return UNLIMITED
        r.problem(node, key, f"expected 'unlimited', {_LIMIT_SHAPE}; got {r.shape(node)}")
        return None
    limit = _limit(r, node, key, base, prefix)
    return None if isinstance(limit, _Missing) else limit


_UPSTREAMS_EXAMPLE: Final = '{static: {url: "http://127.0.0.1:8001"}}'


def _upstreams(r: _Reader, node: yaml.Node | None) -> dict[str, UpstreamConfig]:
    """``upstreams``: names, each an upstream read like ``upstream``. A name
    with a problem is left out (a route naming it is not then reported too)."""
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
        return {}
    if not isinstance(node, yaml.MappingNode):
        r.problem(
            node,
            "upstreams",
            f"expected a mapping of names to upstreams, such as {_UPSTREAMS_EXAMPLE}; "
            f"got {r.shape(node)}",
        )
        return {}
    found: dict[str, UpstreamConfig] = {}
    for key_node, value_node in node.value:
        raw = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        try:
            name = upstream_name(raw)
        except ValueError as exc:
            r.problem(key_node, f"upstreams.{raw}", str(exc))
            continue
        key = f"upstreams.{name}"
        if name == DEFAULT_UPSTREAM:
            r.problem(
                key_node, key, f"{name!r} is the name of `upstream` itself; pick another name"
            )
        elif name in found:
            r.problem(key_node, key, "upstream given twice")
        else:
            found[name] = _section(r, value_node, key, UpstreamConfig, value_node)
    return found


def parse_config(text: str, path: str = "<memory>") -> GatewayConfig:
    """Parse YAML text into a ``GatewayConfig``; raise ``ConfigError`` listing
    every problem, each located at ``path:line:column``. With ``tls``, its
    files are read and the pair loaded (gateway.config.tls), relative names
    taken from ``path``'s directory (the working directory for <memory>)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            message = exc.problem or str(exc)
            raise ConfigError(
                [ConfigProblem(path, line, column, "<yaml>", f"invalid YAML: {message}")]
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(
                [ConfigProblem(path, 1, 1, "<yaml>", f"invalid YAML: {exc}")]
            ) from None
        if root is None:
            raise ConfigError(
                [ConfigProblem(path, 1, 1, "upstream.url", "is required; the file is empty")]
            )
        r = _Reader(path, loader)
        values = r.mapping(root, "", yaml_keys(GatewayConfig))
        if values is None:
            raise ConfigError(r.problems)
        config = _build(r, root, values)
    finally:
        loader.dispose()
    if r.problems:
        raise ConfigError(sorted(r.problems, key=lambda p: (p.line, p.column)))
    return replace(config, source=path)


def _build(r: _Reader, root: yaml.Node, values: dict[str, yaml.Node]) -> GatewayConfig:
    limits, base = _limits(r, values.get("limits"))
    config = GatewayConfig(
        **_settings(r, values, root, "", GatewayConfig),
        limits=limits,
        routes=_routes(r, values.get("routes"), base),
        upstreams=_upstreams(r, values.get("upstreams")),
    )
    # The rules between keys skip what failed to read: its stand-in is a value
    # the user never wrote.
    unread = [problem.key for problem in r.problems]
    r.located(validate.config_problems(config, unread=unread, written=r.written()))
    if config.tls is not None and "tls" not in unread:
        tls = _beside(config.tls, r.path)
        config = replace(config, tls=tls)
        r.located(pair_problems(tls))
    return config


def _beside(tls: TlsConfig, path: str) -> TlsConfig:
    """Relative file names made relative to the config file's directory."""
    if path == "<memory>":
        return tls
    where = os.path.dirname(path)
    # An empty name stands in for a key with a problem: it stays empty.
    cert = tls.cert and os.path.join(where, tls.cert)
    return TlsConfig(cert, tls.key and os.path.join(where, tls.key))


def load_config(path: str) -> GatewayConfig:
    """Read and parse the file at ``path``; an unreadable file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            [ConfigProblem(path, 1, 1, "<file>", f"cannot read: {reason}")]
        ) from None
    return parse_config(text, path)
