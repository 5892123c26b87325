//! Wire format of the autoscaler-agent ⇄ vm-monitor websocket protocol (v1.0).
//!
//! The two directions use different envelopes:
//! - agent → monitor is adjacently tagged: `{"content":{...},"type":T,"id":N}`;
//! - monitor → agent is flat: `{"type":T,...fields...,"id":N}`.
//!
//! Inbound frames go through [`decode_inbound`], a total function: whatever the peer sends, it
//! yields a [`Decision`] (handle a typed message, or answer `InvalidMessage`). It validates
//! allocations so that nonsense never reaches the backend.

use crate::backend::Resources;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;

/// The only protocol version that exists (agent's `MonitorProtoV1_0`).
pub const PROTOCOL_V1_0: u64 = 1;

/// The range of versions we speak: exactly v1.0.
pub const OUR_RANGE: VersionRange = VersionRange {
    min: PROTOCOL_V1_0,
    max: PROTOCOL_V1_0,
};

/// Upper bound on memory we accept in an allocation. No VM the agent manages comes near it;
/// anything above is a corrupted or hostile value, not a resize.
pub const MAX_MEM_BYTES: u64 = crate::policy::MAX_MEM;

/// Upper bound on vCPUs we accept in an allocation, for the same reason.
pub const MAX_CPU: f64 = 4096.0;

/// Error texts we send are capped so a reply always fits the agent's 32 KiB read limit.
const MAX_ERROR_TEXT: usize = 512;

// ---------------------------------------------------------------------------------------------
// Handshake

/// A protocol version number as it appears on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The reference recursed forever on anything but 0 and 1; every u64 must print.
        match self.0 {
            0 => f.write_str("<invalid: zero>"),
            PROTOCOL_V1_0 => f.write_str("v1.0"),
            n => write!(f, "<unknown: {n}>"),
        }
    }
}

/// First frame of a connection, sent by the agent: `{"min":1,"max":1}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u64,
    pub max: u64,
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", Version(self.min))
        } else {
            write!(f, "{} to {}", Version(self.min), Version(self.max))
        }
    }
}

impl VersionRange {
    /// Highest version both ranges contain, if they overlap.
    pub fn highest_shared(&self, other: &VersionRange) -> Option<u64> {
        let lo = self.min.max(other.min);
        let hi = self.max.min(other.max);
        (lo <= hi).then_some(hi)
    }
}

/// Our answer to the version range: `{"version":1}` or `{"error":"..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HandshakeReply {
    pub fn accepted(version: u64) -> Self {
        Self {
            version: Some(version),
            error: None,
        }
    }

    pub fn refused(error: impl Into<String>) -> Self {
        Self {
            version: None,
            error: Some(truncate(error.into())),
        }
    }

    pub fn is_accepted(&self) -> bool {
        self.version.is_some()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"error":"internal error"}"#.to_string())
    }
}

/// Decides the handshake from the agent's first text frame. Total: any input yields a reply.
pub fn negotiate(first_frame: &str) -> HandshakeReply {
    let refuse = |why: String| {
        HandshakeReply::refused(format!(
            "expected protocol version range {{\"min\":N,\"max\":M}}: {why}"
        ))
    };
    // Via `Value` so that only an object is accepted (serde's derive would also take `[1,1]`).
    let theirs: VersionRange = match serde_json::from_str::<Value>(first_frame) {
        Ok(v @ Value::Object(_)) => match serde_json::from_value(v) {
            Ok(r) => r,
            Err(e) => return refuse(e.to_string()),
        },
        Ok(other) => return refuse(format!("got {}", kind(&other))),
        Err(e) => return refuse(e.to_string()),
    };
    if theirs.min > theirs.max {
        return HandshakeReply::refused(format!(
            "Received invalid protocol version range {} to {}: min is greater than max",
            Version(theirs.min),
            Version(theirs.max)
        ));
    }
    match OUR_RANGE.highest_shared(&theirs) {
        Some(v) => HandshakeReply::accepted(v),
        None => HandshakeReply::refused(format!(
            "Received protocol version range {theirs} which does not overlap with {OUR_RANGE}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads

/// `{"cpu": <vCPUs, int or float>, "mem": <bytes>}`: a new total for the VM, not a delta.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
pub struct Allocation {
    pub cpu: f64,
    pub mem: u64,
}

impl Serialize for Allocation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("cpu", &GoFloat(self.cpu))?;
        m.serialize_entry("mem", &self.mem)?;
        m.end()
    }
}

/// Prints whole floats without a decimal point, as Go does (`1`, not `1.0`).
struct GoFloat(f64);

impl Serialize for GoFloat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        // 2^53: beyond it not every integer is representable, so keep the float form.
        if v.is_finite() && v.fract() == 0.0 && v.abs() < 9_007_199_254_740_992.0 {
            s.serialize_i64(v as i64)
        } else {
            s.serialize_f64(v)
        }
    }
}

