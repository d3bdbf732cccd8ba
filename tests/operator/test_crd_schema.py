"""The CRD (the chart's copy, the only one) against the config model and what the operator reads."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import pytest
from operator_harness import crd_schema, load_crd, validate_against_crd

from analytics_pipeline.core.config import ALL_GRANULARITIES, Config
from analytics_pipeline.operator import crd, render

MINIMAL = {"redis": {"secretRef": {"name": "conn"}}, "postgres": {"secretRef": {"name": "conn"}}}
# Where the CRD is deliberately stricter than, or defaults differently from, the config model (and why):
STRICTER = {
    ("sidecar", "port"): "0 (any free port) is useless behind a probe and a Service: minimum 1",
    ("sidecar", "healthPort"): "the probe listener's port is named in the probes: minimum 1",
    ("ingest", "maxPastSeconds"): "the model caps it at counters.ttl_seconds (<= 366 days) in a cross-field rule",
}
OTHER_DEFAULT = {
    ("sidecar", "healthPort"): "in a pod the kubelet and Prometheus need the probe listener; outside, it is off",
}


def spec_schema() -> dict[str, Any]:
    return crd_schema()["properties"]["spec"]


def node(path: tuple[str, ...]) -> dict[str, Any]:
    schema = spec_schema()
    for part in path:
        schema = schema["properties"][part]
    return schema


def leaves(schema: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every spec field that is not itself an object with declared properties (resources count as one field)."""
    if schema.get("type") == "object" and "properties" in schema and path[-1:] != ("resources",):
        for key, child in schema["properties"].items():
            yield from leaves(child, (*path, key))
    else:
        yield path, dict(schema)


def model_field(section: str, key: str) -> Any:
    section_type = type(getattr(Config(), section))
    return next(field for field in dataclasses.fields(section_type) if field.name == key)


def bounds(field: Any) -> tuple[Any, Any]:
    return field.metadata.get("ge"), field.metadata.get("le")


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """What the API server stores: missing fields with a ``default`` filled in, recursively."""
    if schema.get("type") != "object" or not isinstance(value, dict):
        return value
    result = dict(value)
    for key, child in (schema.get("properties") or {}).items():
        if key not in result and "default" in child:
            result[key] = copy.deepcopy(child["default"])
        if key in result:
            result[key] = apply_defaults(child, result[key])
    return result


