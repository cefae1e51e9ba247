//! The API as the build script sees it: services, methods with their `google.api.http` rules,
//! messages, fields and enums with their comments, decoded from protoc's descriptor set.

use std::collections::BTreeMap;

use prost::Message as _;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};

pub type Error = Box<dyn std::error::Error>;

/// One package's API.
pub struct Api {
    pub services: Vec<Service>,
    /// By full name without the leading dot (`capybara.v1.User`).
    pub messages: BTreeMap<String, Message>,
    pub enums: BTreeMap<String, Enum>,
}

pub struct Service {
    pub name: String,
    pub comment: String,
    pub methods: Vec<Method>,
}

pub struct Method {
    pub name: String,
    pub comment: String,
    /// Full names without the leading dot.
    pub input: String,
    pub output: String,
    pub client_streaming: bool,
    pub server_streaming: bool,
    /// The rule's route, then its `additional_bindings`; empty: no rule.
    pub http: Vec<HttpRule>,
}

/// A method's `google.api.http` rule.
pub struct HttpRule {
    /// `get`, `put`, `post`, `delete` or `patch`.
    pub verb: &'static str,
    pub path: String,
    /// `*` or empty.
    pub body: String,
}

pub struct Message {
    pub comment: String,
    pub fields: Vec<Field>,
    /// The entry type of a `map<K, V>` field.
    pub map_entry: bool,
}

pub struct Field {
    pub name: String,
    pub json_name: String,
    pub comment: String,
    pub kind: Kind,
    pub repeated: bool,
    /// proto3 `optional` (or a message: absent is not the default value).
    pub optional: bool,
}

#[derive(Clone, PartialEq)]
pub enum Kind {
    Double,
    Float,
    Int32,
    Int64,
    UInt32,
    UInt64,
    Bool,
    String,
    Bytes,
    /// Full name without the leading dot.
    Enum(String),
    Message(String),
}

pub struct Enum {
    pub comment: String,
    /// Names and comments, in declaration order.
    pub values: Vec<(String, String)>,
}

impl Api {
    /// The services and types of `package` in the encoded `FileDescriptorSet` `bytes`.
    pub fn decode(bytes: &[u8], package: &str) -> Result<Api, Error> {
        let set = FileDescriptorSet::decode(bytes)?;
        let rules = LiteSet::decode(bytes)?;
        let mut api = Api {
            services: Vec::new(),
            messages: BTreeMap::new(),
            enums: BTreeMap::new(),
        };
        for (file, lite) in set.file.iter().zip(&rules.file) {
            if file.package() != package {
                continue;
            }
            let comments: BTreeMap<Vec<i32>, String> = file
                .source_code_info
                .iter()
                .flat_map(|i| &i.location)
                .filter_map(|l| {
                    let c = l.leading_comments.as_deref()?;
                    Some((l.path.clone(), clean_comment(c)))
                })
                .collect();
            let comment = |path: &[i32]| comments.get(path).cloned().unwrap_or_default();
            for (i, m) in file.message_type.iter().enumerate() {
                add_message(&mut api, package, m, &[4, i as i32], &comment);
            }
            for (i, e) in file.enum_type.iter().enumerate() {
                add_enum(&mut api, package, e, &[5, i as i32], &comment);
            }
            for (si, (s, ls)) in file.service.iter().zip(&lite.service).enumerate() {
                let mut service = Service {
                    name: s.name().to_owned(),
                    comment: comment(&[6, si as i32]),
                    methods: Vec::new(),
                };
                for (mi, (m, lm)) in s.method.iter().zip(&ls.method).enumerate() {
                    let http = lm
                        .options
                        .as_ref()
                        .and_then(|o| o.http.as_ref())
                        .map(LiteHttpRule::rules)
                        .transpose()
                        .map_err(|e| format!("{}.{}: {e}", s.name(), m.name()))?
                        .unwrap_or_default();
                    service.methods.push(Method {
                        name: m.name().to_owned(),
                        comment: comment(&[6, si as i32, 2, mi as i32]),
                        input: m.input_type().trim_start_matches('.').to_owned(),
                        output: m.output_type().trim_start_matches('.').to_owned(),
                        client_streaming: m.client_streaming(),
                        server_streaming: m.server_streaming(),
                        http,
                    });
                }
                api.services.push(service);
            }
        }
        Ok(api)
    }
}

