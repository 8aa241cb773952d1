//! The JSON Schema of runbooks, built from the action catalog (`ferry schema`).

use crate::catalog::{ACTIONS, Ty};
use serde_json::{Map, Value, json};

fn ty_schema(ty: Ty) -> Value {
    let template = json!({"type": "string", "pattern": "\\$\\{\\{.*\\}\\}"});
    let base = match ty {
        Ty::String => json!({"type": ["string", "number", "boolean"]}),
        Ty::Integer => json!({"type": "integer"}),
        Ty::Bool => json!({"type": "boolean"}),
        Ty::Duration => {
            json!({"type": ["string", "number"], "pattern": "^[0-9.]+(ms|s|m|min|h|d)?$"})
        }
        Ty::List => json!({"type": "array"}),
        Ty::Map => json!({"type": "object"}),
        Ty::Any => json!({}),
    };
    if ty == Ty::Any {
        base
    } else {
        json!({"anyOf": [base, template]})
    }
}

/// The schema, for editors (`# yaml-language-server: $schema=...`).
pub fn schema() -> Value {
    let duration =
        json!({"type": ["string", "number"], "description": "500ms, 30s, 5m, 2h or seconds"});
    let mut per_action = Vec::new();
    for a in ACTIONS {
        let mut props = Map::new();
        for i in a.inputs {
            let mut s = ty_schema(i.ty);
            if let Some(o) = s.as_object_mut() {
                o.insert("description".into(), Value::String(i.doc.into()));
            }
            props.insert(i.name.into(), s);
        }
        let required: Vec<&str> = a
            .inputs
            .iter()
            .filter(|i| i.required)
            .map(|i| i.name)
            .collect();
        let mut with =
            json!({"type": "object", "properties": props, "additionalProperties": false});
        if !required.is_empty() {
            with["required"] = json!(required);
        }
        let mut then = json!({"properties": {"with": with}});
        if !required.is_empty() {
            then["required"] = json!(["with"]);
        }
        per_action.push(json!({
            "if": {"properties": {"uses": {"const": a.name}}, "required": ["uses"]},
            "then": then,
        }));
    }
    let names: Vec<&str> = ACTIONS.iter().map(|a| a.name).collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://ferry.invalid/schema/runbook-v1.json",
        "title": "Ferry runbook",
        "type": "object",
        "required": ["name", "steps"],
        "additionalProperties": false,
        "properties": {
            "version": {"const": 1},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "on_failure": {"enum": ["rollback", "stop"]},
            "secrets": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}, "description": "environment variables of the orchestrator the steps may read (check.sql password_env); redacted from stored outputs"},
            "params": {
                "type": "object",
                "additionalProperties": {
                    "anyOf": [
                        {"type": ["string", "number", "boolean", "array"]},
                        {
                            "type": "object",
                            "additionalProperties": false,
                            "properties": {
                                "type": {"enum": ["string", "integer", "boolean", "duration", "list", "point"]},
                                "default": {},
                                "description": {"type": "string"}
                            }
                        }
                    ]
                }
            },
            "objectives": {
                "type": "object",
                "additionalProperties": false,
                "properties": {"rto": duration, "rpo": duration}
            },
            "targets": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "description": "A place to rebuild in. Keys besides `type` and `parallelism` are the target type's settings (e.g. `region`, `mapping`).",
                    "properties": {
                        "type": {"type": "string", "examples": ["local", "aws", "libvirt"]},
                        "parallelism": {"type": "integer", "minimum": 1}
                    }
                }
            },
            "steps": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["id", "uses"],
                    "additionalProperties": false,
                    "properties": {
                        "id": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"},
                        "name": {"type": "string"},
                        "uses": {"enum": names},
                        "target": {"type": "string"},
                        "with": {"type": "object"},
                        "needs": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                        "if": {"type": ["string", "boolean"]},
                        "for_each": {"anyOf": [{"type": "array"}, {"type": "string"}]},
                        "retry": {"anyOf": [
                            {"type": "integer", "minimum": 1, "maximum": 100},
                            {
                                "type": "object",
                                "additionalProperties": false,
                                "properties": {
                                    "attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                                    "backoff": duration,
                                    "max_backoff": duration,
                                    "on": {"anyOf": [
                                        {"enum": ["transient", "timeout", "permanent", "any"]},
                                        {"type": "array", "items": {"enum": ["transient", "timeout", "permanent", "any"]}}
                                    ]}
                                }
                            }
                        ]},
                        "timeout": duration,
                        "undo": {
                            "type": "object",
                            "additionalProperties": false,
                            "required": ["uses"],
                            "properties": {
                                "uses": {"enum": ["command.run", "instance.stop", "noop"]},
                                "with": {"type": "object"}
                            }
                        }
                    },
                    "allOf": per_action
                }
            }
        }
    })
}

/// The JSON Schema of one stored event (`docs/event-log.schema.json`): the
/// event log is a declared format that every run stores and every later
/// Ferry must read. Derived from the types that write it.
pub fn event_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(crate::machine::Event)).unwrap_or(Value::Null)
}
