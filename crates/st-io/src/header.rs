//! Parsing and strict validation of one safetensors file's header, over plain bytes.
//!
//! The layout: 8 bytes little-endian header length `n`, `n` bytes of UTF-8 JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data area that the offsets index. Mapping the file is the caller's business, so
//! the fuzzer and the property tests call exactly what production calls.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::{element_count, Dtype};
use crate::error::{Error, Result};

/// The largest header the safetensors format allows (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor entry of a header, offsets relative to the start of the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// First byte, relative to the data area.
    pub begin: u64,
    /// One past the last byte, relative to the data area.
    pub end: u64,
}

impl HeaderTensor {
    pub fn len_bytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// A validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The `n` of the 8-byte prefix.
    pub header_len: u64,
    /// `__metadata__`, in file order, if present.
    pub metadata: Option<Vec<(String, String)>>,
    /// Tensors in data-area order.
    pub tensors: Vec<HeaderTensor>,
}

impl Header {
    /// Offset in the file of the first data byte.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    /// Parses and validates the header of a whole safetensors file held in `bytes`.
    ///
    /// `file` only names the file in errors. Every malformation is an error, never a panic:
    /// short file, oversized or truncated header, non-UTF-8 or non-JSON header, unknown dtype,
    /// shape × dtype ≠ byte range, offsets reversed, out of bounds, overlapping or leaving
    /// gaps, duplicate names.
    pub fn parse(file: &Path, bytes: &[u8]) -> Result<Header> {
        let file_len = bytes.len() as u64;
        let Some(prefix) = bytes.get(..8) else {
            return Err(Error::FileTooShort {
                file: file.to_path_buf(),
                len: file_len,
            });
        };
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(prefix);
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(Error::HeaderTooLarge {
                file: file.to_path_buf(),
                header_len,
            });
        }
        if 8 + header_len > file_len {
            return Err(Error::HeaderPastEnd {
                file: file.to_path_buf(),
                header_len,
                file_len,
            });
        }
        let raw = &bytes[8..8 + header_len as usize];
        let text = std::str::from_utf8(raw).map_err(|e| Error::HeaderNotUtf8 {
            file: file.to_path_buf(),
            offset: e.valid_up_to(),
        })?;
        if !text.starts_with('{') {
            return Err(Error::HeaderNotJson {
                file: file.to_path_buf(),
                message: "the header must start with '{'".into(),
            });
        }
        let entries = parse_entries(text).map_err(|e| match e {
            EntryError::Duplicate(tensor) => Error::DuplicateTensor {
                file: file.to_path_buf(),
                tensor,
            },
            EntryError::Json(e) => Error::HeaderNotJson {
                file: file.to_path_buf(),
                message: e.to_string(),
            },
        })?;
        let data_len = file_len - 8 - header_len;
        validate(file, header_len, data_len, entries)
    }
}

/// The raw entries, in header order, duplicates rejected.
struct RawHeader {
    metadata: Option<Value>,
    tensors: Vec<(String, Value)>,
}

enum EntryError {
    Duplicate(String),
    Json(serde_json::Error),
}

fn parse_entries(text: &str) -> std::result::Result<RawHeader, EntryError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let mut duplicate = None;
    let raw = de
        .deserialize_map(HeaderVisitor {
            duplicate: &mut duplicate,
        })
        .and_then(|raw| de.end().map(|()| raw));
    if let Some(name) = duplicate {
        return Err(EntryError::Duplicate(name));
    }
    raw.map_err(EntryError::Json)
}

struct HeaderVisitor<'a> {
    duplicate: &'a mut Option<String>,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
        let mut seen = HashSet::new();
        let mut raw = RawHeader {
            metadata: None,
            tensors: Vec::new(),
        };
        while let Some(key) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            if !seen.insert(key.clone()) {
                *self.duplicate = Some(key.clone());
                return Err(de::Error::custom(format!("duplicate key \"{key}\"")));
            }
            if key == "__metadata__" {
                raw.metadata = Some(value);
            } else {
                raw.tensors.push((key, value));
            }
        }
        Ok(raw)
    }
}