impl From<Resources> for Allocation {
    fn from(r: Resources) -> Self {
        Self {
            cpu: r.cpu,
            mem: r.mem_bytes,
        }
    }
}

impl Allocation {
    /// Refuses values no real VM can have instead of letting the backend act on them.
    pub fn validate(&self) -> Result<Resources, String> {
        let cpu = self.cpu;
        if !cpu.is_finite() {
            return Err(format!("cpu must be a finite number, got {cpu}"));
        }
        if cpu <= 0.0 {
            return Err(format!("cpu must be positive, got {cpu}"));
        }
        if cpu > MAX_CPU {
            return Err(format!("cpu {cpu} exceeds the maximum of {MAX_CPU} vCPUs"));
        }
        if self.mem == 0 {
            return Err("mem must be positive, got 0".to_string());
        }
        if self.mem > MAX_MEM_BYTES {
            return Err(format!(
                "mem {} exceeds the maximum of {MAX_MEM_BYTES} bytes (16 TiB)",
                self.mem
            ));
        }
        Ok(Resources {
            cpu,
            mem_bytes: self.mem,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Agent → monitor

/// A decoded, validated message from the agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentMessage {
    pub id: u64,
    pub body: AgentBody,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AgentBody {
    HealthCheck,
    DownscaleRequest {
        target: Resources,
    },
    UpscaleNotification {
        granted: Resources,
    },
    /// The agent says a frame of ours was invalid. Logged, never answered.
    InvalidMessage {
        error: String,
    },
    /// The agent reports an internal error. Logged, never answered.
    InternalError {
        error: String,
    },
}

impl AgentBody {
    pub fn type_name(&self) -> &'static str {
        match self {
            AgentBody::HealthCheck => "HealthCheck",
            AgentBody::DownscaleRequest { .. } => "DownscaleRequest",
            AgentBody::UpscaleNotification { .. } => "UpscaleNotification",
            AgentBody::InvalidMessage { .. } => "InvalidMessage",
            AgentBody::InternalError { .. } => "InternalError",
        }
    }
}

/// Encodes exactly as the Go agent does (keys `content`, `type`, `id` in that order), so the
/// literal frames in the protocol notes round-trip byte for byte.
impl Serialize for AgentMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Target {
            target: Allocation,
        }
        #[derive(Serialize)]
        struct Granted {
            granted: Allocation,
        }
        #[derive(Serialize)]
        struct Error<'a> {
            error: &'a str,
        }
        let mut m = s.serialize_map(Some(3))?;
        match &self.body {
            AgentBody::HealthCheck => m.serialize_entry("content", &Map::new())?,
            AgentBody::DownscaleRequest { target } => m.serialize_entry(
                "content",
                &Target {
                    target: (*target).into(),
                },
            )?,
            AgentBody::UpscaleNotification { granted } => m.serialize_entry(
                "content",
                &Granted {
                    granted: (*granted).into(),
                },
            )?,
            AgentBody::InvalidMessage { error } | AgentBody::InternalError { error } => {
                m.serialize_entry("content", &Error { error })?
            }
        }
        m.serialize_entry("type", self.body.type_name())?;
        m.serialize_entry("id", &self.id)?;
        m.end()
    }
}

