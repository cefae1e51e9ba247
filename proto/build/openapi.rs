//! `openapi.json`: the OpenAPI 3 document of the REST mirror, from the same descriptors as its
//! routes and its JSON (proto3 JSON as pbjson writes it: lowerCamelCase names, 64-bit integers
//! as strings, enums by name, every field present in answers).

use serde_json::{Map, Value, json};

use super::{
    descriptors::{Api, Error, Field, Kind},
    rest::template,
};

/// The statuses an error answer can have (`ErrorResponse` body), by when they apply.
const ERRORS: &[(&str, &str)] = &[
    (
        "400",
        "Bad input: the message names the field (nothing changed).",
    ),
    (
        "401",
        "No token, or a malformed, unknown, expired or revoked one.",
    ),
    (
        "403",
        "The token's scope (or its one user) does not allow this call.",
    ),
    ("404", "What the call names does not exist."),
    (
        "409",
        "The call conflicts with the current state (exists already, precondition, exhausted pool).",
    ),
    (
        "429",
        "Too many calls or failed authentications: retry after the `Retry-After` seconds.",
    ),
    (
        "500",
        "The agent failed (a bug or a failing disk: the cause is in its log).",
    ),
    (
        "503",
        "The agent is shutting down or a component it needs is unavailable.",
    ),
];
const TOO_LARGE: (&str, &str) = ("413", "The body is larger than the agent accepts.");

/// A component name: the message's name within the package (`Foo`, `Foo.Bar`).
fn component(full: &str) -> String {
    full.strip_prefix("capybara.v1.").unwrap_or(full).to_owned()
}

fn reference(full: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{}", component(full)) })
}

fn scalar(api: &Api, kind: &Kind) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 => json!({ "type": "integer", "format": "int32" }),
        Kind::UInt32 => {
            json!({ "type": "integer", "format": "int64", "minimum": 0, "maximum": 4_294_967_295_u64 })
        }
        // 64-bit integers are strings in proto3 JSON (JavaScript's numbers hold 53 bits);
        // numbers are accepted too.
        Kind::Int64 => json!({ "oneOf": [
            { "type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$" },
            { "type": "integer", "format": "int64" },
        ] }),
        Kind::UInt64 => json!({ "oneOf": [
            { "type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$" },
            { "type": "integer", "minimum": 0 },
        ] }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte" }),
        Kind::Enum(e) | Kind::Message(e) => match api.messages.get(e) {
            Some(m) if m.map_entry => {
                let value = m.fields.iter().find(|f| f.name == "value");
                json!({
                    "type": "object",
                    "additionalProperties": value.map_or(json!({}), |v| scalar(api, &v.kind)),
                })
            }
            _ => reference(e),
        },
    }
}

fn field_schema(api: &Api, f: &Field) -> Value {
    let is_map =
        matches!(&f.kind, Kind::Message(m) if api.messages.get(m).is_some_and(|m| m.map_entry));
    let mut s = if f.repeated && !is_map {
        json!({ "type": "array", "items": scalar(api, &f.kind) })
    } else {
        scalar(api, &f.kind)
    };
    if f.optional && !f.repeated {
        // Absent in a request, `null` in an answer when unset.
        s = json!({ "allOf": [s], "nullable": true });
    }
    if let (false, Value::Object(o)) = (f.comment.is_empty(), &mut s) {
        o.insert("description".into(), f.comment.clone().into());
    }
    s
}

fn error_responses(body: bool) -> Map<String, Value> {
    let mut r = Map::new();
    for (code, what) in ERRORS.iter().chain(body.then_some(&TOO_LARGE)) {
        r.insert(
            (*code).into(),
            json!({
                "description": what,
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorResponse" } } },
            }),
        );
    }
    r
}

