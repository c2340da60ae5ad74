//! Where configuration documents come from: a local file or Defenra Core.
//!
//! A source fetches bytes; it never interprets them. Both go through the same
//! [`crate::compile`], so file and Core config cannot drift apart.

use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
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

/// Largest configuration document read from a file (`--config`, the state dir's last good
/// copy), the same as Core's default body limit ([`CoreSourceOptions::max_body`]). A
/// million-record document is about 100 MB of JSON.
pub const MAX_DOCUMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Reads a configuration document from `path`, blocking: a regular file (symbolic links
/// followed) of at most `max_bytes`. Anything else is refused before it is read: a FIFO
/// would block the reader until a writer comes, a device such as `/dev/zero` never ends.
/// The file is opened without blocking and checked again through the open handle, so a
/// path swapped between the two checks is refused too.
///
/// # Errors
///
/// `InvalidInput` for a file that is not regular or is too large (the message says which),
/// and any I/O error.
pub fn read_document(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    check_document_file(&std::fs::metadata(path)?, max_bytes)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    check_document_file(&metadata, max_bytes)?;
    let mut doc = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut doc)?;
    if doc.len() as u64 > max_bytes {
        return Err(too_large(doc.len() as u64, max_bytes));
    }
    Ok(doc)
}

fn check_document_file(metadata: &std::fs::Metadata, max_bytes: u64) -> io::Result<()> {
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_char_device() || file_type.is_block_device() {
            "a device"
        } else if file_type.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{kind}, not a regular file"),
        ));
    }
    if metadata.len() > max_bytes {
        return Err(too_large(metadata.len(), max_bytes));
    }
    Ok(())
}

fn too_large(length: u64, max_bytes: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{length} bytes or more, over the limit of {max_bytes}"),
    )
}

/// `--config FILE`: the same JSON schema Core sends, re-read when the file changes.
pub struct FileSource {
    path: PathBuf,
    /// Largest document read; larger files and files that are not regular are refused.
    max_bytes: u64,
    /// Modification time and length of the last document returned, so an unchanged file
    /// is not re-read on every check.
    last: Mutex<Option<(SystemTime, u64)>>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource {
            path: path.into(),
            max_bytes: MAX_DOCUMENT_BYTES,
            last: Mutex::new(None),
        }
    }

    /// Refuses documents larger than `max_bytes` (default [`MAX_DOCUMENT_BYTES`]).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
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
        // On the blocking pool: a large file must not hold a runtime worker.
        let path = self.path.clone();
        let max_bytes = self.max_bytes;
        let bytes = tokio::task::spawn_blocking(move || read_document(&path, max_bytes))
            .await
            .unwrap_or_else(|join_error| Err(io::Error::other(join_error)))
            .map_err(file_error)?;
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
