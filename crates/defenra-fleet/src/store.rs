//! The fleet's state in Redis: key names, connections (one server or a cluster), and the
//! commands and scripts that read and write it.
//!
//! Keys (`P` is the prefix, `defenra:` by default):
//! - `P{bans}`: hash, prefix (`203.0.113.7/32`) → JSON [`BanRecord`];
//! - `P{bans}:expiry`: sorted set, prefix → Unix second it ends (`+inf` without expiry);
//! - `P{bans}:lifted`: sorted set, prefix → Unix second it was unbanned (kept one day, so an
//!   agent that was away does not publish a lifted ban again);
//! - `Pshield-key`: the fleet's challenge key, 64 hex digits (set once with `SET NX`);
//! - `Pdict:DOMAIN:KEY`: one `ngx.shared.fleet` entry (numbers as decimal text, strings as
//!   `s:` and the bytes, booleans as `b:1`/`b:0`), with its TTL;
//! - `Pevents`: the pub/sub channel (`message.rs`).
//!
//! The three ban keys share the hash tag `{bans}`, so a script can touch them together on a
//! Redis Cluster; each script also drops the bans that ended and sets the keys to expire
//! with their last ban, so Redis holds no more than the active state.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::target::RedisTarget;

/// A connection for commands: one server's multiplexed connection or a cluster's.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Connects for commands, and subscribes a second connection to `channel` (on a cluster:
/// to the first node that answers; Redis Cluster forwards every `PUBLISH` to every node).
pub(crate) async fn connect(
    target: &RedisTarget,
    timeout: Duration,
    channel: &str,
) -> RedisResult<(Conn, redis::aio::PubSubStream)> {
    let bounded = |error: tokio::time::error::Elapsed| {
        redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            error.to_string(),
        ))
    };
    let (conn, subscriber_urls) = match target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str())?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            (Conn::Single(conn), vec![url.clone()])
        }
        RedisTarget::Cluster(urls) => {
            let client = redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            let conn = tokio::time::timeout(timeout * 2, client.get_async_connection())
                .await
                .map_err(bounded)??;
            (Conn::Cluster(conn), urls.clone())
        }
    };
    let mut last_error = None;
    for url in subscriber_urls {
        let attempt = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            RedisResult::Ok(pubsub.into_on_message())
        };
        match tokio::time::timeout(timeout, attempt)
            .await
            .map_err(bounded)
        {
            Ok(Ok(stream)) => return Ok((conn, stream)),
            Ok(Err(error)) | Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        redis::RedisError::from(std::io::Error::other("no node to subscribe on"))
    }))
}

/// Key and channel names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) bans: String,
    pub(crate) ban_expiry: String,
    pub(crate) lifted: String,
    pub(crate) shield_key: String,
    pub(crate) channel: String,
    dict: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys {
            bans: format!("{prefix}{{bans}}"),
            ban_expiry: format!("{prefix}{{bans}}:expiry"),
            lifted: format!("{prefix}{{bans}}:lifted"),
            shield_key: format!("{prefix}shield-key"),
            channel: format!("{prefix}events"),
            dict: format!("{prefix}dict:"),
        }
    }

    /// `Pdict:DOMAIN:KEY`.
    pub(crate) fn dict(&self, domain: &str, key: &[u8]) -> Vec<u8> {
        let mut name = Vec::with_capacity(self.dict.len() + domain.len() + 1 + key.len());
        name.extend_from_slice(self.dict.as_bytes());
        name.extend_from_slice(domain.as_bytes());
        name.push(b':');
        name.extend_from_slice(key);
        name
    }
}

/// How long a lifted ban is remembered.
pub(crate) const LIFTED_KEPT: Duration = Duration::from_secs(86_400);

/// Stores bans, forgets bans that ended and lifts of the same prefixes, and makes the keys
/// expire with their last ban. KEYS: bans, expiry, lifted; ARGV: now, then for each ban its
/// prefix, record JSON and end (Unix second or `+inf`).
pub(crate) const BAN_SCRIPT: &str = r"
for i = 2, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
end
local ended = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, prefix in ipairs(ended) do redis.call('HDEL', KEYS[1], prefix) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if last[2] == nil then return 0 end
if last[2] == 'inf' then
  redis.call('PERSIST', KEYS[1]); redis.call('PERSIST', KEYS[2])
