//! Node identifiers: one validated type, one resolver used by every component.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted node id.
pub const MAX_LEN: usize = 64;

/// A node id matching `^[A-Za-z0-9_-]{1,64}$`.
///
/// The alphabet keeps ids safe as NATS subject tokens, file names and log fields.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct NodeId(String);

/// Why a string is not a valid node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {0:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'")]
pub struct InvalidNodeId(pub String);

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

impl NodeId {
    /// Validates `s` as a node id.
    pub fn parse(s: &str) -> Result<Self, InvalidNodeId> {
        if s.is_empty() || s.len() > MAX_LEN || !s.chars().all(allowed) {
            return Err(InvalidNodeId(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// Turns an arbitrary host name into a valid id: invalid characters become `-`,
    /// the result is cut to [`MAX_LEN`]; an empty name yields `None`.
    pub fn sanitize(name: &str) -> Option<Self> {
        let cleaned: String =
            name.trim().chars().map(|c| if allowed(c) { c } else { '-' }).take(MAX_LEN).collect();
        (!cleaned.is_empty()).then_some(Self(cleaned))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NodeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where the effective node id came from, highest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdSource {
    /// `ARW_NODE_ID`.
    Env,
    /// `[cluster] node_id`.
    Config,
    /// Assigned by an operator's hello and persisted.
    Hello,
    /// The sanitised host name.
    Hostname,
    /// Nothing else was available.
    Fallback,
}

impl IdSource {
    /// An explicit id (env or config) cannot be changed by a hello.
    pub fn is_explicit(self) -> bool {
        matches!(self, IdSource::Env | IdSource::Config)
    }
}

/// Resolves the node id: `ARW_NODE_ID` > `[cluster].node_id` > hello-assigned > hostname > `"local"`.
///
/// Explicit ids are validated by the caller (an invalid one is a start-up error); the host name is
/// sanitised.
pub fn resolve(
    env: Option<NodeId>,
    config: Option<NodeId>,
    hello: Option<NodeId>,
    hostname: Option<&str>,
) -> (NodeId, IdSource) {
    if let Some(id) = env {
        return (id, IdSource::Env);
    }
    if let Some(id) = config {
        return (id, IdSource::Config);
    }
    if let Some(id) = hello {
        return (id, IdSource::Hello);
    }
    if let Some(id) = hostname.and_then(NodeId::sanitize) {
        return (id, IdSource::Hostname);
    }
    (NodeId("local".into()), IdSource::Fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet_only() {
        assert!(NodeId::parse("worker-gpu-01").is_ok());
        assert!(NodeId::parse("A_b-9").is_ok());
        assert!(NodeId::parse(&"x".repeat(64)).is_ok());
        for bad in ["", "a.b", "a b", "a>b", "é", &"x".repeat(65)] {
            assert!(NodeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hostnames_are_sanitised() {
        let id = NodeId::sanitize("box.lan").map(|i| i.to_string());
        assert_eq!(id.as_deref(), Some("box-lan"));
        assert!(NodeId::sanitize("  ").is_none());
    }

    #[test]
    fn precedence_is_env_config_hello_hostname_local() {
        let id = |s| NodeId::parse(s).ok();
        assert_eq!(resolve(id("e"), id("c"), id("h"), Some("host")).1, IdSource::Env);
        assert_eq!(resolve(None, id("c"), id("h"), Some("host")).1, IdSource::Config);
        assert_eq!(resolve(None, None, id("h"), Some("host")).1, IdSource::Hello);
        assert_eq!(resolve(None, None, None, Some("host")).0.as_str(), "host");
        assert_eq!(resolve(None, None, None, None).0.as_str(), "local");
    }
}
