//! JSON-schema-constrained output: a schema compiled to a byte-level pushdown matcher that
//! says, byte by byte, whether the text so far can still become a JSON value valid against
//! the schema. The generator offers it each candidate token's bytes and samples only among
//! the tokens it accepts.
//!
//! Supported: `type` object (`properties`, `required`; properties are produced in the order
//! declared, optional ones may be skipped, no other keys), array (`items`, `minItems`,
//! `maxItems`), string (`minLength`, `maxLength`, counted in characters), number, integer,
//! boolean, null; `enum` and `const` of any JSON values. Annotations (`title`,
//! `description`, `default`, `examples`, `$schema`, `$id`, `$comment`) are ignored, and
//! `additionalProperties` may only be `false`. Anything else is refused with an error naming
//! where it is, rather than silently not enforced.
//!
//! Output is compact JSON: one optional space after `:` and `,`, no other whitespace.

use serde_json::Value;

use crate::error::{Error, Result};

/// Longest integer part of a generated number, in digits.
const MAX_INT_DIGITS: u8 = 15;
/// Longest fraction part of a generated number, in digits (exponents take at most two, so
/// every number fits an f64).
const MAX_FRAC_DIGITS: u8 = 8;

/// A compiled JSON schema, ready to constrain generation.
#[derive(Debug, Clone)]
pub struct JsonSchema {
    nodes: Vec<Node>,
    source: Value,
}

#[derive(Debug, Clone)]
enum Node {
    Object {
        props: Vec<(Vec<u8>, usize)>,
        required: Vec<bool>,
    },
    Array {
        items: usize,
        min: usize,
        max: usize,
    },
    String {
        min: usize,
        max: usize,
    },
    Number {
        integer: bool,
    },
    /// Serialized JSON texts (enum, const, true/false, null).
    Literals(Vec<Vec<u8>>),
}

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
];

impl JsonSchema {
    /// Compiles `schema`; an unsupported keyword or a malformed value is an error naming it.
    pub fn compile(schema: &Value) -> Result<Self> {
        let mut nodes = Vec::new();
        compile_node(schema, "", &mut nodes)?;
        Ok(Self {
            nodes,
            source: schema.clone(),
        })
    }

    /// The schema as given.
    pub fn source(&self) -> &Value {
        &self.source
    }

    fn node(&self, node: usize) -> &Node {
        &self.nodes[node]
    }

    fn literals(&self, node: usize) -> &[Vec<u8>] {
        match &self.nodes[node] {
            Node::Literals(l) => l,
            _ => &[],
        }
    }

    /// A matcher at the start of the output.
    pub fn matcher(&self) -> Matcher<'_> {
        Matcher {
            schema: self,
            stack: vec![Frame::Value {
                node: 0,
                space_ok: false,
            }],
        }
    }
}

fn int_field(obj: &serde_json::Map<String, Value>, key: &str, at: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| Error::schema(&format!("{at}/{key}"), "must be a non-negative integer")),
    }
}

fn check_keys(obj: &serde_json::Map<String, Value>, allowed: &[&str], at: &str) -> Result<()> {
    for key in obj.keys() {
        if ANNOTATIONS.contains(&key.as_str()) || allowed.contains(&key.as_str()) {
            continue;
        }
        return Err(Error::schema(
            &format!("{at}/{key}"),
            format!("keyword `{key}` is not supported here"),
        ));
    }
    Ok(())
}