/// What to do with one inbound text frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// A well-formed message with valid values.
    Handle(AgentMessage),
    /// Answer `{"type":"InvalidMessage","error":<error>,"id":<id>}` and keep the session.
    /// `id` is the frame's id when it has a usable one, else 0.
    Reject { id: u64, error: String },
}

/// Deepest nesting of arrays/objects an agent frame may have (its deepest is 3).
pub const MAX_NESTING: usize = 16;

/// Whether `text` nests arrays/objects deeper than `max`, by one pass over the bytes: a frame
/// built to be costly (deep or wide trees of arrays) is refused before a JSON tree is built.
fn nests_deeper_than(text: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Decodes one agent text frame. Total and panic-free for any input.
pub fn decode_inbound(text: &str) -> Decision {
    if nests_deeper_than(text, MAX_NESTING) {
        return reject(
            0,
            format!("frame nests arrays/objects deeper than {MAX_NESTING} levels"),
        );
    }
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return reject(0, format!("frame is not valid JSON: {e}")),
    };
    let Value::Object(obj) = value else {
        return reject(
            0,
            format!("frame is not a JSON object but {}", kind(&value)),
        );
    };
    let id = obj.get("id").and_then(Value::as_u64);
    let ty = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return reject(
                id.unwrap_or(0),
                format!("field `type` must be a string, got {}", kind(other)),
            );
        }
        None => return reject(id.unwrap_or(0), "missing field `type`".to_string()),
    };
    let content = obj.get("content");

    // Notifications are never answered, not even malformed ones: answering could start an
    // InvalidMessage ping-pong with a peer that does the same.
    if ty == "InvalidMessage" || ty == "InternalError" {
        let error = match content.and_then(|c| c.get("error")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => "<no error text>".to_string(),
        };
        let body = if ty == "InvalidMessage" {
            AgentBody::InvalidMessage { error }
        } else {
            AgentBody::InternalError { error }
        };
        return Decision::Handle(AgentMessage {
            id: id.unwrap_or(0),
            body,
        });
    }

    let Some(id) = id else {
        let error = match obj.get("id") {
            None => "missing field `id`".to_string(),
            Some(v) => format!("field `id` must be an unsigned integer, got {}", short(v)),
        };
        return reject(0, error);
    };

    let body = match ty {
        "HealthCheck" => match content {
            // The reference insisted on `content: {}`; the agent always sends it, but there is
            // nothing to read, so absence or null are fine too.
            None | Some(Value::Null) | Some(Value::Object(_)) => AgentBody::HealthCheck,
            Some(other) => {
                return reject(
                    id,
                    format!(
                        "HealthCheck: `content` must be an object, got {}",
                        kind(other)
                    ),
                );
            }
        },
        "DownscaleRequest" => match allocation(content, "target") {
            Ok(target) => AgentBody::DownscaleRequest { target },
            Err(e) => return reject(id, format!("DownscaleRequest refused: {e}")),
        },
        "UpscaleNotification" => match allocation(content, "granted") {
            Ok(granted) => AgentBody::UpscaleNotification { granted },
            Err(e) => return reject(id, format!("UpscaleNotification refused: {e}")),
        },
        "UpscaleRequest" | "UpscaleConfirmation" | "DownscaleResult" => {
            return reject(
                id,
                format!("message type {ty:?} is only sent by the monitor, not the agent"),
            );
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return reject(id, format!("unknown message type {shown:?}"));
        }
    };
    Decision::Handle(AgentMessage { id, body })
}

