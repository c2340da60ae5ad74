//! Where configuration documents come from: a local file or Defenra Core.
//!
//! A source fetches bytes; it never interprets them. Both go through the same
//! [`crate::compile`], so file and Core config cannot drift apart.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

/// Where configuration documents come from. A source fetches; it never interprets.
#[async_trait]
pub trait ConfigSource: Send + Sync {
    /// `"file"` or `"core"`, for logs and `/stats`.
    fn kind(&self) -> &'static str;

    /// The newest document, or `Ok(None)` when nothing changed since the last call.
    ///
    /// # Errors
    ///
    /// [`SourceError`] when the document could not be fetched at all.
    async fn fetch(&self) -> Result<Option<Bytes>, SourceError>;

    /// Forget what was fetched, so the next [`fetch`](Self::fetch) returns the document
    /// even when it looks unchanged (SIGHUP). Does nothing by default.
    fn invalidate(&self) {}
}

/// Why a fetch failed. The previous snapshot stays in force.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("cannot read config file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("core answered HTTP {status}: {excerpt:?}")]
    Status { status: u16, excerpt: String },
    #[error("core request to {url} failed: {message}")]
    Transport { url: String, message: String },
}

/// `--config FILE`: the same JSON schema Core sends, re-read when the file changes.
pub struct FileSource {
    path: PathBuf,
    /// Modification time and length of the last document returned, so an unchanged file
    /// is not re-read on every check.
    last: Mutex<Option<(SystemTime, u64)>>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource {
            path: path.into(),
            last: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl ConfigSource for FileSource {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn fetch(&self) -> Result<Option<Bytes>, SourceError> {
        let file_error = |source| SourceError::File {
            path: self.path.clone(),
            source,
        };
        let metadata = tokio::fs::metadata(&self.path).await.map_err(file_error)?;
        let stamp = (
            metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            metadata.len(),
        );
        if *self.last.lock() == Some(stamp) {
            return Ok(None);
        }
        let bytes = tokio::fs::read(&self.path).await.map_err(file_error)?;
        *self.last.lock() = Some(stamp);
        Ok(Some(Bytes::from(bytes)))
    }

    fn invalidate(&self) {
        *self.last.lock() = None;
    }
}

/// Settings for [`CoreSource`].
#[derive(Debug, Clone)]
pub struct CoreSourceOptions {
    /// Base URL of Core, e.g. `https://core.example.net`; `/api/agent/poll` is appended.
    pub url: String,
    pub agent_id: String,
    pub agent_key: String,
    /// Bounds the whole request, connect to last byte.
    pub timeout: Duration,
    /// Largest accepted body.
    pub max_body: u64,
}

impl CoreSourceOptions {
    pub fn new(
        url: impl Into<String>,
        agent_id: impl Into<String>,
        agent_key: impl Into<String>,
    ) -> Self {
        CoreSourceOptions {
            url: url.into(),
            agent_id: agent_id.into(),
            agent_key: agent_key.into(),
            timeout: Duration::from_secs(30),
            max_body: 256 * 1024 * 1024,
        }
    }
}

/// Polls Defenra Core: `POST {url}/api/agent/poll` with the agent's Bearer key.
///
/// Each fetch runs ureq on a blocking thread. Redirects are not followed, so the key is
/// never sent anywhere but the configured URL.
pub struct CoreSource {
    /// Shared with the blocking thread of each fetch.
    inner: Arc<CoreClient>,
}

struct CoreClient {
    options: CoreSourceOptions,
    poll_url: String,
    agent: ureq::Agent,
}

impl CoreSource {
    pub fn new(options: CoreSourceOptions) -> Self {
        let poll_url = format!("{}/api/agent/poll", options.url.trim_end_matches('/'));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(options.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("defenra-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        CoreSource {
            inner: Arc::new(CoreClient {
                options,
                poll_url,
                agent,
            }),
        }
    }
}

impl CoreClient {
    fn fetch_blocking(&self) -> Result<Bytes, SourceError> {
        let transport = |message: String| SourceError::Transport {
            url: self.poll_url.clone(),
            message,
        };
        let body = serde_json::json!({
            "agentId": self.options.agent_id,
            "agentKey": self.options.agent_key,
        })
        .to_string();
        let mut response = self
            .agent
            .post(&self.poll_url)
            .header(
                "Authorization",
                format!("Bearer {}", self.options.agent_key),
            )
            .header("Accept", "application/json")
            .content_type("application/json")
            .send(body)
            .map_err(|error| transport(error.to_string()))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let mut excerpt = Vec::new();
            let _ = response
                .body_mut()
                .as_reader()
                .take(200)
                .read_to_end(&mut excerpt);
            return Err(SourceError::Status {
                status,
                excerpt: String::from_utf8_lossy(&excerpt).into_owned(),
            });
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(self.options.max_body)
            .read_to_vec()
            .map_err(|error| transport(format!("reading the body: {error}")))?;
        Ok(Bytes::from(bytes))
    }
}

#[async_trait]
impl ConfigSource for CoreSource {
    fn kind(&self) -> &'static str {
        "core"
    }

    async fn fetch(&self) -> Result<Option<Bytes>, SourceError> {
        // ureq is blocking: run it on the blocking pool, never on a runtime worker.
        let client = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || client.fetch_blocking()).await {
            Ok(result) => result.map(Some),
            Err(join_error) => Err(SourceError::Transport {
                url: self.inner.poll_url.clone(),
                message: format!("poll task failed: {join_error}"),
            }),
        }
    }
}