def test_crd_identity_matches_the_operator() -> None:
    manifest = load_crd()
    assert manifest["metadata"]["name"] == crd.CRD_NAME
    spec = manifest["spec"]
    assert (spec["group"], spec["scope"]) == (crd.GROUP, "Namespaced")
    assert spec["names"]["kind"] == crd.KIND and spec["names"]["plural"] == crd.PLURAL
    assert spec["names"]["shortNames"] == list(crd.SHORT_NAMES)
    (version,) = spec["versions"]
    assert version["name"] == crd.VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column["jsonPath"] for column in version["additionalPrinterColumns"]}
    assert {"Ready", "Schedule", "TTL", "Last flush", "Age"} <= set(columns)
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert crd_schema()["properties"]["metadata"]["properties"]["name"]["maxLength"] == crd.MAX_NAME_LENGTH
    status = crd_schema()["properties"]["status"]["properties"]
    assert status["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


@pytest.mark.parametrize("spec_path", list(render.CONFIG_FIELDS), ids=".".join)
def test_config_fields_have_the_models_ranges_and_defaults(spec_path: tuple[str, ...]) -> None:
    section, key = render.CONFIG_FIELDS[spec_path]
    schema, field = node(spec_path), model_field(section, key)
    if key == "granularities":
        assert schema["items"]["enum"] == list(ALL_GRANULARITIES) and schema["x-kubernetes-list-type"] == "set"
        assert schema["default"] == list(field.default) and schema["minItems"] == 1
        return
    if key == "uncounted_events":
        assert schema["type"] == "array" and schema["items"]["type"] == "string"
        assert schema["default"] == list(field.default) and schema["x-kubernetes-list-type"] == "set"
        return
    low, high = bounds(field)
    if spec_path not in STRICTER:
        assert (schema.get("minimum"), schema.get("maximum")) == (low, high)
    else:  # stricter, never looser
        assert schema["minimum"] >= (low or 0) and (high is None or schema["maximum"] <= high)
    if spec_path in OTHER_DEFAULT:
        assert schema["default"] != field.default
    elif field.default is None:
        assert "default" not in schema
    else:
        assert schema["default"] == field.default
    kinds = {"int": "integer", "int | None": "integer", "bool": "boolean"}  # annotations are strings
    assert schema["type"] == kinds.get(field.type, "string")


def test_operator_defaults_and_ranges_equal_the_crds() -> None:
    """Every default and range the operator applies itself is the CRD's (kmock and old objects lack defaults)."""
    for path, schema in leaves(spec_schema()):
        default: Any = render.DEFAULTS
        for part in path:
            default = default[part]
        assert schema.get("default") == default or ("default" not in schema and default is None), path
    for path, (low, high) in render.INT_RANGES.items():
        assert (node(path)["minimum"], node(path)["maximum"]) == (low, high), path
    for section in ("sidecar", "flusher"):
        assert node((section, "imagePullPolicy"))["enum"] == list(render.PULL_POLICIES)


def test_crd_defaulted_spec_renders_exactly_like_the_bare_spec() -> None:
    defaulted = apply_defaults(spec_schema(), copy.deepcopy(MINIMAL))
    assert defaulted["counters"]["ttlSeconds"] == 604800 and defaulted["flusher"]["backoffLimit"] == 2
    bare = render.desired_state("ns", "web", MINIMAL, default_image="img:1")
    full = render.desired_state("ns", "web", defaulted, default_image="img:1")
    assert (bare.configmap, bare.cronjob, bare.config) == (full.configmap, full.cronjob, full.config)


class Recorder(Mapping[str, Any]):
    """A read-only spec that records every field path the operator looks at."""

    def __init__(self, data: Mapping[str, Any], seen: set[tuple[str, ...]], path: tuple[str, ...] = ()) -> None:
        self._data, self._seen, self._path = data, seen, path

    def __getitem__(self, key: str) -> Any:
        self._seen.add((*self._path, key))
        value = self._data[key]
        return Recorder(value, self._seen, (*self._path, key)) if isinstance(value, Mapping) else value

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self._seen.add((*self._path, key))
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_operator_reads_only_fields_the_crd_defines_and_every_one_of_them() -> None:
    full = apply_defaults(spec_schema(), copy.deepcopy(MINIMAL))
    full["flush"]["interval"] = "10m"
    full["ingest"]["maxPastSeconds"] = 3600
    full["sidecar"]["image"] = full["flusher"]["image"] = "img:2"
    full["postgres"]["readSecretRef"] = {"name": "reader", "key": "url"}
    seen: set[tuple[str, ...]] = set()
    render.desired_state("ns", "web", Recorder(full, seen), default_image="img:1", allowed_images=("img:",))
    declared = {path for path, _ in leaves(spec_schema())}
    prefixes = {path[:i] for path in declared for i in range(1, len(path))}
    read_leaves = {path for path in seen if path not in prefixes}
    # resources are read as whole maps (requests/limits -> quantities): count them at the 'resources' level
    read_leaves = {path[:2] if len(path) > 2 and path[1] == "resources" else path for path in read_leaves}
    assert read_leaves - declared == set(), "the operator reads fields the CRD does not define"
    assert declared - read_leaves == set(), "the CRD defines fields the operator ignores"


@pytest.mark.parametrize(("patch", "where"), [
    ({"counters": {"ttlSeconds": 60}}, "ttlSeconds"),
    ({"counters": {"granularities": ["weekly"]}}, "granularities"),
    ({"counters": {"granularities": ["daily", "daily"]}}, None),  # listType set (the API server rejects it)
    ({"flush": {"interval": "90s"}}, "interval"),
    ({"flush": {"batchSize": 0}}, "batchSize"),
    ({"ingest": {"dedupWindowSeconds": -1}}, "dedupWindowSeconds"),
    ({"sidecar": {"imagePullPolicy": "Sometimes"}}, "imagePullPolicy"),
    ({"flusher": {"resources": {"limits": {"memory": "lots"}}}}, "memory"),
    ({"redis": {}}, "secretRef"),
])
def test_schema_refuses_bad_specs(patch: dict[str, Any], where: str | None) -> None:
    spec = {**copy.deepcopy(MINIMAL), **patch}
    body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "web"}, "spec": spec}
    if where is None:  # uniqueness is enforced by x-kubernetes-list-type: set, which jsonschema does not know
        assert node(("counters", "granularities"))["x-kubernetes-list-type"] == "set"
        return
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate_against_crd(body)
    assert where in str(caught.value)


def test_schema_refuses_names_too_long_for_the_cronjob() -> None:
    body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "x" * 45}, "spec": MINIMAL}
    with pytest.raises(jsonschema.ValidationError):
        validate_against_crd(body)
    body["metadata"]["name"] = "x" * 44
    validate_against_crd(body)
    assert len(crd.cronjob_name("x" * 44)) == 52


def test_schema_is_structural_and_its_defaults_are_valid() -> None:
    """What the API server demands of a v1 CRD: a type on every node, defaults that validate."""
    def walk(schema: Mapping[str, Any], path: str) -> None:
        special = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in schema or special, f"{path} has no type"
        if "default" in schema:
            jsonschema.validate(schema["default"], dict(schema), cls=jsonschema.Draft7Validator)
        for key, child in (schema.get("properties") or {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(schema.get("additionalProperties"), Mapping):
            assert "properties" not in schema, f"{path}: properties and additionalProperties together"
            walk(schema["additionalProperties"], f"{path}.*")
        if isinstance(schema.get("items"), Mapping):
            walk(schema["items"], f"{path}[]")
    walk(crd_schema(), "")