/// Reads and validates `content.<field>` as an allocation.
fn allocation(content: Option<&Value>, field: &str) -> Result<Resources, String> {
    let content = match content {
        Some(Value::Object(c)) => c,
        None | Some(Value::Null) => return Err("missing `content`".to_string()),
        Some(other) => {
            return Err(format!("`content` must be an object, got {}", kind(other)));
        }
    };
    let alloc = match content.get(field) {
        Some(Value::Object(a)) => a,
        None | Some(Value::Null) => return Err(format!("missing `{field}` allocation")),
        Some(other) => {
            return Err(format!("`{field}` must be an object, got {}", kind(other)));
        }
    };
    let cpu = match alloc.get("cpu") {
        Some(Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| format!("{field}.cpu is not representable"))?,
        Some(other) => return Err(format!("{field}.cpu must be a number, got {}", kind(other))),
        None => return Err(format!("missing {field}.cpu")),
    };
    let mem = match alloc.get("mem") {
        Some(v @ Value::Number(n)) => n.as_u64().ok_or_else(|| {
            format!(
                "{field}.mem must be a non-negative integer number of bytes, got {}",
                short(v)
            )
        })?,
        Some(other) => return Err(format!("{field}.mem must be a number, got {}", kind(other))),
        None => return Err(format!("missing {field}.mem")),
    };
    Allocation { cpu, mem }
        .validate()
        .map_err(|e| format!("invalid {field}: {e}"))
}

fn reject(id: u64, error: String) -> Decision {
    Decision::Reject {
        id,
        error: truncate(error),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a value for error texts.
fn short(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Monitor → agent

/// A frame we send: `{"type":T, ...fields..., "id":N}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorMessage {
    #[serde(flatten)]
    pub body: MonitorBody,
    pub id: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum MonitorBody {
    /// Our only unsolicited message; odd ids. The agent never replies to it.
    UpscaleRequest,
    UpscaleConfirmation,
    /// Capitalised field names: the agent's Go struct has no JSON tags.
    DownscaleResult {
        #[serde(rename = "Ok")]
        ok: bool,
        #[serde(rename = "Status")]
        status: String,
    },
    HealthCheck,
    InvalidMessage {
        error: String,
    },
    InternalError {
        error: String,
    },
}

impl MonitorMessage {
    pub fn new(id: u64, body: MonitorBody) -> Self {
        Self { id, body }
    }

    pub fn type_name(&self) -> &'static str {
        match self.body {
            MonitorBody::UpscaleRequest => "UpscaleRequest",
            MonitorBody::UpscaleConfirmation => "UpscaleConfirmation",
            MonitorBody::DownscaleResult { .. } => "DownscaleResult",
            MonitorBody::HealthCheck => "HealthCheck",
            MonitorBody::InvalidMessage { .. } => "InvalidMessage",
            MonitorBody::InternalError { .. } => "InternalError",
        }
    }

    /// The frame text. Serialization of these types cannot fail (no maps with non-string keys,
    /// no fallible impls), but fall back to an InternalError frame rather than panic.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"type":"InternalError","error":{},"id":{}}}"#,
                Value::String(format!("failed to encode reply: {e}")),
                self.id
            )
        })
    }
}

#[cfg(test)]
mod nesting_tests {
    use super::*;