else
  redis.call('EXPIREAT', KEYS[1], last[2]); redis.call('EXPIREAT', KEYS[2], last[2])
end
return 1
";

/// Bans stored by one run of [`BAN_SCRIPT`]: a resynchronisation of a long list goes in
/// batches, so no single script holds Redis for long.
pub(crate) const BANS_PER_SCRIPT: usize = 500;

/// Lifts a ban and remembers the lift for a day. KEYS: bans, expiry, lifted; ARGV:
/// prefix, now, seconds a lift is kept.
pub(crate) const UNBAN_SCRIPT: &str = r"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2] - ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
";

/// `incr` with OpenResty's `init`: a missing key starts at `init` (none: nothing happens)
/// with `init_ttl`; the TTL of an existing key stays. Returns the new value and the TTL in
/// milliseconds (-1: none), or nil (missing without `init`, or not a number).
/// KEYS: the key; ARGV: delta, init (empty: none), init TTL in ms (0: none).
pub(crate) const INCR_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '' then return false end
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
end
local value = redis.pcall('INCRBYFLOAT', KEYS[1], ARGV[1])
if type(value) == 'table' and value.err then return false end
return {value, redis.call('PTTL', KEYS[1])}
";

/// A dictionary value as Redis stores it.
pub(crate) fn encode_value(value: &defenra_waf::DictValue) -> Vec<u8> {
    match value {
        defenra_waf::DictValue::Number(number) => format!("{number}").into_bytes(),
        defenra_waf::DictValue::Bool(true) => b"b:1".to_vec(),
        defenra_waf::DictValue::Bool(false) => b"b:0".to_vec(),
        defenra_waf::DictValue::Str(bytes) => {
            let mut stored = Vec::with_capacity(2 + bytes.len());
            stored.extend_from_slice(b"s:");
            stored.extend_from_slice(bytes);
            stored
        }
    }
}

/// The value of stored bytes: `s:`/`b:` tagged, else a number, else (written by someone
/// else) the bytes as a string.
pub(crate) fn decode_value(stored: &[u8]) -> defenra_waf::DictValue {
    match stored {
        [b's', b':', rest @ ..] => defenra_waf::DictValue::Str(rest.into()),
        b"b:1" => defenra_waf::DictValue::Bool(true),
        b"b:0" => defenra_waf::DictValue::Bool(false),
        _ => std::str::from_utf8(stored)
            .ok()
            .and_then(|text| text.parse::<f64>().ok())
            .map_or_else(
                || defenra_waf::DictValue::Str(stored.into()),
                defenra_waf::DictValue::Number,
            ),
    }
}

/// A PTTL answer as a TTL for the dictionary: milliseconds, 0 for none.
pub(crate) fn ttl_from_pttl(pttl: i64) -> u64 {
    u64::try_from(pttl).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use defenra_waf::DictValue;

    use super::*;

    #[test]
    fn values_keep_their_type_through_redis() {
        for value in [
            DictValue::Number(42.0),
            DictValue::Number(-0.25),
            DictValue::Bool(true),
            DictValue::Bool(false),
            DictValue::Str(Box::from(&b"12"[..])),
            DictValue::Str(Box::from(&b"\xff\x00binary"[..])),
        ] {
            assert_eq!(decode_value(&encode_value(&value)), value);
        }
        assert_eq!(encode_value(&DictValue::Number(3.0)), b"3");
        assert_eq!(decode_value(b"7.5"), DictValue::Number(7.5));
        assert_eq!(
            decode_value(b"plain"),
            DictValue::Str(Box::from(&b"plain"[..]))
        );
    }

    #[test]
    fn ban_keys_share_one_cluster_slot_and_dict_keys_are_per_domain() {
        let keys = Keys::new("defenra:");
        for key in [&keys.bans, &keys.ban_expiry, &keys.lifted] {
            assert!(key.starts_with("defenra:{bans}"), "{key}");
        }
        assert_eq!(keys.dict("a.test", b"hits"), b"defenra:dict:a.test:hits");
        assert_ne!(keys.dict("a.test", b"x"), keys.dict("b.test", b"x"));
        assert_eq!(keys.channel, "defenra:events");
    }
}
