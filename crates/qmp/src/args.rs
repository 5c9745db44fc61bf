//! Typed access to command arguments with QEMU's error texts.
//!
//! QEMU checks a command's arguments member by member in schema order and
//! only then complains about members it does not know. To produce the same
//! first error as QEMU, read the members in the order of the QAPI schema and
//! call [`Args::reject_unexpected`] last:
//!
//! ```
//! use qmp::{ArgsExt, QmpError};
//! use serde_json::{json, Map, Value};
//!
//! fn bitmap_add(args: &Map<String, Value>) -> Result<Value, QmpError> {
//!     let node = args.req_str("node")?;
//!     let name = args.req_str("name")?;
//!     let granularity = args.opt_u32("granularity")?;
//!     let persistent = args.opt_bool("persistent")?.unwrap_or(false);
//!     args.reject_unexpected(&["node", "name", "granularity", "persistent"])?;
//!     # let _ = (node, name, granularity, persistent);
//!     Ok(json!({}))
//! }
//! let args = json!({"node": "disk0", "name": 7});
//! let err = bitmap_add(args.as_object().unwrap()).unwrap_err();
//! assert_eq!(err.desc, "Invalid parameter type for 'name', expected: string");
//! ```
//!
//! As in QEMU, `null` is not "absent": an optional member given as `null`
//! is a type error. Nested objects and list elements are named the way QEMU
//! names them in errors (`actions[0].data.node`).

use serde_json::{Map, Value};

use crate::QmpError;

/// A view of an arguments object (or a nested object) that knows its path
/// for error messages.
#[derive(Debug, Clone)]
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

/// A list member of the arguments.
#[derive(Debug, Clone)]
pub struct ArgList<'a> {
    items: &'a [Value],
    path: String,
}

/// One element of an [`ArgList`].
#[derive(Debug, Clone)]
pub struct ArgItem<'a> {
    value: &'a Value,
    path: String,
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn as_str<'a>(v: &'a Value, path: &str) -> Result<&'a str, QmpError> {
    v.as_str()
        .ok_or_else(|| QmpError::invalid_parameter_type(path, "string"))
}

fn as_bool(v: &Value, path: &str) -> Result<bool, QmpError> {
    v.as_bool()
        .ok_or_else(|| QmpError::invalid_parameter_type(path, "boolean"))
}

/// QEMU's `uint64` visitor: any integer, negative ones wrapped to 64 bits
/// ("for backward compatibility"); a non-integer is `expects uint64`.
fn as_u64(v: &Value, path: &str) -> Result<u64, QmpError> {
    v.as_u64()
        .or_else(|| v.as_i64().map(|i| i as u64))
        .ok_or_else(|| QmpError::invalid_parameter_value(path, "uint64"))
}

/// QEMU's `uint32` visitor: the `uint64` one plus a range check.
fn as_u32(v: &Value, path: &str) -> Result<u32, QmpError> {
    let u = as_u64(v, path)?;
    u32::try_from(u).map_err(|_| QmpError::invalid_parameter_value(path, "uint32_t"))
}

/// QEMU's `int` (int64) visitor.
fn as_i64(v: &Value, path: &str) -> Result<i64, QmpError> {
    v.as_i64()
        .ok_or_else(|| QmpError::invalid_parameter_value(path, "integer"))
}

/// QEMU's `number` visitor: any number.
fn as_f64(v: &Value, path: &str) -> Result<f64, QmpError> {
    v.as_f64()
        .ok_or_else(|| QmpError::invalid_parameter_type(path, "number"))
}

fn as_array<'a>(v: &'a Value, path: String) -> Result<ArgList<'a>, QmpError> {
    match v {
        Value::Array(items) => Ok(ArgList { items, path }),
        _ => Err(QmpError::invalid_parameter_type(&path, "array")),
    }
}