    #[test]
    fn nesting_scan_counts_structure_not_strings() {
        assert!(!nests_deeper_than(r#"{"a":{"b":[1,2]}}"#, 3));
        assert!(nests_deeper_than(r#"{"a":{"b":[[1]]}}"#, 3));
        // Brackets inside strings, also after escaped quotes, do not count.
        assert!(!nests_deeper_than(r#"{"e":"[[[[\"[[[["}"#, 1));
        let deep = format!("{}{}", "[".repeat(17), "]".repeat(17));
        assert!(matches!(
            decode_inbound(&deep),
            Decision::Reject { id: 0, ref error } if error.contains("deeper than 16")
        ));
        // Wide but shallow trees parse (and are rejected for what they are).
        let wide = format!("[{}]", vec!["[[1]]"; 1000].join(","));
        assert!(!nests_deeper_than(&wide, MAX_NESTING));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn res(cpu: f64, mem_bytes: u64) -> Resources {
        Resources { cpu, mem_bytes }
    }

    fn handled(text: &str) -> AgentMessage {
        match decode_inbound(text) {
            Decision::Handle(m) => m,
            other => panic!("expected Handle for {text}, got {other:?}"),
        }
    }

    fn rejected(text: &str) -> (u64, String) {
        match decode_inbound(text) {
            Decision::Reject { id, error } => (id, error),
            other => panic!("expected Reject for {text}, got {other:?}"),
        }
    }

    /// Literal agent→monitor frames as the autoscaler-agent sends them.
    fn agent_literals() -> Vec<(&'static str, AgentMessage)> {
        vec![
            (
                r#"{"content":{},"type":"HealthCheck","id":2}"#,
                AgentMessage {
                    id: 2,
                    body: AgentBody::HealthCheck,
                },
            ),
            (
                r#"{"content":{"target":{"cpu":0.75,"mem":3221225472}},"type":"DownscaleRequest","id":4}"#,
                AgentMessage {
                    id: 4,
                    body: AgentBody::DownscaleRequest {
                        target: res(0.75, 3221225472),
                    },
                },
            ),
            (
                r#"{"content":{"granted":{"cpu":1,"mem":4294967296}},"type":"UpscaleNotification","id":6}"#,
                AgentMessage {
                    id: 6,
                    body: AgentBody::UpscaleNotification {
                        granted: res(1.0, 4294967296),
                    },
                },
            ),
            (
                r#"{"content":{"target":{"cpu":0.25,"mem":1073741824}},"type":"DownscaleRequest","id":4}"#,
                AgentMessage {
                    id: 4,
                    body: AgentBody::DownscaleRequest {
                        target: res(0.25, 1073741824),
                    },
                },
            ),
            (
                r#"{"content":{"error":"Received HealthCheck with id 9 but id is unknown or already timed out waiting for a reply"},"type":"InvalidMessage","id":9}"#,
                AgentMessage {
                    id: 9,
                    body: AgentBody::InvalidMessage {
                        error: "Received HealthCheck with id 9 but id is unknown or already timed out waiting for a reply".into(),
                    },
                },
            ),
        ]
    }

    #[test]
    fn agent_frames_round_trip_byte_exact() {
        for (text, expected) in agent_literals() {
            let got = handled(text);
            assert_eq!(got, expected, "decoding {text}");
            assert_eq!(
                serde_json::to_string(&got).unwrap(),
                text,
                "re-encoding {text}"
            );
        }
    }

    #[test]
    fn monitor_frames_round_trip_byte_exact() {
        let cases = [
            (
                r#"{"type":"HealthCheck","id":2}"#,
                MonitorMessage::new(2, MonitorBody::HealthCheck),
            ),
            (
                r#"{"type":"DownscaleResult","Ok":false,"Status":"haven't received enough cgroup memory stats yet","id":4}"#,
                MonitorMessage::new(
                    4,
                    MonitorBody::DownscaleResult {
                        ok: false,
                        status: "haven't received enough cgroup memory stats yet".into(),
                    },
                ),
            ),
            (
                r#"{"type":"DownscaleResult","Ok":true,"Status":"monitor is not managing cgroup or file cache","id":2}"#,
                MonitorMessage::new(
                    2,
                    MonitorBody::DownscaleResult {
                        ok: true,
                        status: crate::backend::NOT_MANAGING_STATUS.into(),
                    },
                ),
            ),
            (
                r#"{"type":"UpscaleConfirmation","id":6}"#,
                MonitorMessage::new(6, MonitorBody::UpscaleConfirmation),
            ),
            (
                r#"{"type":"UpscaleRequest","id":3}"#,
                MonitorMessage::new(3, MonitorBody::UpscaleRequest),
            ),
            (
                r#"{"type":"InternalError","error":"failed to downscale: ...","id":8}"#,
                MonitorMessage::new(
                    8,
                    MonitorBody::InternalError {
                        error: "failed to downscale: ...".into(),
                    },
                ),
            ),
            (
                r#"{"type":"InvalidMessage","error":"unknown message type \"Foo\"","id":0}"#,
                MonitorMessage::new(
                    0,
                    MonitorBody::InvalidMessage {
                        error: "unknown message type \"Foo\"".into(),
                    },
                ),
            ),
        ];
        for (text, msg) in cases {
            assert_eq!(msg.to_json(), text);
            let back: MonitorMessage = serde_json::from_str(text).unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn handshake_literals() {
        let range: VersionRange = serde_json::from_str(r#"{"min":1,"max":1}"#).unwrap();
        assert_eq!(range, OUR_RANGE);
        assert_eq!(
            serde_json::to_string(&range).unwrap(),
            r#"{"min":1,"max":1}"#
        );
        assert_eq!(
            negotiate(r#"{"min":1,"max":1}"#).to_json(),
            r#"{"version":1}"#
        );
        let back: HandshakeReply = serde_json::from_str(r#"{"version":1}"#).unwrap();
        assert_eq!(back, HandshakeReply::accepted(1));
    }

    #[test]
    fn handshake_edge_cases() {
        let refused = |s: &str| negotiate(s).error.unwrap_or_else(|| panic!("{s} accepted"));
        assert_eq!(
            refused(r#"{"min":0,"max":0}"#),
            "Received protocol version range <invalid: zero> which does not overlap with v1.0"
        );
        assert_eq!(
            refused(r#"{"min":2,"max":2}"#),
            "Received protocol version range <unknown: 2> which does not overlap with v1.0"
        );
        assert_eq!(
            refused(r#"{"min":2,"max":255}"#),
            "Received protocol version range <unknown: 2> to <unknown: 255> which does not overlap with v1.0"
        );
        assert_eq!(
            refused(r#"{"min":2,"max":1}"#),
            "Received invalid protocol version range <unknown: 2> to v1.0: min is greater than max"
        );
        assert!(refused("garbage").starts_with("expected protocol version range"));
        assert!(refused(r#"{"min":-1,"max":1}"#).starts_with("expected protocol version range"));
        assert!(refused("[1,1]").starts_with("expected protocol version range"));
        assert_eq!(
            negotiate(r#"{"min":0,"max":18446744073709551615}"#),
            HandshakeReply::accepted(1)
        );
        assert_eq!(
            negotiate(r#"{"min":1,"max":1,"extra":true}"#),
            HandshakeReply::accepted(1)
        );
        assert_eq!(
            Version(u64::MAX).to_string(),
            "<unknown: 18446744073709551615>"
        );
    }

    #[test]
    fn health_check_content_variants() {
        for text in [
            r#"{"type":"HealthCheck","id":2}"#,
            r#"{"content":null,"type":"HealthCheck","id":2}"#,
            r#"{"content":{},"type":"HealthCheck","id":2}"#,
            r#"{"content":{"x":1},"type":"HealthCheck","id":2,"extra":[1]}"#,
        ] {
            assert_eq!(
                handled(text),
                AgentMessage {
                    id: 2,
                    body: AgentBody::HealthCheck
                }
            );
        }
        assert_eq!(
            rejected(r#"{"content":5,"type":"HealthCheck","id":2}"#).0,
            2
        );
    }

    #[test]
    fn cpu_int_or_float() {
        let m = handled(
            r#"{"content":{"granted":{"cpu":2,"mem":1073741824}},"type":"UpscaleNotification","id":2}"#,
        );
        assert_eq!(
            m.body,
            AgentBody::UpscaleNotification {
                granted: res(2.0, 1 << 30)
            }
        );
        let m = handled(
            r#"{"content":{"granted":{"cpu":2.5,"mem":1073741824}},"type":"UpscaleNotification","id":2}"#,
        );
        assert_eq!(
            m.body,
            AgentBody::UpscaleNotification {
                granted: res(2.5, 1 << 30)
            }
        );
    }

    #[test]
    fn invalid_allocations_are_refused_with_the_frame_id() {
        let bad = [
            r#"{"cpu":-1,"mem":1073741824}"#,
            r#"{"cpu":0,"mem":1073741824}"#,
            r#"{"cpu":1,"mem":-1073741824}"#,
            r#"{"cpu":1,"mem":0}"#,
            r#"{"cpu":1,"mem":1073741824.5}"#,
            r#"{"cpu":1,"mem":17592186044417}"#,
            r#"{"cpu":1,"mem":18446744073709551615}"#,
            r#"{"cpu":1e300,"mem":1073741824}"#,
            r#"{"cpu":"1","mem":1073741824}"#,
            r#"{"cpu":null,"mem":1073741824}"#,
            r#"{"mem":1073741824}"#,
            r#"{"cpu":1}"#,
            r#"{}"#,
            r#"null"#,
            r#"[1,2]"#,
        ];
        for alloc in bad {
            for (ty, field) in [
                ("DownscaleRequest", "target"),
                ("UpscaleNotification", "granted"),
            ] {
                let text = format!(r#"{{"content":{{"{field}":{alloc}}},"type":"{ty}","id":12}}"#);
                let (id, error) = rejected(&text);
                assert_eq!(id, 12, "{text}");
                assert!(error.starts_with(ty), "{text}: {error}");
            }
        }
        // Missing content altogether.
        assert_eq!(rejected(r#"{"type":"DownscaleRequest","id":4}"#).0, 4);
        // Exactly 16 TiB is still accepted.
        handled(
            r#"{"content":{"target":{"cpu":1,"mem":17592186044416}},"type":"DownscaleRequest","id":4}"#,
        );
    }

    #[test]
    fn envelope_errors() {
        assert_eq!(rejected("not json").0, 0);
        assert_eq!(rejected("[1,2,3]").0, 0);
        assert_eq!(rejected(r#"{"content":{},"type":"HealthCheck"}"#).0, 0);
        assert_eq!(
            rejected(r#"{"content":{},"type":"HealthCheck","id":-2}"#).0,
            0
        );
        assert_eq!(
            rejected(r#"{"content":{},"type":"HealthCheck","id":2.5}"#).0,
            0
        );
        assert_eq!(rejected(r#"{"content":{},"id":2}"#).0, 2);
        assert_eq!(rejected(r#"{"content":{},"type":7,"id":2}"#).0, 2);
        let (id, error) = rejected(r#"{"content":{},"type":"Foo","id":6}"#);
        assert_eq!((id, error.as_str()), (6, r#"unknown message type "Foo""#));
        assert_eq!(rejected(r#"{"type":"UpscaleRequest","id":3}"#).0, 3);
        let long = format!(r#"{{"type":"{}","id":1}}"#, "x".repeat(100_000));
        assert!(rejected(&long).1.len() < 200);
    }

    #[test]
    fn agent_notifications_are_handled_even_when_malformed() {
        assert_eq!(
            handled(r#"{"content":{"error":"boom"},"type":"InternalError","id":8}"#).body,
            AgentBody::InternalError {
                error: "boom".into()
            }
        );
        let m = handled(r#"{"type":"InvalidMessage"}"#);
        assert_eq!(m.id, 0);
        assert!(matches!(m.body, AgentBody::InvalidMessage { .. }));
    }

    // ---- property tests: the decoder is total and its answers are sane ----

    fn valid_frames() -> Vec<String> {
        let mut v: Vec<String> = agent_literals()
            .into_iter()
            .map(|(t, _)| t.to_string())
            .collect();
        v.push(r#"{"content":{"error":"boom"},"type":"InternalError","id":8}"#.into());
        v.push(r#"{"min":1,"max":1}"#.into());
        v
    }

    #[derive(Clone, Debug)]
    enum Edit {
        Flip(usize, u8),
        Insert(usize, u8),
        Delete(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
            any::<usize>().prop_map(Edit::Delete),
        ]
    }

    fn mutate(base: &str, edits: &[Edit]) -> String {
        let mut bytes = base.as_bytes().to_vec();
        for e in edits {
            match *e {
                Edit::Flip(i, b) if !bytes.is_empty() => {
                    let i = i % bytes.len();
                    bytes[i] ^= b;
                }
                Edit::Insert(i, b) => {
                    let i = i % (bytes.len() + 1);
                    bytes.insert(i, b);
                }
                Edit::Delete(i) if !bytes.is_empty() => {
                    let i = i % bytes.len();
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        // Websocket text frames are UTF-8; axum rejects anything else before we see it.
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop_oneof![
                Just("HealthCheck".to_string()),
                Just("DownscaleRequest".to_string()),
                Just("UpscaleNotification".to_string()),
                Just("InvalidMessage".to_string()),
                Just("content".to_string()),
                ".{0,12}",
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("type".to_string()),
                            Just("id".to_string()),
                            Just("content".to_string()),
                            Just("target".to_string()),
                            Just("granted".to_string()),
                            Just("cpu".to_string()),
                            Just("mem".to_string()),
                            Just("error".to_string()),
                            "[a-z]{0,6}",
                        ],
                        inner
                    ),
                    0..6
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Checks the invariants every decision must satisfy.
    fn check_decision(text: &str) -> Result<(), TestCaseError> {
        match decode_inbound(text) {
            Decision::Reject { error, .. } => {
                prop_assert!(!error.is_empty());
                prop_assert!(error.len() <= MAX_ERROR_TEXT + 4);
            }
            Decision::Handle(m) => match m.body {
                AgentBody::DownscaleRequest { target: r }
                | AgentBody::UpscaleNotification { granted: r } => {
                    prop_assert!(r.cpu.is_finite() && r.cpu > 0.0 && r.cpu <= MAX_CPU);
                    prop_assert!(r.mem_bytes > 0 && r.mem_bytes <= MAX_MEM_BYTES);
                }
                _ => {}
            },
        }
        // The reply we would send must itself be a small, valid frame.
        if let Decision::Reject { id, error } = decode_inbound(text) {
            let reply = MonitorMessage::new(id, MonitorBody::InvalidMessage { error }).to_json();
            prop_assert!(serde_json::from_str::<Value>(&reply).is_ok());
            prop_assert!(reply.len() < 32 * 1024);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            check_decision(&s)?;
            let _ = negotiate(&s);
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            base in prop::sample::select(valid_frames()),
            edits in prop::collection::vec(edit(), 1..8),
        ) {
            let text = mutate(&base, &edits);
            check_decision(&text)?;
            let reply = negotiate(&text);
            prop_assert!(reply.version.is_some() != reply.error.is_some());
        }

        #[test]
        fn random_json_values_never_panic(v in json_value()) {
            check_decision(&v.to_string())?;
        }

        #[test]
        fn random_envelopes_decide(
            ty in prop_oneof![
                Just("HealthCheck"), Just("DownscaleRequest"), Just("UpscaleNotification"),
                Just("InvalidMessage"), Just("InternalError"), Just("Nope")
            ],
            id in prop_oneof![any::<u64>().prop_map(Value::from), json_value()],
            content in json_value(),
        ) {
            let frame = serde_json::json!({"content": content, "type": ty, "id": id});
            check_decision(&frame.to_string())?;
        }

        #[test]
        fn valid_allocations_are_accepted_exactly(
            cpu_milli in 1u64..=4_096_000,
            mem in 1u64..=MAX_MEM_BYTES,
            id in any::<u64>(),
            downscale in any::<bool>(),
        ) {
            let cpu = cpu_milli as f64 / 1000.0;
            let body = if downscale {
                AgentBody::DownscaleRequest { target: res(cpu, mem) }
            } else {
                AgentBody::UpscaleNotification { granted: res(cpu, mem) }
            };
            let msg = AgentMessage { id, body };
            let text = serde_json::to_string(&msg).unwrap();
            prop_assert_eq!(decode_inbound(&text), Decision::Handle(msg));
        }

        #[test]
        fn version_ranges_are_total(min in any::<u64>(), max in any::<u64>()) {
            let reply = negotiate(&format!(r#"{{"min":{min},"max":{max}}}"#));
            let overlaps = min <= max && min <= 1 && max >= 1;
            prop_assert_eq!(reply.version, overlaps.then_some(1));
            prop_assert_eq!(reply.error.is_some(), !overlaps);
        }
    }
}
