//! The JSON Schema of runbooks, built from the action catalog (`ferry schema`).

use crate::catalog::{ACTIONS, Format, Rule, Ty};
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

fn template() -> Value {
    json!({"type": "string", "pattern": "\\$\\{\\{.*\\}\\}"})
}

/// A string shaped by `format`, or a template.
fn format_schema(format: Format) -> Value {
    let shaped = match format {
        Format::Free => return json!({}),
        Format::OneOf(words) => {
            let mut all: Vec<String> = Vec::new();
            for w in words {
                for v in [
                    w.to_string(),
                    w.to_ascii_lowercase(),
                    w.to_ascii_uppercase(),
                ] {
                    if !all.contains(&v) {
                        all.push(v);
                    }
                }
            }
            json!({"enum": all})
        }
        Format::Listener => json!({"type": "string", "pattern": "^(http|tcp|udp):[0-9]{1,5}$"}),
        Format::Probe => {
            json!({"type": "string", "pattern": "^(https?:[0-9]{1,5}(/\\S*)?|tcp:[0-9]{1,5})$"})
        }
        Format::Time => json!({
            "type": "string",
            "pattern": "^(latest|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))$"
        }),
        Format::Keys(keys) => {
            let mut props = Map::new();
            for k in keys {
                let mut s = match format_schema(k.format) {
                    v if v == json!({}) => json!({"type": ["string", "number", "boolean"]}),
                    v => v,
                };
                if let Some(o) = s.as_object_mut() {
                    o.insert("description".into(), Value::String(k.doc.into()));
                }
                props.insert(k.name.into(), s);
            }
            let required: Vec<&str> = keys.iter().filter(|k| k.required).map(|k| k.name).collect();
            return json!({"anyOf": [
                {"type": "object", "properties": props, "required": required, "additionalProperties": false},
                template()
            ]});
        }
    };
    json!({"anyOf": [shaped, template()]})
}

/// The schema of one input: its type, narrowed by its format.
fn input_schema(ty: Ty, format: Format) -> Value {
    match (ty, format) {
        (_, Format::Free) => ty_schema(ty),
        (Ty::List, f) => {
            json!({"anyOf": [{"type": "array", "items": format_schema(f)}, template()]})
        }
        (_, f) => format_schema(f),
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
            let mut s = input_schema(i.ty, i.format);
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
        let mut depends = Map::new();
        for rule in a.rules {
            match *rule {
                Rule::ExactlyOne(names) => {
                    with["oneOf"] = names.iter().map(|n| json!({"required": [n]})).collect();
                }
                Rule::Requires(x, y) => {
                    depends.insert(x.into(), json!([y]));
                }
            }
        }
        if !depends.is_empty() {
            with["dependentRequired"] = Value::Object(depends);
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
                "properties": {"rto": duration, "rpo": duration, "downtime": duration}
            },
            "downtime": {
                "type": "object",
                "description": "What the report measures as the outage: from the first start of the `from` steps (those that stop the service) to the last end of the `to` steps (the checks that prove it back).",
                "required": ["from", "to"],
                "additionalProperties": false,
                "properties": {
                    "from": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
                    "to": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
                }
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
