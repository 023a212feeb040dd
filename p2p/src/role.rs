//! Hierarchy roles (`CoreRole`) and the runbook's aliases.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A node's role in the hierarchy. The runbook's Home is `Root`, a Worker is `Edge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The Home: policy authority for a workspace.
    Root,
    /// An intermediate tier.
    Regional,
    /// A worker (the default).
    #[default]
    Edge,
    /// A bridge to a broker.
    Connector,
    /// Read-only participant.
    Observer,
}

/// The canonical role names, in the order they are listed to users.
pub const CANONICAL: [&str; 5] = ["root", "regional", "edge", "connector", "observer"];

/// The input was neither a canonical role nor an alias.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown role {0:?}: expected one of root (alias home), regional, edge (alias worker), connector, observer"
)]
pub struct UnknownRole(pub String);

impl Role {
    /// The canonical, lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Regional => "regional",
            Role::Edge => "edge",
            Role::Connector => "connector",
            Role::Observer => "observer",
        }
    }

    /// Capability patterns the hierarchy layer denies to this role.
    pub fn denies(self) -> &'static [&'static str] {
        match self {
            Role::Root | Role::Regional | Role::Edge => &[],
            Role::Connector => &["memory:*", "models:*"],
            Role::Observer => &["queue:*", "task:*", "tools:*", "memory:*", "models:*"],
        }
    }
}

impl FromStr for Role {
    type Err = UnknownRole;

    /// Case-insensitive; accepts `home` for `root` and `worker` for `edge`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "root" | "home" => Ok(Role::Root),
            "regional" => Ok(Role::Regional),
            "edge" | "worker" => Ok(Role::Edge),
            "connector" => Ok(Role::Connector),
            "observer" => Ok(Role::Observer),
            _ => Err(UnknownRole(s.to_owned())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_table() {
        let table = [
            ("root", Role::Root),
            ("home", Role::Root),
            ("HOME", Role::Root),
            ("Regional", Role::Regional),
            ("edge", Role::Edge),
            ("worker", Role::Edge),
            ("Worker", Role::Edge),
            ("connector", Role::Connector),
            ("observer", Role::Observer),
        ];
        for (input, role) in table {
            assert_eq!(input.parse::<Role>(), Ok(role), "{input}");
        }
        for bad in ["", "admin", "roots", "home "] {
            // Surrounding whitespace is trimmed, so "home " is fine; the rest are refused.
            if bad == "home " {
                assert_eq!(bad.parse::<Role>(), Ok(Role::Root));
            } else {
                assert!(bad.parse::<Role>().is_err(), "{bad:?}");
            }
        }
    }

    #[test]
    fn canonical_names_round_trip() {
        for name in CANONICAL {
            let role: Role = name.parse().expect("canonical");
            assert_eq!(role.as_str(), name);
        }
    }
}
