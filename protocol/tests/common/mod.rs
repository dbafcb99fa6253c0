//! Reads a type's variant names out of its serde derive, so a test can cover every variant
//! without a hand-kept list that a new variant could be forgotten in.
//!
//! Not a general reflection tool: it knows the two shapes this protocol uses, internally
//! tagged enums (the messages, a candidate's `state`) and enums of plain names (error codes,
//! phases, package sources).

use std::fmt;

use serde::Serialize;
use serde::de::value::MapDeserializer;
use serde::de::{self, Deserialize, Deserializer, Visitor};

/// The `type` names of an internally tagged enum such as `ClientMessage`, in declaration order.
pub fn tagged_variants<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
    tagged_variants_by::<T>("type")
}

/// The names of an enum internally tagged by `tag`, such as `CandidateState` by `state`, in
/// declaration order.
///
/// Feeds the derive a tag value no variant has; serde then reports the names it expected.
pub fn tagged_variants_by<T: for<'de> Deserialize<'de>>(tag: &'static str) -> Vec<&'static str> {
    let probe = MapDeserializer::<_, Probe>::new(std::iter::once((tag, "\u{0}no such variant")));
    variants_from(T::deserialize(probe).err())
}

/// The names of an enum serialised as a plain string, such as `ErrorCode`, in declaration
/// order. Works for enums with a `#[serde(other)]` fallback too, which never report an
/// unknown name.
pub fn unit_variants<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
    variants_from(T::deserialize(EnumProbe).err())
}

/// The name a `#[serde(other)]` fallback (such as `ErrorCode::Unknown`) travels as: what a
/// name no variant has is read as. `None` when the enum has no fallback.
pub fn fallback_variant<T: Serialize + for<'de> Deserialize<'de>>() -> Option<String> {
    let read: T = serde_json::from_str("\"\\u0000no such variant\"").ok()?;
    match serde_json::to_value(read).expect("a variant serialises") {
        serde_json::Value::String(name) => Some(name),
        other => panic!("a fallback variant serialises as a name, not {other}"),
    }
}

fn variants_from(outcome: Option<Probe>) -> Vec<&'static str> {
    let variants = outcome.map(|probe| probe.variants).unwrap_or_default();
    assert!(
        !variants.is_empty(),
        "serde did not name the variants; has the derive changed shape?"
    );
    variants
}

/// The error the probes make serde return: the variant names it knows, if it said them.
#[derive(Debug, Default)]
struct Probe {
    variants: Vec<&'static str>,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "variants {:?}", self.variants)
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<M: fmt::Display>(_message: M) -> Probe {
        Probe::default()
    }

    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Probe {
        Probe {
            variants: expected.to_vec(),
        }
    }
}

/// A deserializer that answers an enum request with the enum's variant list, and anything
/// else with an empty error.
struct EnumProbe;

impl<'de> Deserializer<'de> for EnumProbe {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probe> {
        Err(Probe::default())
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probe> {
        Err(Probe {
            variants: variants.to_vec(),
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}