pub fn generate(api: &Api, version: &str) -> Result<String, Error> {
    let mut paths: Map<String, Value> = Map::new();
    let mut tags = Vec::new();
    for s in &api.services {
        tags.push(json!({ "name": s.name, "description": s.comment }));
        for m in &s.methods {
            for (binding, rule) in m.http.iter().enumerate() {
                let t = template(&rule.path)?;
                let input = &api.messages[&m.input];
                let mut params = Vec::new();
                for (_, f) in &t.fields {
                    params.push(json!({
                        "name": f, "in": "path", "required": true,
                        "schema": { "type": "string", "minLength": 1 },
                    }));
                }
                let body = !rule.body.is_empty();
                if !body {
                    for f in &input.fields {
                        if t.fields.iter().any(|(_, b)| b == &f.name) {
                            continue;
                        }
                        let mut schema = if f.repeated {
                            json!({ "type": "array", "items": scalar(api, &f.kind) })
                        } else {
                            scalar(api, &f.kind)
                        };
                        if let Kind::Enum(e) = &f.kind {
                            // Inline: a query value is the enum's name.
                            let names: Vec<_> =
                                api.enums[e].values.iter().map(|v| v.0.clone()).collect();
                            let one = json!({ "type": "string", "enum": names });
                            schema = if f.repeated {
                                json!({ "type": "array", "items": one })
                            } else {
                                one
                            };
                        }
                        params.push(json!({
                            "name": f.json_name, "in": "query", "required": false,
                            "description": f.comment, "schema": schema,
                        }));
                    }
                }
                let mut responses = Map::new();
                let (ctype, what) = if m.server_streaming {
                    (
                        "application/x-ndjson",
                        "One JSON message per line, as the agent streams them.",
                    )
                } else {
                    ("application/json", "OK")
                };
                responses.insert(
                "200".into(),
                json!({ "description": what, "content": { ctype: { "schema": reference(&m.output) } } }),
            );
                responses.extend(error_responses(body));
                let summary = m
                    .comment
                    .split(". ")
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches('.');
                let mut op = json!({
                    "operationId": if binding == 0 {
                        format!("{}_{}", s.name, m.name)
                    } else {
                        format!("{}_{}_{}", s.name, m.name, binding + 1)
                    },
                    "tags": [s.name],
                    "summary": if summary.is_empty() { m.name.clone() } else { summary.to_owned() },
                    "description": format!("{}\n\ngRPC: `capybara.v1.{}/{}`.", m.comment, s.name, m.name).trim_start().to_owned(),
                    "parameters": params,
                    "responses": responses,
                });
                if body {
                    let content = if m.client_streaming {
                        // The messages as one JSON array (one JSON message a line works too).
                        json!({ "application/json": { "schema": {
                        "type": "array",
                        "items": reference(&m.input),
                        "description": "The stream's messages in order (or the body as one JSON message a line, application/x-ndjson).",
                    } } })
                    } else {
                        json!({ "application/json": { "schema": reference(&m.input) } })
                    };
                    op["requestBody"] = json!({ "required": true, "content": content });
                }
                let item = paths.entry(rule.path.clone()).or_insert_with(|| json!({}));
                if item.get(rule.verb).is_some() {
                    return Err(
                        format!("{} {}: two RPCs on one route", rule.verb, rule.path).into(),
                    );
                }
                item[rule.verb] = op;
            }
        }
    }
    paths.insert(
        "/api/v1/openapi.json".into(),
        json!({ "get": {
            "operationId": "OpenApi",
            "summary": "This document",
            "security": [],
            "responses": { "200": { "description": "OpenAPI 3", "content": { "application/json": { "schema": { "type": "object" } } } } },
        } }),
    );
    let mut schemas = Map::new();
    for (name, m) in &api.messages {
        if m.map_entry {
            continue;
        }
        let props: Map<String, Value> = m
            .fields
            .iter()
            .map(|f| (f.json_name.clone(), field_schema(api, f)))
            .collect();
        schemas.insert(
            component(name),
            json!({ "type": "object", "description": m.comment, "properties": props, "additionalProperties": false }),
        );
    }
    for (name, e) in &api.enums {
        let doc: Vec<String> = e
            .values
            .iter()
            .map(|(v, c)| {
                if c.is_empty() {
                    format!("- `{v}`")
                } else {
                    format!("- `{v}`: {c}")
                }
            })
            .collect();
        schemas.insert(
            component(name),
            json!({
                "type": "string",
                "enum": e.values.iter().map(|v| v.0.clone()).collect::<Vec<_>>(),
                "description": format!("{}\n\n{}", e.comment, doc.join("\n")).trim_start().to_owned(),
            }),
        );
    }
    schemas.insert(
        "ErrorResponse".into(),
        json!({
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": { "type": "integer", "description": "The HTTP status." },
                "status": { "type": "string", "description": "The gRPC status name (INVALID_ARGUMENT, NOT_FOUND, …)." },
                "message": { "type": "string", "description": "What went wrong; for bad input the field comes first (`name: …`)." },
                "field": { "type": "string", "description": "The field at fault, for bad input." },
            },
        }),
    );
    let doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Capybara API",
            "version": version,
            "description": "The REST mirror of Capybara's gRPC API: every RPC has one route here, \
                generated with this document from the same .proto files. Bodies are proto3 JSON. \
                Every call needs `Authorization: Bearer <token>` (`capybara api token create`); \
                scopes are the gRPC API's.",
        },
        "tags": tags,
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas,
        },
    });
    Ok(serde_json::to_string_pretty(&doc)?)
}