fn add_message(
    api: &mut Api,
    scope: &str,
    m: &DescriptorProto,
    path: &[i32],
    comment: &dyn Fn(&[i32]) -> String,
) {
    let name = format!("{scope}.{}", m.name());
    let fields = m
        .field
        .iter()
        .enumerate()
        .map(|(i, f)| field(f, &comment(&[path, &[2, i as i32]].concat())))
        .collect();
    for (i, n) in m.nested_type.iter().enumerate() {
        add_message(api, &name, n, &[path, &[3, i as i32]].concat(), comment);
    }
    for (i, e) in m.enum_type.iter().enumerate() {
        add_enum(api, &name, e, &[path, &[4, i as i32]].concat(), comment);
    }
    api.messages.insert(
        name,
        Message {
            comment: comment(path),
            fields,
            map_entry: m.options.as_ref().is_some_and(|o| o.map_entry()),
        },
    );
}

fn add_enum(
    api: &mut Api,
    scope: &str,
    e: &EnumDescriptorProto,
    path: &[i32],
    comment: &dyn Fn(&[i32]) -> String,
) {
    api.enums.insert(
        format!("{scope}.{}", e.name()),
        Enum {
            comment: comment(path),
            values: e
                .value
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        v.name().to_owned(),
                        comment(&[path, &[2, i as i32]].concat()),
                    )
                })
                .collect(),
        },
    );
}

fn field(f: &FieldDescriptorProto, comment: &str) -> Field {
    let type_name = || f.type_name().trim_start_matches('.').to_owned();
    let kind = match f.r#type() {
        Type::Double => Kind::Double,
        Type::Float => Kind::Float,
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => Kind::Int32,
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => Kind::Int64,
        Type::Uint32 | Type::Fixed32 => Kind::UInt32,
        Type::Uint64 | Type::Fixed64 => Kind::UInt64,
        Type::Bool => Kind::Bool,
        Type::String => Kind::String,
        Type::Bytes => Kind::Bytes,
        Type::Enum => Kind::Enum(type_name()),
        Type::Message | Type::Group => Kind::Message(type_name()),
    };
    Field {
        name: f.name().to_owned(),
        json_name: f.json_name().to_owned(),
        comment: comment.to_owned(),
        optional: f.proto3_optional() || matches!(kind, Kind::Message(_)),
        kind,
        repeated: f.label() == Label::Repeated,
    }
}

/// A comment as one paragraph per blank-line-separated block.
fn clean_comment(c: &str) -> String {
    c.split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

// What prost-types' `MethodOptions` drops (an extension field): the descriptor set decoded a
// second time with only the path to each method's `google.api.http` rule.

#[derive(Clone, PartialEq, prost::Message)]
struct LiteSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<LiteFile>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteFile {
    #[prost(message, repeated, tag = "6")]
    service: Vec<LiteService>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteService {
    #[prost(message, repeated, tag = "2")]
    method: Vec<LiteMethod>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteMethod {
    #[prost(message, optional, tag = "4")]
    options: Option<LiteOptions>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteOptions {
    /// `google.api.http`.
    #[prost(message, optional, tag = "72295728")]
    http: Option<LiteHttpRule>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteHttpRule {
    #[prost(string, optional, tag = "2")]
    get: Option<String>,
    #[prost(string, optional, tag = "3")]
    put: Option<String>,
    #[prost(string, optional, tag = "4")]
    post: Option<String>,
    #[prost(string, optional, tag = "5")]
    delete: Option<String>,
    #[prost(string, optional, tag = "6")]
    patch: Option<String>,
    #[prost(string, optional, tag = "7")]
    body: Option<String>,
    #[prost(message, repeated, tag = "11")]
    additional_bindings: Vec<LiteHttpRule>,
}

impl LiteHttpRule {
    /// This rule's route, then its additional bindings'.
    fn rules(&self) -> Result<Vec<HttpRule>, Error> {
        let mut all = vec![self.rule()?];
        for b in &self.additional_bindings {
            if !b.additional_bindings.is_empty() {
                return Err("additional_bindings may not nest".into());
            }
            all.push(b.rule()?);
        }
        Ok(all)
    }

    fn rule(&self) -> Result<HttpRule, Error> {
        let mut set = [
            ("get", &self.get),
            ("put", &self.put),
            ("post", &self.post),
            ("delete", &self.delete),
            ("patch", &self.patch),
        ]
        .into_iter()
        .filter_map(|(verb, path)| Some((verb, path.clone()?)));
        let (verb, path) = set.next().ok_or("the http rule has no method")?;
        if set.next().is_some() {
            return Err("the http rule has more than one method".into());
        }
        let body = self.body.clone().unwrap_or_default();
        if !body.is_empty() && body != "*" {
            return Err(format!("body {body:?}: only \"*\" or none is supported").into());
        }
        Ok(HttpRule { verb, path, body })
    }
}
