//! Core's JSON document, field for field. Only this module knows Core's field names.
//!
//! Every struct ignores unknown fields and treats every field Core may omit (or send as
//! `null`) as an `Option`, so a newer Core never breaks an older agent. Nothing here is
//! validated: [`crate::compile`] turns these into the compiled model and collects issues.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The body of `POST /api/agent/poll`, and the format of `--config FILE`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PollResponse {
    /// `false` means Core refused the poll; the document is ignored.
    pub success: Option<bool>,
    pub message: Option<String>,
    pub timestamp: Option<String>,
    /// Seconds until the next poll, as Core would like it.
    pub next_poll_interval: Option<f64>,
    #[serde(deserialize_with = "null_as_default")]
    pub domains: Vec<Item<Domain>>,
    #[serde(deserialize_with = "null_as_default")]
    pub proxies: Vec<Item<Proxy>>,
    #[serde(deserialize_with = "null_as_default")]
    pub agents: Vec<Item<Agent>>,
}

/// One customer domain (a zone).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Domain {
    pub id: Option<String>,
    pub domain: Option<String>,
    pub description: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub dns_records: Vec<Item<DnsRecord>>,
    #[serde(deserialize_with = "null_as_default")]
    pub geo_dns_locations: Vec<GeoDnsLocation>,
    #[serde(deserialize_with = "null_as_default")]
    pub geo_dns_map: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_as_default")]
    pub geo_dns_fallback_map: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_as_default")]
    pub geo_dns_agent_pools: BTreeMap<String, Vec<PoolAgent>>,
    pub http_proxy: Option<HttpProxy>,
    pub ssl: Option<Ssl>,
    pub lua_code: Option<String>,
}

/// One DNS record, or (with a non-empty `locationCode`) one GeoDNS entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DnsRecord {
    pub id: Option<String>,
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
    pub ttl: Option<f64>,
    pub priority: Option<f64>,
    pub http_proxy_enabled: Option<bool>,
    pub location_code: Option<String>,
    pub is_fallback: Option<bool>,
    pub distance_km: Option<f64>,
    pub is_last_resort: Option<bool>,
    pub description: Option<String>,
}

/// A named location Core offers for GeoDNS (`{"code":"europe","type":"continent",...}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GeoDnsLocation {
    pub code: Option<String>,
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub subdomain: Option<String>,
}

/// One agent of a weighted GeoDNS pool.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolAgent {
    pub ip: Option<String>,
    pub weight: Option<f64>,
    pub load_score: Option<f64>,
    pub agent_id: Option<String>,
    pub agent_name: Option<String>,
}

/// `httpProxy`: whether and on which listeners the domain is proxied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpProxy {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub enabled: Option<bool>,
    /// `antiDDoS`; Core sends `null` until the Anti-DDoS tab is saved once.
    pub anti_d_do_s: Option<Item<AntiDdos>>,
}

/// `httpProxy.antiDDoS`: the domain's protection settings. Every field is decoded on its
/// own, so a string where a number belongs costs that field (an issue, the default used),
/// not the whole object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AntiDdos {
    pub enabled: Option<Item<bool>>,
    pub rate_limit: Option<Item<AntiDdosRateLimit>>,
    pub block_duration_seconds: Option<Item<f64>>,
    pub slowloris: Option<Item<AntiDdosSlowloris>>,
    pub js_challenge: Option<Item<AntiDdosJsChallenge>>,
    pub logging: Option<Item<AntiDdosLogging>>,
    pub ip_whitelist: Option<Item<StringList>>,
    pub proxy_ip_headers: Option<Item<StringList>>,
}

/// `antiDDoS.rateLimit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AntiDdosRateLimit {
    pub window_seconds: Option<Item<f64>>,
    pub max_requests: Option<Item<f64>>,
}

/// `antiDDoS.slowloris`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AntiDdosSlowloris {
    pub min_content_length: Option<Item<f64>>,
    pub max_header_timeout_seconds: Option<Item<f64>>,
    pub max_connections: Option<Item<f64>>,
}

/// `antiDDoS.jsChallenge`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AntiDdosJsChallenge {
    pub enabled: Option<Item<bool>>,
    pub cookie_name: Option<Item<String>>,
    pub ttl_seconds: Option<Item<f64>>,
}