fn as_object<'a>(v: &'a Value, path: String) -> Result<Args<'a>, QmpError> {
    match v {
        Value::Object(map) => Ok(Args { map, path }),
        _ => Err(QmpError::invalid_parameter_type(&path, "object")),
    }
}

fn as_enum<'a>(v: &'a Value, path: &str, allowed: &[&str]) -> Result<&'a str, QmpError> {
    let s = as_str(v, path)?;
    if allowed.contains(&s) {
        Ok(s)
    } else {
        Err(QmpError::invalid_enum_value(path, s))
    }
}

macro_rules! getters {
    ($(#[$doc:meta] $req:ident, $opt:ident -> $ty:ty = $conv:ident;)*) => {
        $(
            #[$doc]
            pub fn $req(&self, name: &str) -> Result<$ty, QmpError> {
                let path = self.name(name);
                let v = self.map.get(name).ok_or_else(|| QmpError::missing_parameter(&path))?;
                $conv(v, &path)
            }

            #[$doc]
            /// `None` when absent.
            pub fn $opt(&self, name: &str) -> Result<Option<$ty>, QmpError> {
                match self.map.get(name) {
                    None => Ok(None),
                    Some(v) => $conv(v, &self.name(name)).map(Some),
                }
            }
        )*
    };
}

impl<'a> Args<'a> {
    /// A view of the top-level arguments.
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Args {
            map,
            path: String::new(),
        }
    }

    /// The underlying object.
    pub fn map(&self) -> &'a Map<String, Value> {
        self.map
    }

    /// How QEMU names member `name` of this object in errors.
    pub fn name(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// The raw value of a member, if present.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    /// The raw value of a required member.
    pub fn req_value(&self, name: &str) -> Result<&'a Value, QmpError> {
        self.map
            .get(name)
            .ok_or_else(|| QmpError::missing_parameter(&self.name(name)))
    }

    getters! {
        /// A string member.
        req_str, opt_str -> &'a str = as_str;
        /// A boolean member.
        req_bool, opt_bool -> bool = as_bool;
        /// A `uint64` member (QEMU wraps negative integers).
        req_u64, opt_u64 -> u64 = as_u64;
        /// A `uint32` member.
        req_u32, opt_u32 -> u32 = as_u32;
        /// An `int` (64-bit) member.
        req_i64, opt_i64 -> i64 = as_i64;
        /// A `number` member.
        req_f64, opt_f64 -> f64 = as_f64;
    }

    /// A list member.
    pub fn req_array(&self, name: &str) -> Result<ArgList<'a>, QmpError> {
        as_array(self.req_value(name)?, self.name(name))
    }

    /// A list member; `None` when absent.
    pub fn opt_array(&self, name: &str) -> Result<Option<ArgList<'a>>, QmpError> {
        self.map
            .get(name)
            .map(|v| as_array(v, self.name(name)))
            .transpose()
    }

    /// A nested object member.
    pub fn req_object(&self, name: &str) -> Result<Args<'a>, QmpError> {
        as_object(self.req_value(name)?, self.name(name))
    }

    /// A nested object member; `None` when absent.
    pub fn opt_object(&self, name: &str) -> Result<Option<Args<'a>>, QmpError> {
        self.map
            .get(name)
            .map(|v| as_object(v, self.name(name)))
            .transpose()
    }

    /// An enum member: a string that must be one of `allowed`.
    pub fn req_enum(&self, name: &str, allowed: &[&str]) -> Result<&'a str, QmpError> {
        as_enum(self.req_value(name)?, &self.name(name), allowed)
    }

    /// An enum member; `None` when absent.
    pub fn opt_enum(&self, name: &str, allowed: &[&str]) -> Result<Option<&'a str>, QmpError> {
        self.map
            .get(name)
            .map(|v| as_enum(v, &self.name(name), allowed))
            .transpose()
    }

    /// Fails with `Parameter 'X' is unexpected` for the first member (in key
    /// order) not in `known`. QEMU reports the first in its hash order, so
    /// with several unknown members the one named may differ from QEMU's.
    pub fn reject_unexpected(&self, known: &[&str]) -> Result<(), QmpError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(QmpError::unexpected_parameter(&self.name(k))),
            None => Ok(()),
        }
    }
}

