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

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import yaml

from gateway.config import validate
from gateway.config.convert import as_text, enum_choice, parse_hostport, path_prefix
from gateway.config.model import (
    UNLIMITED,
    BucketSpec,
    GatewayConfig,
    LimitsConfig,
    Mode,
    Override,
    RouteSpec,
    Unlimited,
    settings,
    yaml_keys,
)
from gateway.errors import ConfigError, ConfigProblem

__all__ = ["load_config", "parse_config", "parse_hostport"]

T = TypeVar("T")

_mode = enum_choice(Mode)


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
            self.problem(node, key or "<document>", "expected a mapping")
            return None
        self._nodes.setdefault(key, node)
        values: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or name not in allowed:
                hint = f"; expected one of: {', '.join(allowed)}"
                self.problem(key_node, full, f"unknown key{hint}")
            elif name in values:
                self.problem(key_node, full, "key given twice")
            else:
                values[name] = value_node
                self._nodes.setdefault(full, value_node)
        return values

    def located(self, problems: list[validate.Problem]) -> None:
        """Record problems found on the built model, each at its key's node or,
        when the file does not hold that key, the nearest enclosing one's."""
        for key, message in problems:
            path = key
            while path and path not in self._nodes:
                path = path.rpartition(".")[0]
            self.problem(self._nodes.get(path), key, message)

    def value(self, node: yaml.Node) -> Any:
        return self._loader.construct_object(node, deep=True)

    def convert(self, node: yaml.Node, key: str, convert: Callable[[Any], T]) -> T | _Missing:
        try:
            return convert(self.value(node))
        except (ValueError, TypeError) as exc:
            self.problem(node, key, str(exc))
            return _MISSING

    def field(
        self,
        values: dict[str, yaml.Node],
        parent: str,
        name: str,
        convert: Callable[[Any], T],
        default: T,
    ) -> T:
        node = values.get(name)
        if node is None:
            return default
        result = self.convert(node, f"{parent}.{name}" if parent else name, convert)
        return default if isinstance(result, _Missing) else result


# -- sections --


def _section(
    r: _Reader, node: yaml.Node | None, key: str, cls: type[Any], parent: yaml.Node
) -> Any:
    """A mapping read as ``cls``; absent (``node`` None) it is read as empty,
    its required keys' problems placed at ``parent``."""
    values = {} if node is None else r.mapping(node, key, yaml_keys(cls)) or {}
    return cls(**_settings(r, values, parent if node is None else node, key, cls))


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
            value = converted[yaml_key] = _each(r, node, full, spec.parse)
        else:
            value = converted[yaml_key] = r.convert(node, full, spec.parse)
        if not isinstance(value, _Missing):
            kwargs[name] = value if spec.part is None else value[spec.part]
        elif spec.required:
            kwargs[name] = spec.stand_in
    return kwargs


def _each(r: _Reader, node: yaml.Node, key: str, convert: Callable[[Any], T]) -> tuple[T, ...]:
    items = [r.convert(item, key, convert) for item in _sequence(r, node, key)]
    return tuple(item for item in items if not isinstance(item, _Missing))


def _bucket(
    r: _Reader, node: yaml.Node, key: str, base: BucketSpec, name: str
) -> BucketSpec | _Missing:
    values = r.mapping(node, key, yaml_keys(BucketSpec))
    if values is None:
        return _MISSING
    return _bucket_fields(r, values, node, key, base, name)


def _bucket_fields(
    r: _Reader,
    values: dict[str, yaml.Node],
    node: yaml.Node,
    key: str,
    base: BucketSpec,
    name: str,
) -> BucketSpec | _Missing:
    """The keys ``values`` holds over ``base``'s; _MISSING after any problem."""
    problems_before = len(r.problems)
    bucket = replace(base, name=name, **_settings(r, values, node, key, BucketSpec))
    read_cleanly = len(r.problems) == problems_before
    r.located(validate.bucket_problems(bucket, key, read_cleanly=read_cleanly))
    if len(r.problems) > problems_before:
        return _MISSING
    return bucket


def _sequence(r: _Reader, node: yaml.Node, key: str) -> list[yaml.Node]:
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
        return []
    if not isinstance(node, yaml.SequenceNode):
        r.problem(node, key, "expected a list")
        return []
    return list(node.value)


def _limits(r: _Reader, node: yaml.Node | None) -> LimitsConfig:
    if node is None:
        return LimitsConfig()
    values = r.mapping(node, "limits", yaml_keys(LimitsConfig)) or {}
    default = LimitsConfig().default
    if "default" in values:
        parsed = _bucket(r, values["default"], "limits.default", default, "default")
        if isinstance(parsed, BucketSpec):
            default = parsed
    overrides: list[Override] = []
    seen: set[str] = set()
    if "overrides" in values:
        for i, item in enumerate(_sequence(r, values["overrides"], "limits.overrides")):
            key = f"limits.overrides[{i}]"
            fields = r.mapping(item, key, ("client", *yaml_keys(BucketSpec)))
            if fields is None:
                continue
            client_node = fields.pop("client", None)
            if client_node is None:
                r.problem(item, f"{key}.client", "is required")
                continue
            client = r.convert(client_node, f"{key}.client", as_text)
            bucket = _bucket_fields(r, fields, item, key, default, "override")
            if isinstance(client, _Missing) or isinstance(bucket, _Missing):
                continue
            if client in seen:
                r.problem(client_node, f"{key}.client", f"{client!r} is listed twice")
                continue
            seen.add(client)
            overrides.append(Override(client, bucket))
    return LimitsConfig(default=default, overrides=tuple(overrides))


def _routes(r: _Reader, node: yaml.Node | None, default: BucketSpec) -> tuple[RouteSpec, ...]:
    if node is None:
        return ()
    routes: list[RouteSpec] = []
    for i, item in enumerate(_sequence(r, node, "routes")):
        key = f"routes[{i}]"
        values = r.mapping(item, key, ("path_prefix", "limit", "mode"))
        if values is None:
            continue
        if "path_prefix" not in values:
            r.problem(item, f"{key}.path_prefix", "is required")
            continue
        prefix = r.convert(values["path_prefix"], f"{key}.path_prefix", path_prefix)
        if isinstance(prefix, _Missing):
            prefix = "/"  # keep checking the route's other keys
        limit: BucketSpec | Unlimited | None = None
        limit_node = values.get("limit")
        if limit_node is not None:
            if isinstance(limit_node, yaml.ScalarNode):
                if r.value(limit_node) == "unlimited":
                    limit = UNLIMITED
                else:
                    r.problem(
                        limit_node,
                        f"{key}.limit",
                        "expected 'unlimited' or a mapping of "
                        + ", ".join(yaml_keys(BucketSpec)),
                    )
            else:
                parsed = _bucket(r, limit_node, f"{key}.limit", default, prefix)
                if isinstance(parsed, BucketSpec):
                    limit = parsed
        mode = r.field(values, key, "mode", _mode, None)
        routes.append(RouteSpec(prefix, limit, mode))
    return tuple(routes)


def parse_config(text: str, path: str = "<memory>") -> GatewayConfig:
    """Parse YAML text into a ``GatewayConfig``; raise ``ConfigError`` listing
    every problem, each located at ``path:line:column``."""
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
    limits = _limits(r, values.get("limits"))
    config = GatewayConfig(
        **_settings(r, values, root, "", GatewayConfig),
        limits=limits,
        routes=_routes(r, values.get("routes"), limits.default),
    )
    r.located(validate.config_problems(config))
    return config


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