/// `antiDDoS.logging`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AntiDdosLogging {
    pub enabled: Option<Item<bool>>,
}

/// A list of strings that Core's form may also send as one string (entries separated by
/// commas or newlines).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringList {
    One(String),
    Many(Vec<Item<String>>),
}

/// `ssl`: the domain's certificate and how the agent talks to the origin.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Ssl {
    pub enabled: Option<bool>,
    pub certificate: Option<String>,
    pub private_key: Option<String>,
    pub auto_renew: Option<bool>,
    pub encryption_mode: Option<String>,
    pub http_redirect_to_https: Option<bool>,
    pub acme_http_challenge: Option<AcmeHttpChallenge>,
}

/// A pending ACME HTTP-01 challenge Core wants answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AcmeHttpChallenge {
    pub token: Option<String>,
    pub key_authorization: Option<String>,
}

/// One TCP or UDP port forward.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Proxy {
    pub id: Option<String>,
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub source_port: Option<f64>,
    pub destination_host: Option<String>,
    pub destination_port: Option<f64>,
    pub enabled: Option<bool>,
    pub proxy_protocol: Option<bool>,
}

/// One edge agent of the network, as a GeoDNS candidate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Agent {
    pub agent_id: Option<String>,
    pub agent_name: Option<String>,
    pub agent_ip: Option<String>,
    pub country_code: Option<String>,
    pub city: Option<String>,
    pub load_score: Option<f64>,
}

/// The body of `GET /api/agent/connect/{token}`: the one-time enrolment answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectResponse {
    pub success: Option<bool>,
    pub message: Option<String>,
    pub config: Option<ConnectConfig>,
    pub auto_assignment: Option<AutoAssignment>,
    /// Set instead of the rest when Core refuses (with a 4xx or 5xx status).
    pub error: Option<String>,
}

/// `config` of a connect answer: the credentials the agent polls with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectConfig {
    pub agent_id: Option<String>,
    pub agent_key: Option<String>,
    pub polling_interval: Option<f64>,
    pub api_endpoint: Option<String>,
}

/// `autoAssignment` of a connect answer: the GeoDNS locations Core put the agent in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AutoAssignment {
    #[serde(deserialize_with = "null_as_default")]
    pub locations: Vec<String>,
    pub assigned_count: Option<f64>,
    /// Absent when no location matched the agent's address.
    pub message: Option<String>,
}

/// The body of `POST /api/statistics`: one resource's traffic since the last report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficReport {
    pub agent_id: String,
    /// `"domain"` or `"proxy"`.
    pub resource_type: String,
    /// Core's id of the domain or proxy (a MongoDB ObjectId).
    pub resource_id: String,
    /// Bytes received from clients.
    pub inbound_bytes: u64,
    /// Bytes sent to clients.
    pub outbound_bytes: u64,
    /// Requests (domains), connections (TCP proxies) or sessions (UDP proxies).
    pub requests: u64,
    /// Mean response time in milliseconds.
    pub response_time_ms: u64,
    pub errors: u64,
}

/// The body of `POST /api/clients`: one client address this agent served.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientReport {
    pub ip: String,
    pub agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Country name in English, as Core's own GeoIP lookups write it (`Germany`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// ISO 3166-1 alpha-2, upper case (`DE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country_code: Option<String>,
}

/// Core sends `null` for empty lists and maps; treat it as empty.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A list element that is decoded on its own, so one malformed record, domain or proxy
/// (a string where a number belongs) is reported and skipped instead of rejecting the
/// whole document.
#[derive(Debug, Clone)]
pub enum Item<T> {
    Valid(T),
    /// The element did not match the schema; `error` is serde's explanation.
    Invalid {
        error: String,
    },
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Item<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(match serde_json::from_value(value) {
            Ok(item) => Item::Valid(item),
            Err(error) => Item::Invalid {
                error: error.to_string(),
            },
        })
    }
}

impl<T: Serialize> Serialize for Item<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Item::Valid(item) => item.serialize(serializer),
            Item::Invalid { .. } => serializer.serialize_none(),
        }
    }
}

impl<T> From<T> for Item<T> {
    fn from(item: T) -> Self {
        Item::Valid(item)
    }
}
