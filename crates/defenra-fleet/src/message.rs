//! What travels on the fleet's pub/sub channel (`PREFIXevents`): one JSON object per
//! message, with the sender's id and clock, and any of the kinds below. Unknown fields are
//! ignored, so an agent of a later version can add some.

use serde::{Deserialize, Serialize};

/// One message. Empty lists are left out.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Event {
    /// The sending agent's id.
    pub(crate) from: String,
    /// Its Unix time in milliseconds when it published (for the lag).
    pub(crate) at: u64,
    /// Bans made (or extended) on the sender.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) bans: Vec<BanRecord>,
    /// Prefixes whose bans the sender lifted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) unbans: Vec<String>,
    /// Requests the sender allowed per (domain, address) since its previous message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) counts: Vec<(String, String, u32)>,
    /// Blocks the sender decided: (domain, address, Unix second of the end).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) blocks: Vec<(String, String, u64)>,
    /// `ngx.shared.fleet` values after the sender's changes: (domain, key in base64, value
    /// as stored in Redis in base64 or `null` for none, TTL in milliseconds, 0 for none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) dict: Vec<(String, String, Option<String>, u64)>,
    /// The fleet's shield key changed (its fingerprint): fetch it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
}

impl Event {
    pub(crate) fn is_empty(&self) -> bool {
        self.bans.is_empty()
            && self.unbans.is_empty()
            && self.counts.is_empty()
            && self.blocks.is_empty()
            && self.dict.is_empty()
            && self.key.is_none()
    }
}

/// A ban as published and as stored in the ban hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BanRecord {
    /// `203.0.113.7/32`.
    pub(crate) cidr: String,
    pub(crate) reason: String,
    /// Where it was made (`escalation`, `operator`).
    #[serde(default)]
    pub(crate) source: String,
    /// Unix second it ends; `None` lasts until unbanned.
    pub(crate) expires_at: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_leave_empty_lists_out() {
        let event = Event {
            from: "a1".into(),
            at: 5,
            counts: vec![("shop.test".into(), "192.0.2.7".into(), 3)],
            ..Event::default()
        };
        let text = serde_json::to_string(&event).expect("serialises");
        assert_eq!(
            text,
            r#"{"from":"a1","at":5,"counts":[["shop.test","192.0.2.7",3]]}"#
        );
        let back: Event =
            serde_json::from_str(r#"{"from":"b","at":1,"future":true,"key":"ab12cd34"}"#)
                .expect("unknown fields are ignored");
        assert_eq!(back.key.as_deref(), Some("ab12cd34"));
        assert!(!back.is_empty());
        assert!(Event::default().is_empty());
    }
}