fn validate(file: &Path, header_len: u64, data_len: u64, raw: RawHeader) -> Result<Header> {
    let metadata = raw.metadata.map(|m| parse_metadata(file, m)).transpose()?;
    let mut tensors = Vec::with_capacity(raw.tensors.len());
    for (name, value) in raw.tensors {
        tensors.push(parse_tensor(file, name, value, data_len)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    check_coverage(file, &tensors, data_len)?;
    Ok(Header {
        header_len,
        metadata,
        tensors,
    })
}

fn parse_metadata(file: &Path, value: Value) -> Result<Vec<(String, String)>> {
    let bad = |message: String| Error::BadMetadata {
        file: file.to_path_buf(),
        message,
    };
    match value {
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(bad(format!("key \"{k}\" has value {other}"))),
            })
            .collect(),
        Value::Null => Ok(Vec::new()),
        other => Err(bad(format!("found {}", kind_of(&other)))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_tensor(file: &Path, name: String, value: Value, data_len: u64) -> Result<HeaderTensor> {
    let entry_error = |name: &str, message: String| Error::BadTensorEntry {
        file: file.to_path_buf(),
        tensor: name.to_string(),
        message,
    };
    let Value::Object(mut fields) = value else {
        return Err(entry_error(
            &name,
            format!("entry must be an object, found {}", kind_of(&value)),
        ));
    };
    for key in fields.keys() {
        if !matches!(key.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(entry_error(&name, format!("unexpected field \"{key}\"")));
        }
    }
    let dtype_name = match fields.remove("dtype") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(entry_error(
                &name,
                format!("\"dtype\" must be a string, found {}", kind_of(&other)),
            ))
        }
        None => return Err(entry_error(&name, "missing field \"dtype\"".into())),
    };
    let dtype = Dtype::from_name(&dtype_name).ok_or_else(|| Error::UnknownDtype {
        file: file.to_path_buf(),
        tensor: name.clone(),
        dtype: dtype_name.clone(),
    })?;
    let shape = match fields.remove("shape") {
        Some(v) => u64_array(&v).ok_or_else(|| {
            entry_error(
                &name,
                format!("\"shape\" must be an array of non-negative integers, found {v}"),
            )
        })?,
        None => return Err(entry_error(&name, "missing field \"shape\"".into())),
    };
    let (begin, end) = match fields.remove("data_offsets") {
        Some(v) => match u64_array(&v).as_deref() {
            Some(&[b, e]) => (b, e),
            _ => {
                return Err(entry_error(
                    &name,
                    format!("\"data_offsets\" must be two non-negative integers, found {v}"),
                ))
            }
        },
        None => return Err(entry_error(&name, "missing field \"data_offsets\"".into())),
    };
    if begin > end {
        return Err(Error::OffsetsReversed {
            file: file.to_path_buf(),
            tensor: name,
            begin,
            end,
        });
    }
    let Some(expected) = element_count(&shape).and_then(|n| dtype.bytes_for(n)) else {
        return Err(Error::ShapeOverflow {
            file: file.to_path_buf(),
            tensor: name,
            dtype: dtype_name,
            shape,
        });
    };
    if end - begin != expected {
        return Err(Error::SizeMismatch {
            file: file.to_path_buf(),
            tensor: name,
            dtype: dtype_name,
            shape,
            expected,
            found: end - begin,
        });
    }
    if end > data_len {
        return Err(Error::OffsetOutOfBounds {
            file: file.to_path_buf(),
            tensor: name,
            end,
            data_len,
        });
    }
    Ok(HeaderTensor {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

fn u64_array(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(Value::as_u64).collect()
}

/// Tensors sorted by offset must tile the data area exactly: no overlap, no gap, no tail.
fn check_coverage(file: &Path, tensors: &[HeaderTensor], data_len: u64) -> Result<()> {
    let mut cursor = 0u64;
    let mut previous: Option<&HeaderTensor> = None;
    for t in tensors {
        if t.begin < cursor {
            // `previous` is set: cursor > 0 only after a tensor.
            let prev = previous.map(|p| p.name.clone()).unwrap_or_default();
            return Err(Error::OverlappingTensors {
                file: file.to_path_buf(),
                first: prev,
                second: t.name.clone(),
                offset: t.begin,
            });
        }
        if t.begin > cursor {
            return Err(Error::DataGap {
                file: file.to_path_buf(),
                begin: cursor,
                end: t.begin,
                after: previous.map(|p| p.name.clone()),
            });
        }
        cursor = t.end;
        previous = Some(t);
    }
    if cursor != data_len {
        return Err(Error::DataGap {
            file: file.to_path_buf(),
            begin: cursor,
            end: data_len,
            after: previous.map(|p| p.name.clone()),
        });
    }
    Ok(())
}

/// Serialises a header the way the safetensors format expects: compact JSON, `__metadata__`
/// first, tensors in the given order, padded with spaces to a multiple of 8 bytes so the data
/// area is aligned. Returns the 8-byte length prefix followed by the JSON.
pub fn encode_header(metadata: &[(String, String)], tensors: &[HeaderTensor]) -> Vec<u8> {
    let mut json = String::with_capacity(64 + tensors.len() * 96);
    json.push('{');
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            push_json_string(&mut json, k);
            json.push(':');
            push_json_string(&mut json, v);
        }
        json.push('}');
        first = false;
    }
    for t in tensors {
        if !first {
            json.push(',');
        }
        first = false;
        push_json_string(&mut json, &t.name);
        json.push_str(":{\"dtype\":\"");
        json.push_str(t.dtype.name());
        json.push_str("\",\"shape\":[");
        for (i, d) in t.shape.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&d.to_string());
        }
        json.push_str("],\"data_offsets\":[");
        json.push_str(&t.begin.to_string());
        json.push(',');
        json.push_str(&t.end.to_string());
        json.push_str("]}");
    }
    json.push('}');
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

fn push_json_string(out: &mut String, s: &str) {
    // serde_json's escaping of a &str cannot fail.
    out.push_str(&Value::String(s.to_string()).to_string());
}
