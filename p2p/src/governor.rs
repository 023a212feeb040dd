//! The governor: a node's tuning profile and hints (`/admin/governor/*`). At the Home they are
//! also the workspace's routing hints, carried to every node in the policy document; a node's
//! effective hints are the Home's with its own on top.

use serde::{Deserialize, Serialize};

/// The hint names (what `/admin/governor/hints` accepts).
pub const HINT_FIELDS: [&str; 19] = [
    "max_concurrency",
    "event_buffer",
    "http_timeout_secs",
    "mode",
    "slo_ms",
    "retrieval_k",
    "retrieval_div",
    "mmr_lambda",
    "compression_aggr",
    "vote_k",
    "context_budget_tokens",
    "context_item_budget_tokens",
    "context_format",
    "include_provenance",
    "context_item_template",
    "context_header",
    "context_footer",
    "joiner",
    "offload",
];

/// Longest text a hint or profile name may hold.
pub const MAX_TEXT: usize = 1024;

/// Tuning hints. Every field is optional; setting hints merges the fields given. Unknown fields
/// are ignored when read (a newer Home may send hints this node does not know); the API refuses
/// them (see [`Hints::from_request`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Hints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_buffer: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval_div: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmr_lambda: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_aggr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_budget_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_item_budget_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_provenance: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_item_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_footer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joiner: Option<String>,
    /// Whether the Home gives `/actions` jobs to workers: `never`, `auto` (when its own slots
    /// are taken; the default) or `prefer` (whenever a worker can take them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<String>,
}

macro_rules! overlay {
    ($base:expr, $top:expr, $($field:ident),+) => {
        $( if $top.$field.is_some() { $base.$field = $top.$field.clone(); } )+
    };
}

impl Hints {
    /// `self` with every field `top` sets replaced by `top`'s value.
    pub fn overlaid(&self, top: &Hints) -> Hints {
        let mut out = self.clone();
        overlay!(
            out,
            top,
            max_concurrency,
            event_buffer,
            http_timeout_secs,
            mode,
            slo_ms,
            retrieval_k,
            retrieval_div,
            mmr_lambda,
            compression_aggr,
            vote_k,
            context_budget_tokens,
            context_item_budget_tokens,
            context_format,
            include_provenance,
            context_item_template,
            context_header,
            context_footer,
            joiner,
            offload
        );
        out
    }

    /// No field set.
    pub fn is_empty(&self) -> bool {
        *self == Hints::default()
    }

    /// Reads hints an operator sent: an object of known names with values of the right type,
    /// texts at most [`MAX_TEXT`] long. `Err` says what is wrong.
    pub fn from_request(body: serde_json::Value) -> Result<Hints, String> {
        let serde_json::Value::Object(map) = &body else {
            return Err("hints must be a JSON object".into());
        };
        if let Some(unknown) = map.keys().find(|k| !HINT_FIELDS.contains(&k.as_str())) {
            return Err(format!("unknown hint {unknown:?}; known: {}", HINT_FIELDS.join(", ")));
        }
        if let Some((name, _)) =
            map.iter().find(|(_, v)| v.as_str().is_some_and(|t| t.len() > MAX_TEXT))
        {
            return Err(format!("hint {name:?} is longer than {MAX_TEXT} bytes"));
        }
        let hints: Hints = serde_json::from_value(body).map_err(|e| e.to_string())?;
        if hints.offload.as_deref().is_some_and(|o| !["never", "auto", "prefer"].contains(&o)) {
            return Err("offload must be never, auto or prefer".into());
        }
        Ok(hints)
    }
}

/// A node's governor settings (`governor.json`), and the Home's routing hints in its policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Governor {
    /// The profile name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The hints.
    #[serde(default, skip_serializing_if = "Hints::is_empty")]
    pub hints: Hints,
}

impl Governor {
    /// Neither profile nor hints.
    pub fn is_empty(&self) -> bool {
        self.profile.is_none() && self.hints.is_empty()
    }

    /// The settings in effect on a node holding `self` whose Home says `home`: the Home's,
    /// with the node's own on top.
    pub fn effective(&self, home: Option<&Governor>) -> Governor {
        let Some(home) = home else { return self.clone() };
        Governor {
            profile: self.profile.clone().or_else(|| home.profile.clone()),
            hints: home.hints.overlaid(&self.hints),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_settings_win_over_the_home_s_field_by_field() {
        let home = Governor {
            profile: Some("balanced".into()),
            hints: Hints { slo_ms: Some(200), mode: Some("fast".into()), ..Hints::default() },
        };
        let own = Governor { profile: None, hints: Hints { slo_ms: Some(50), ..Hints::default() } };
        let effective = own.effective(Some(&home));
        assert_eq!(effective.profile.as_deref(), Some("balanced"));
        assert_eq!(
            (effective.hints.slo_ms, effective.hints.mode.as_deref()),
            (Some(50), Some("fast"))
        );
        assert_eq!(own.effective(None), own);
        assert!(Hints::from_request(serde_json::json!({"slo": 1})).is_err(), "unknown names");
        assert!(Hints::from_request(serde_json::json!({"slo_ms": "x"})).is_err(), "wrong type");
        let long = "x".repeat(MAX_TEXT + 1);
        assert!(Hints::from_request(serde_json::json!({"joiner": long})).is_err(), "too long");
        let lenient: Hints = serde_json::from_str(r#"{"slo_ms":1,"future_hint":2}"#).expect("wire");
        assert_eq!(lenient.slo_ms, Some(1), "a newer Home's unknown hints are ignored on the wire");
    }
}
