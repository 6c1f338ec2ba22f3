"""Request-body schemas for the OpenAPI document, written the way clients and their tools read best."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` written in place: a request body given through
    `openapi_extra` is not registered in the document's components, so a `#/$defs/...` reference
    would point nowhere in it."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            rest = {key: resolve(value) for key, value in node.items() if key != "$ref"}
            return {**resolve(defs[node["$ref"].rsplit("/", 1)[-1]]), **rest} if "$ref" in node else rest
        return [resolve(item) for item in node] if isinstance(node, list) else node

    return _nullable_as_type_list(resolve(schema))


def _nullable_as_type_list(node: Any) -> Any:
    """`anyOf: [{type: T, ...}, {type: null}]` (pydantic's `T | None`) written as `type: [T, "null"]`:
    the same values (keywords such as `minimum`, `properties` or an `anyOf` of property rules hold
    for a null anyway), stated so that fuzzers' negative mutations of the first branch cannot
    produce a null and call it invalid."""
    if isinstance(node, list):
        return [_nullable_as_type_list(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: value if key in ("const", "enum", "default", "examples") else _nullable_as_type_list(value)
            for key, value in node.items()}
    branches = node.get("anyOf")
    if not (isinstance(branches, list) and len(branches) == 2 and branches[1] == {"type": "null"}):
        return node
    value = branches[0]
    typed_branches = any("type" in branch for branch in value.get("anyOf", []))  # those would refuse a null
    if not isinstance(value.get("type"), str) or {"oneOf", "allOf", "not"} & set(value) or typed_branches:
        return node
    merged = {**{k: v for k, v in node.items() if k != "anyOf"}, **value, "type": [value["type"], "null"]}
    if "const" in merged:
        merged["enum"] = [merged.pop("const")]
    if "enum" in merged:
        merged["enum"] = [*merged["enum"], None]
    return merged