impl<'a> ArgList<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The raw elements.
    pub fn values(&self) -> &'a [Value] {
        self.items
    }

    /// The elements, each knowing its path (`name[i]`).
    pub fn iter(&self) -> impl Iterator<Item = ArgItem<'a>> + '_ {
        self.items.iter().enumerate().map(|(i, value)| ArgItem {
            value,
            path: format!("{}[{i}]", self.path),
        })
    }

    /// All elements as strings.
    pub fn strs(&self) -> Result<Vec<&'a str>, QmpError> {
        self.iter().map(|item| item.as_str()).collect()
    }
}

impl<'a> ArgItem<'a> {
    /// The raw value.
    pub fn value(&self) -> &'a Value {
        self.value
    }

    /// How QEMU names this element in errors (`name[i]`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The element as a string.
    pub fn as_str(&self) -> Result<&'a str, QmpError> {
        as_str(self.value, &self.path)
    }

    /// The element as a boolean.
    pub fn as_bool(&self) -> Result<bool, QmpError> {
        as_bool(self.value, &self.path)
    }

    /// The element as a `uint64`.
    pub fn as_u64(&self) -> Result<u64, QmpError> {
        as_u64(self.value, &self.path)
    }

    /// The element as an `int`.
    pub fn as_i64(&self) -> Result<i64, QmpError> {
        as_i64(self.value, &self.path)
    }

    /// The element as an object.
    pub fn as_object(&self) -> Result<Args<'a>, QmpError> {
        as_object(self.value, self.path.clone())
    }

    /// The element as a list.
    pub fn as_array(&self) -> Result<ArgList<'a>, QmpError> {
        as_array(self.value, self.path.clone())
    }
}

/// The [`Args`] getters, directly on the arguments map a handler receives.
pub trait ArgsExt {
    /// A view of these arguments.
    fn args(&self) -> Args<'_>;

    /// See [`Args::req_str`].
    fn req_str(&self, name: &str) -> Result<&str, QmpError> {
        self.args().req_str(name)
    }
    /// See [`Args::opt_str`].
    fn opt_str(&self, name: &str) -> Result<Option<&str>, QmpError> {
        self.args().opt_str(name)
    }
    /// See [`Args::req_bool`].
    fn req_bool(&self, name: &str) -> Result<bool, QmpError> {
        self.args().req_bool(name)
    }
    /// See [`Args::opt_bool`].
    fn opt_bool(&self, name: &str) -> Result<Option<bool>, QmpError> {
        self.args().opt_bool(name)
    }
    /// See [`Args::req_u64`].
    fn req_u64(&self, name: &str) -> Result<u64, QmpError> {
        self.args().req_u64(name)
    }
    /// See [`Args::opt_u64`].
    fn opt_u64(&self, name: &str) -> Result<Option<u64>, QmpError> {
        self.args().opt_u64(name)
    }
    /// See [`Args::req_u32`].
    fn req_u32(&self, name: &str) -> Result<u32, QmpError> {
        self.args().req_u32(name)
    }
    /// See [`Args::opt_u32`].
    fn opt_u32(&self, name: &str) -> Result<Option<u32>, QmpError> {
        self.args().opt_u32(name)
    }
    /// See [`Args::req_i64`].
    fn req_i64(&self, name: &str) -> Result<i64, QmpError> {
        self.args().req_i64(name)
    }
    /// See [`Args::opt_i64`].
    fn opt_i64(&self, name: &str) -> Result<Option<i64>, QmpError> {
        self.args().opt_i64(name)
    }
    /// See [`Args::req_array`].
    fn req_array(&self, name: &str) -> Result<ArgList<'_>, QmpError> {
        self.args().req_array(name)
    }
    /// See [`Args::opt_array`].
    fn opt_array(&self, name: &str) -> Result<Option<ArgList<'_>>, QmpError> {
        self.args().opt_array(name)
    }
    /// See [`Args::req_object`].
    fn req_object(&self, name: &str) -> Result<Args<'_>, QmpError> {
        self.args().req_object(name)
    }
    /// See [`Args::opt_object`].
    fn opt_object(&self, name: &str) -> Result<Option<Args<'_>>, QmpError> {
        self.args().opt_object(name)
    }
    /// See [`Args::req_enum`].
    fn req_enum(&self, name: &str, allowed: &[&str]) -> Result<&str, QmpError> {
        self.args().req_enum(name, allowed)
    }
    /// See [`Args::opt_enum`].
    fn opt_enum(&self, name: &str, allowed: &[&str]) -> Result<Option<&str>, QmpError> {
        self.args().opt_enum(name, allowed)
    }
    /// See [`Args::reject_unexpected`].
    fn reject_unexpected(&self, known: &[&str]) -> Result<(), QmpError> {
        self.args().reject_unexpected(known)
    }
}

