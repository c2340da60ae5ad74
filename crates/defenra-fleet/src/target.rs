//! Where Redis is: one server (`redis://`, `rediss://` with TLS, user and password,
//! database) or a Redis Cluster (several node URLs).

use redis::IntoConnectionInfo;

/// A Redis server or cluster, checked when parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://[user[:password]@]host[:port][/db]` or `rediss://...`.
    Single(String),
    /// Seed nodes of a Redis Cluster (the rest is discovered); credentials from the first.
    Cluster(Vec<String>),
}

/// Why a Redis URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error(
        "{url} is not a Redis URL (redis://[user:password@]host[:port][/db] or rediss://...): {reason}"
    )]
    Url { url: String, reason: String },
    #[error("--redis-cluster needs at least one node URL")]
    NoNodes,
}

impl RedisTarget {
    /// One server at `url`.
    ///
    /// # Errors
    ///
    /// [`TargetError::Url`] (with the password hidden) when it is not a Redis URL.
    pub fn single(url: &str) -> Result<RedisTarget, TargetError> {
        check(url)?;
        Ok(RedisTarget::Single(url.trim().to_owned()))
    }

    /// A cluster seeded by `urls`.
    ///
    /// # Errors
    ///
    /// As [`RedisTarget::single`] for any of them; [`TargetError::NoNodes`] for none.
    pub fn cluster<'u>(
        urls: impl IntoIterator<Item = &'u str>,
    ) -> Result<RedisTarget, TargetError> {
        let urls: Vec<String> = urls
            .into_iter()
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| check(url).map(|()| url.to_owned()))
            .collect::<Result<_, _>>()?;
        if urls.is_empty() {
            return Err(TargetError::NoNodes);
        }
        Ok(RedisTarget::Cluster(urls))
    }

    /// The URLs without passwords, for logs and `/health`.
    pub fn display(&self) -> String {
        match self {
            RedisTarget::Single(url) => redact(url),
            RedisTarget::Cluster(urls) => urls
                .iter()
                .map(|url| redact(url))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

fn check(url: &str) -> Result<(), TargetError> {
    let url = url.trim();
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    let parsed = if scheme_ok {
        url.into_connection_info()
            .map(|_| ())
            .map_err(|error| error.to_string())
    } else {
        Err("the scheme must be redis:// or rediss://".to_owned())
    };
    parsed.map_err(|reason| TargetError::Url {
        url: redact(url),
        reason,
    })
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_passwords() {
        let target = RedisTarget::single("redis://agent:s3cret@10.0.0.5:6380/2").expect("valid");
        assert_eq!(target.display(), "redis://agent:***@10.0.0.5:6380/2");
        assert!(RedisTarget::single("rediss://:pw@redis.example:6379").is_ok());
        assert_eq!(
            RedisTarget::single("rediss://:pw@redis.example:6379")
                .expect("valid")
                .display(),
            "rediss://:***@redis.example:6379"
        );
        let error = RedisTarget::single("http://user:pw@host").expect_err("scheme");
        assert!(!error.to_string().contains("pw@"), "{error}");
        assert!(RedisTarget::single("redis://host:notaport").is_err());
        let cluster =
            RedisTarget::cluster("redis://a:7000, redis://b:7001,".split(',')).expect("valid");
        assert_eq!(cluster.display(), "redis://a:7000,redis://b:7001");
        assert_eq!(RedisTarget::cluster([" "]), Err(TargetError::NoNodes));
    }
}