fn compile_node(schema: &Value, at: &str, nodes: &mut Vec<Node>) -> Result<usize> {
    let obj = schema
        .as_object()
        .ok_or_else(|| Error::schema(at, "a schema must be a JSON object"))?;
    let index = nodes.len();
    nodes.push(Node::Literals(Vec::new())); // placeholder, replaced below
    let literal =
        |v: &Value| -> Result<Vec<u8>> { serde_json::to_vec(v).map_err(|e| Error::schema(at, e)) };
    let node = if let Some(values) = obj.get("enum") {
        check_keys(obj, &["enum", "type"], at)?;
        let values = values
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| Error::schema(&format!("{at}/enum"), "must be a non-empty array"))?;
        Node::Literals(values.iter().map(literal).collect::<Result<_>>()?)
    } else if let Some(value) = obj.get("const") {
        check_keys(obj, &["const", "type"], at)?;
        Node::Literals(vec![literal(value)?])
    } else {
        let ty = match obj.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(_) => {
                return Err(Error::schema(
                    &format!("{at}/type"),
                    "only a single type name is supported",
                ));
            }
            None => return Err(Error::schema(at, "`type`, `enum` or `const` is required")),
        };
        match ty {
            "object" => {
                check_keys(
                    obj,
                    &["type", "properties", "required", "additionalProperties"],
                    at,
                )?;
                match obj.get("additionalProperties") {
                    None | Some(Value::Bool(false)) => {}
                    Some(_) => {
                        return Err(Error::schema(
                            &format!("{at}/additionalProperties"),
                            "only `false` is supported (output has exactly the declared properties)",
                        ));
                    }
                }
                let mut names = Vec::new();
                let mut schemas = Vec::new();
                if let Some(props) = obj.get("properties") {
                    let props = props.as_object().ok_or_else(|| {
                        Error::schema(&format!("{at}/properties"), "must be an object")
                    })?;
                    for (name, sub) in props {
                        if name.is_empty()
                            || name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
                        {
                            return Err(Error::schema(
                                &format!("{at}/properties"),
                                format!(
                                    "property name {name:?} must be non-empty and need no escaping"
                                ),
                            ));
                        }
                        names.push(name.clone());
                        schemas.push(sub);
                    }
                }
                let mut required = vec![false; names.len()];
                if let Some(req) = obj.get("required") {
                    let req = req.as_array().ok_or_else(|| {
                        Error::schema(&format!("{at}/required"), "must be an array of names")
                    })?;
                    for r in req {
                        let pos = r
                            .as_str()
                            .and_then(|r| names.iter().position(|n| n == r))
                            .ok_or_else(|| {
                                Error::schema(
                                    &format!("{at}/required"),
                                    format!("{r} is not a declared property"),
                                )
                            })?;
                        required[pos] = true;
                    }
                }
                let mut props = Vec::with_capacity(names.len());
                for (name, sub) in names.into_iter().zip(schemas) {
                    let child = compile_node(sub, &format!("{at}/properties/{name}"), nodes)?;
                    props.push((format!("\"{name}\"").into_bytes(), child));
                }
                Node::Object { props, required }
            }
            "array" => {
                check_keys(obj, &["type", "items", "minItems", "maxItems"], at)?;
                let items = obj
                    .get("items")
                    .ok_or_else(|| Error::schema(at, "an array needs an `items` schema"))?;
                let min = int_field(obj, "minItems", at)?.unwrap_or(0);
                let max = int_field(obj, "maxItems", at)?.unwrap_or(usize::MAX);
                if min > max {
                    return Err(Error::schema(at, "minItems is greater than maxItems"));
                }
                let items = compile_node(items, &format!("{at}/items"), nodes)?;
                Node::Array { items, min, max }
            }
            "string" => {
                check_keys(obj, &["type", "minLength", "maxLength"], at)?;
                let min = int_field(obj, "minLength", at)?.unwrap_or(0);
                let max = int_field(obj, "maxLength", at)?.unwrap_or(usize::MAX);
                if min > max {
                    return Err(Error::schema(at, "minLength is greater than maxLength"));
                }
                Node::String { min, max }
            }
            "number" | "integer" => {
                check_keys(obj, &["type"], at)?;
                Node::Number {
                    integer: ty == "integer",
                }
            }
            "boolean" => {
                check_keys(obj, &["type"], at)?;
                Node::Literals(vec![b"true".to_vec(), b"false".to_vec()])
            }
            "null" => {
                check_keys(obj, &["type"], at)?;
                Node::Literals(vec![b"null".to_vec()])
            }
            other => {
                return Err(Error::schema(
                    &format!("{at}/type"),
                    format!("unknown type `{other}`"),
                ));
            }
        }
    };
    nodes[index] = node;
    Ok(index)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjStage {
    /// After `{`: a key or `}`.
    Open,
    /// After a key: `:`.
    Colon(usize),
    /// After a value: `,` or `}`.
    Value,
    /// After `,`: an optional space, then a key.
    Comma { space_ok: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrStage {
    Open,
    Item,
    Comma { space_ok: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    Unicode(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int(u8),
    Dot,
    Frac(u8),
    E,
    ESign,
    Exp(u8),
}

impl Num {
    fn accepting(self) -> bool {
        matches!(self, Num::Zero | Num::Int(_) | Num::Frac(_) | Num::Exp(_))
    }

    fn step(self, b: u8, integer: bool) -> Option<Num> {
        let digit = b.is_ascii_digit();
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, _) if digit => Num::Int(1),
            (Num::Int(n), _) if digit && n < MAX_INT_DIGITS => Num::Int(n + 1),
            (Num::Zero | Num::Int(_), b'.') if !integer => Num::Dot,
            (Num::Zero | Num::Int(_) | Num::Frac(_), b'e' | b'E') if !integer => Num::E,
            (Num::Dot, _) if digit => Num::Frac(1),
            (Num::Frac(n), _) if digit && n < MAX_FRAC_DIGITS => Num::Frac(n + 1),
            (Num::E, b'+' | b'-') => Num::ESign,
            (Num::E | Num::ESign, _) if digit => Num::Exp(1),
            (Num::Exp(n), _) if digit && n < 2 => Num::Exp(n + 1),
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
enum Frame {
    Value {
        node: usize,
        space_ok: bool,
    },
    Obj {
        node: usize,
        next: usize,
        stage: ObjStage,
    },
    Key {
        node: usize,
        cands: Vec<usize>,
        pos: usize,
    },
    Arr {
        node: usize,
        count: usize,
        stage: ArrStage,
    },
    Str {
        node: usize,
        chars: usize,
        esc: Esc,
        pending: u8,
    },
    Num {
        integer: bool,
        state: Num,
    },
    Lit {
        node: usize,
        alive: Vec<usize>,
        pos: usize,
    },
}

/// The state of a partially generated value. Cheap to clone (one small stack).
#[derive(Debug, Clone)]
pub struct Matcher<'a> {
    schema: &'a JsonSchema,
    stack: Vec<Frame>,
}

/// A [`Matcher`]'s state without its schema, to keep beside a shared schema between steps.
#[derive(Debug, Clone)]
pub(crate) struct MatcherState(Vec<Frame>);

impl JsonSchema {
    /// A matcher continuing from `state` (taken from a matcher of this schema).
    pub(crate) fn resume(&self, state: MatcherState) -> Matcher<'_> {
        Matcher {
            schema: self,
            stack: state.0,
        }
    }
}

impl Matcher<'_> {
    /// The state, to resume with [`JsonSchema::resume`].
    pub(crate) fn suspend(self) -> MatcherState {
        MatcherState(self.stack)
    }

    /// Feeds every byte of `bytes`; false (and the matcher left in an unspecified state) as
    /// soon as one cannot continue a valid value.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    /// Whether `bytes` could come next, without changing the matcher.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && self.clone().feed_all(bytes)
    }

    /// The value is complete and nothing more can follow.
    pub fn is_done(&self) -> bool {
        self.stack.is_empty()
    }

    /// The output may end here: done, or a top-level number or literal that is complete.
    pub fn can_end(&self) -> bool {
        match self.stack.as_slice() {
            [] => true,
            [Frame::Num { state, .. }] => state.accepting(),
            [Frame::Lit { node, alive, pos }] => alive.iter().any(|&i| {
                self.schema
                    .literals(*node)
                    .get(i)
                    .is_some_and(|l| l.len() == *pos)
            }),
            _ => false,
        }
    }

    /// Keys that may come next in an object whose next declared property is `next`: the
    /// following properties up to and including the first required one.
    fn allowed_keys(props: usize, required: &[bool], next: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, &req) in required.iter().enumerate().take(props).skip(next) {
            out.push(i);
            if req {
                break;
            }
        }
        out
    }

    fn required_left(required: &[bool], next: usize) -> bool {
        required.iter().skip(next).any(|&r| r)
    }

    /// Feeds one byte; false if it cannot continue a valid value.
    pub fn feed(&mut self, b: u8) -> bool {
        let schema = self.schema;
        loop {
            let Some(top) = self.stack.last().cloned() else {
                return false;
            };
            let last = self.stack.len() - 1;
            match top {
                Frame::Value { node, space_ok } => {
                    if b == b' ' && space_ok {
                        self.stack[last] = Frame::Value {
                            node,
                            space_ok: false,
                        };
                        return true;
                    }
                    let frame = match schema.node(node) {
                        Node::Object { .. } if b == b'{' => Frame::Obj {
                            node,
                            next: 0,
                            stage: ObjStage::Open,
                        },
                        Node::Array { .. } if b == b'[' => Frame::Arr {
                            node,
                            count: 0,
                            stage: ArrStage::Open,
                        },
                        Node::String { .. } if b == b'"' => Frame::Str {
                            node,
                            chars: 0,
                            esc: Esc::None,
                            pending: 0,
                        },
                        Node::Number { integer } => {
                            let state = match b {
                                b'-' => Num::Minus,
                                b'0' => Num::Zero,
                                b'1'..=b'9' => Num::Int(1),
                                _ => return false,
                            };
                            Frame::Num {
                                integer: *integer,
                                state,
                            }
                        }
                        Node::Literals(lits) => {
                            let alive: Vec<usize> = (0..lits.len())
                                .filter(|&i| lits[i].first() == Some(&b))
                                .collect();
                            if alive.is_empty() {
                                return false;
                            }
                            self.stack[last] = Frame::Lit {
                                node,
                                alive,
                                pos: 1,
                            };
                            self.settle_literal();
                            return true;
                        }
                        _ => return false,
                    };
                    self.stack[last] = frame;
                    return true;
                }
                Frame::Obj { node, next, stage } => {
                    let Node::Object { props, required } = schema.node(node) else {
                        return false;
                    };
                    let (nprops, required) = (props.len(), required.clone());
                    match (stage, b) {
                        (ObjStage::Comma { space_ok: true }, b' ') => {
                            self.stack[last] = Frame::Obj {
                                node,
                                next,
                                stage: ObjStage::Comma { space_ok: false },
                            };
                            return true;
                        }
                        (ObjStage::Open | ObjStage::Comma { .. }, b'"') => {
                            let cands = Self::allowed_keys(nprops, &required, next);
                            if cands.is_empty() {
                                return false;
                            }
                            self.stack.push(Frame::Key {
                                node,
                                cands,
                                pos: 1,
                            });
                            return true;
                        }
                        (ObjStage::Open | ObjStage::Value, b'}')
                            if !Self::required_left(&required, next) =>
                        {
                            self.stack.pop();
                            return true;
                        }
                        (ObjStage::Value, b',') => {
                            if Self::allowed_keys(nprops, &required, next).is_empty() {
                                return false;
                            }
                            self.stack[last] = Frame::Obj {
                                node,
                                next,
                                stage: ObjStage::Comma { space_ok: true },
                            };
                            return true;
                        }
                        (ObjStage::Colon(p), b':') => {
                            let Node::Object { props, .. } = schema.node(node) else {
                                return false;
                            };
                            let child = props[p].1;
                            self.stack[last] = Frame::Obj {
                                node,
                                next: p + 1,
                                stage: ObjStage::Value,
                            };
                            self.stack.push(Frame::Value {
                                node: child,
                                space_ok: true,
                            });
                            return true;
                        }
                        _ => return false,
                    }
                }
                Frame::Key { node, cands, pos } => {
                    let Node::Object { props, .. } = schema.node(node) else {
                        return false;
                    };
                    let alive: Vec<usize> = cands
                        .into_iter()
                        .filter(|&i| props[i].0.get(pos) == Some(&b))
                        .collect();
                    if alive.is_empty() {
                        return false;
                    }
                    // A key ends with its closing quote: at most one candidate is complete.
                    if let Some(&done) = alive.iter().find(|&&i| props[i].0.len() == pos + 1) {
                        self.stack.pop();
                        let parent = self.stack.len() - 1;
                        if let Frame::Obj { next, .. } = self.stack[parent] {
                            self.stack[parent] = Frame::Obj {
                                node,
                                next,
                                stage: ObjStage::Colon(done),
                            };
                        }
                        return true;
                    }
                    self.stack[last] = Frame::Key {
                        node,
                        cands: alive,
                        pos: pos + 1,
                    };
                    return true;
                }
                Frame::Arr { node, count, stage } => {
                    let Node::Array { items, min, max } = *schema.node(node) else {
                        return false;
                    };
                    match (stage, b) {
                        (ArrStage::Comma { space_ok: true }, b' ') => {
                            self.stack[last] = Frame::Arr {
                                node,
                                count,
                                stage: ArrStage::Comma { space_ok: false },
                            };
                            return true;
                        }
                        (ArrStage::Open | ArrStage::Item, b']') if count >= min => {
                            self.stack.pop();
                            return true;
                        }
                        (ArrStage::Item, b',') if count < max => {
                            self.stack[last] = Frame::Arr {
                                node,
                                count,
                                stage: ArrStage::Comma { space_ok: true },
                            };
                            return true;
                        }
                        (ArrStage::Open | ArrStage::Comma { .. }, _) if count < max => {
                            self.stack[last] = Frame::Arr {
                                node,
                                count: count + 1,
                                stage: ArrStage::Item,
                            };
                            self.stack.push(Frame::Value {
                                node: items,
                                space_ok: false,
                            });
                            // Re-feed `b` as the start of the item.
                            continue;
                        }
                        _ => return false,
                    }
                }
                Frame::Str {
                    node,
                    chars,
                    esc,
                    pending,
                } => {
                    let Node::String { min, max } = *schema.node(node) else {
                        return false;
                    };
                    let next = match esc {
                        Esc::Backslash => match b {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                                Some((chars, Esc::None, 0))
                            }
                            b'u' => Some((chars, Esc::Unicode(4), 0)),
                            _ => None,
                        },
                        Esc::Unicode(n) if b.is_ascii_hexdigit() => Some((
                            chars,
                            if n == 1 {
                                Esc::None
                            } else {
                                Esc::Unicode(n - 1)
                            },
                            0,
                        )),
                        Esc::Unicode(_) => None,
                        Esc::None if pending > 0 => {
                            (b & 0xC0 == 0x80).then_some((chars, Esc::None, pending - 1))
                        }
                        Esc::None => match b {
                            b'"' if chars >= min => {
                                self.stack.pop();
                                return true;
                            }
                            b'"' => None,
                            _ if chars >= max => None,
                            b'\\' => Some((chars + 1, Esc::Backslash, 0)),
                            0x00..=0x1F | 0x7F => None,
                            0x20..=0x7E => Some((chars + 1, Esc::None, 0)),
                            0xC2..=0xDF => Some((chars + 1, Esc::None, 1)),
                            0xE0..=0xEF => Some((chars + 1, Esc::None, 2)),
                            0xF0..=0xF4 => Some((chars + 1, Esc::None, 3)),
                            _ => None,
                        },
                    };
                    let Some((chars, esc, pending)) = next else {
                        return false;
                    };
                    self.stack[last] = Frame::Str {
                        node,
                        chars,
                        esc,
                        pending,
                    };
                    return true;
                }
                Frame::Num { integer, state } => {
                    if let Some(state) = state.step(b, integer) {
                        self.stack[last] = Frame::Num { integer, state };
                        return true;
                    }
                    if !state.accepting() {
                        return false;
                    }
                    self.stack.pop();
                    continue; // the byte belongs to the parent
                }
                Frame::Lit { node, alive, pos } => {
                    let lits = schema.literals(node);
                    let next: Vec<usize> = alive
                        .iter()
                        .copied()
                        .filter(|&i| lits[i].get(pos) == Some(&b))
                        .collect();
                    if next.is_empty() {
                        let complete = alive.iter().any(|&i| lits[i].len() == pos);
                        if !complete {
                            return false;
                        }
                        self.stack.pop();
                        continue;
                    }
                    self.stack[last] = Frame::Lit {
                        node,
                        alive: next,
                        pos: pos + 1,
                    };
                    self.settle_literal();
                    return true;
                }
            }
        }
    }

    /// Pops a literal frame once a literal is complete and no other can extend it.
    fn settle_literal(&mut self) {
        if let Some(Frame::Lit { node, alive, pos }) = self.stack.last() {
            let lits = self.schema.literals(*node);
            let complete = alive.iter().any(|&i| lits[i].len() == *pos);
            let longer = alive.iter().any(|&i| lits[i].len() > *pos);
            if complete && !longer {
                self.stack.pop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepts(schema: &Value, text: &str) -> bool {
        let s = JsonSchema::compile(schema).unwrap();
        let mut m = s.matcher();
        m.feed_all(text.as_bytes()) && m.can_end()
    }

    #[test]
    fn objects_follow_declared_properties() {
        let s = json!({"type":"object","properties":{
            "name":{"type":"string","maxLength":5},
            "age":{"type":"integer"},
            "tags":{"type":"array","items":{"enum":["a","bc"]},"maxItems":2}},
            "required":["name","tags"]});
        assert!(accepts(&s, r#"{"name":"Ann","age":3,"tags":["a","bc"]}"#));
        assert!(accepts(&s, r#"{"name": "Ann", "tags": []}"#));
        assert!(!accepts(&s, r#"{"age":3,"name":"Ann","tags":[]}"#), "order");
        assert!(!accepts(&s, r#"{"name":"Ann"}"#), "required tags");
        assert!(!accepts(&s, r#"{"name":"Annabel","tags":[]}"#), "maxLength");
        assert!(
            !accepts(&s, r#"{"name":"A","tags":["a","a","a"]}"#),
            "maxItems"
        );
        assert!(
            !accepts(&s, r#"{"name":"A","age":1.5,"tags":[]}"#),
            "integer"
        );
        assert!(!accepts(&s, r#"{"name":"A","tags":["b"]}"#), "enum");
        assert!(!accepts(&s, r#"{"name":"A","tags":[],"x":1}"#), "extra key");
    }

    #[test]
    fn numbers_and_literals_end_where_they_must() {
        let n = json!({"type":"number"});
        for ok in ["0", "-1.5", "12e3", "3.25E-2"] {
            assert!(accepts(&n, ok), "{ok}");
        }
        for bad in ["01", "-", "1.", ".5", "1e", "+1"] {
            assert!(!accepts(&n, bad), "{bad}");
        }
        let e = json!({"enum":[1, 12, "x", null, true]});
        for ok in ["1", "12", "\"x\"", "null", "true"] {
            assert!(accepts(&e, ok), "{ok}");
        }
        assert!(!accepts(&e, "123"));
        let s = JsonSchema::compile(&json!({"enum":["a","b"]})).unwrap();
        let mut m = s.matcher();
        assert!(m.feed_all(b"\"a\""));
        assert!(m.is_done(), "a quoted literal ends at its quote");
    }

    #[test]
    fn strings_escape_and_stay_utf8() {
        let s = json!({"type":"string"});
        assert!(accepts(&s, r#""a\"b\u00e9\n""#));
        assert!(accepts(&s, "\"h\u{e9}llo \u{1F600}\""));
        assert!(!accepts(&s, "\"a\nb\""), "raw newline");
        let sch = JsonSchema::compile(&s).unwrap();
        let mut m = sch.matcher();
        assert!(m.feed_all(&[b'"', 0xC3]));
        assert!(
            !m.clone().feed(b'"'),
            "no quote inside a multi-byte character"
        );
    }

    #[test]
    fn unsupported_keywords_are_named() {
        let err = JsonSchema::compile(&json!({"type":"object","properties":{
            "a":{"type":"string","pattern":"^x"}}}))
        .unwrap_err()
        .to_string();
        assert!(err.contains("/properties/a/pattern"), "{err}");
        assert!(JsonSchema::compile(&json!({"type":["string","null"]})).is_err());
        assert!(JsonSchema::compile(&json!({"type":"array"})).is_err());
        assert!(JsonSchema::compile(&json!({"type":"object","required":["x"]})).is_err());
    }

    proptest::proptest! {
        /// Whatever a matcher accepts and calls complete parses as JSON.
        #[test]
        fn accepted_output_parses(bytes in proptest::collection::vec(proptest::sample::select(
            b"{}[],:\" 0123456789-.eaAnmetruflsx\\".to_vec()), 0..40)) {
            let s = JsonSchema::compile(&json!({"type":"object","properties":{
                "a":{"type":"array","items":{"type":"number"}},
                "n":{"type":"string"}}})).unwrap();
            let mut m = s.matcher();
            if m.feed_all(&bytes) && m.is_done() {
                proptest::prop_assert!(serde_json::from_slice::<Value>(&bytes).is_ok());
            }
        }
    }
}