impl ArgsExt for Map<String, Value> {
    fn args(&self) -> Args<'_> {
        Args::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    // Texts as produced by qemu-storage-daemon 10.0.2.
    #[test]
    fn texts() {
        let a = map(
            json!({"s": 1, "b": "x", "u": "a", "neg": -1, "f": 1.5, "n": null,
                           "l": "x", "big": 4294967296u64, "o": [],
                           "actions": [{"type": "t", "data": {"node": 1}}]}),
        );
        let e = |r: Result<(), QmpError>| r.unwrap_err().desc;
        assert_eq!(
            e(a.req_str("missing").map(drop)),
            "Parameter 'missing' is missing"
        );
        assert_eq!(
            e(a.req_str("s").map(drop)),
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            e(a.opt_bool("b").map(drop)),
            "Invalid parameter type for 'b', expected: boolean"
        );
        assert_eq!(
            e(a.opt_bool("n").map(drop)),
            "Invalid parameter type for 'n', expected: boolean"
        );
        assert_eq!(e(a.opt_u64("u").map(drop)), "Parameter 'u' expects uint64");
        assert_eq!(e(a.opt_u64("f").map(drop)), "Parameter 'f' expects uint64");
        assert_eq!(a.opt_u64("neg").unwrap(), Some(u64::MAX));
        assert_eq!(
            e(a.opt_u32("neg").map(drop)),
            "Parameter 'neg' expects uint32_t"
        );
        assert_eq!(
            e(a.opt_u32("big").map(drop)),
            "Parameter 'big' expects uint32_t"
        );
        assert_eq!(
            e(a.req_array("l").map(drop)),
            "Invalid parameter type for 'l', expected: array"
        );
        assert_eq!(
            e(a.req_object("o").map(drop)),
            "Invalid parameter type for 'o', expected: object"
        );
        assert_eq!(e(a.opt_i64("f").map(drop)), "Parameter 'f' expects integer");
        assert_eq!(
            e(a.reject_unexpected(&["s", "b", "u", "neg", "f", "n", "l", "big", "o"])),
            "Parameter 'actions' is unexpected"
        );
        let actions = a.req_array("actions").unwrap();
        let first = actions.iter().next().unwrap().as_object().unwrap();
        assert_eq!(first.req_str("type").unwrap(), "t");
        let data = first.req_object("data").unwrap();
        assert_eq!(
            e(data.req_str("node").map(drop)),
            "Invalid parameter type for 'actions[0].data.node', expected: string"
        );
        let l = map(json!({"enable": [1], "e": "foo"}));
        assert_eq!(
            e(l.req_array("enable").unwrap().strs().map(drop)),
            "Invalid parameter type for 'enable[0]', expected: string"
        );
        assert_eq!(
            e(l.req_enum("e", &["oob"]).map(drop)),
            "Parameter 'e' does not accept value 'foo'"
        );
    }
}
