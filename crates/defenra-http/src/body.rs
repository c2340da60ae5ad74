//! Body types: the client's request body streamed to the origin under a size limit, and
//! the response body (the origin's, streamed, or a short local page).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use crate::origin::{OriginConn, OriginPool, PoolKey};
use crate::proxy::ExchangeSlots;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// What the proxy answers with: the origin's body as it arrives, or a local page.
pub(crate) type ResponseBody = Either<OriginBody, Full<Bytes>>;

/// The origin's response body on its way to the client. Polling it drives the origin
/// connection (no other task does); once the body is complete the connection goes back to
/// the pool. A body dropped before its end (the client went away) closes the connection.
/// It holds the exchange's slots (origin, client, connection) until then.
pub(crate) struct OriginBody {
    inner: Incoming,
    lease: Option<Lease>,
    _slots: ExchangeSlots,
}

/// The origin connection a response body arrives on, and where to return it.
pub(crate) struct Lease {
    pub(crate) conn: OriginConn,
    pub(crate) key: PoolKey,
    pub(crate) pool: Arc<OriginPool>,
}

impl OriginBody {
    pub(crate) fn new(inner: Incoming, lease: Lease, slots: ExchangeSlots) -> Self {
        OriginBody {
            inner,
            lease: Some(lease),
            _slots: slots,
        }
    }

    fn release_if_done(&mut self) {
        if self.inner.is_end_stream()
            && let Some(lease) = self.lease.take()
        {
            lease.pool.release(lease.key, lease.conn);
        }
    }
}

impl Drop for OriginBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may be dropped without a poll.
        self.release_if_done();
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(lease) = &mut this.lease {
            lease.conn.poll_drive(cx);
        }
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => {
                if let Some(lease) = this.lease.take() {
                    lease.pool.release(lease.key, lease.conn);
                }
            }
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A local response body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(bytes.into()))
}

/// The client's request body on its way to the origin. Frames pass through one by one, so
/// the origin's reading paces the client (backpressure); past `limit` bytes the stream
/// fails with [`BodyError::TooLarge`], which ends the origin request.
pub(crate) struct RequestBody {
    inner: Incoming,
    remaining: u64,
    /// Body bytes read so far, for the origin timeout to see that the upload moves, with
    /// [`BODY_DONE`] set once the body has ended.
    progress: Arc<AtomicU64>,
    /// Frames read ahead by [`RequestBody::fill`], passed on first.
    buffered: VecDeque<Frame<Bytes>>,
    /// Data bytes in `buffered`.
    buffered_bytes: usize,
    /// `inner` has ended (its last frame may still be in `buffered`).
    ended: bool,
}

/// The bit of [`RequestBody::progress`] that says the body has ended.
pub(crate) const BODY_DONE: u64 = 1 << 63;

impl RequestBody {
    pub(crate) fn new(inner: Incoming, limit: u64) -> Self {
        RequestBody {
            inner,
            remaining: limit,
            progress: Arc::default(),
            buffered: VecDeque::new(),
            buffered_bytes: 0,
            ended: false,
        }
    }

    /// Reads frames ahead until `want` data bytes are buffered or the body ends; they are
    /// passed on first when the body is polled.
    ///
    /// # Errors
    /// As the body's own frames: [`BodyError::TooLarge`] past the limit,
    /// [`BodyError::Client`] when the client's stream fails.
    pub(crate) async fn fill(&mut self, want: usize) -> Result<(), BodyError> {
        std::future::poll_fn(|cx| {
            while self.buffered_bytes < want && !self.ended {
                match self.poll_inner(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        self.buffered_bytes += frame.data_ref().map_or(0, Bytes::len);
                        self.buffered.push_back(frame);
                        self.ended = self.inner.is_end_stream();
                    }
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error)),
                    Poll::Ready(None) => self.ended = true,
                    Poll::Pending => return Poll::Pending,
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// The next frame of the client's stream, counted against the limit and in the
    /// progress.
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let size = data.len() as u64;
                    if size > self.remaining {
                        self.remaining = 0;
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    self.remaining -= size;
                    self.progress.fetch_add(size, Ordering::Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.progress.fetch_or(BODY_DONE, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(BodyError::Client(error)))),
            Poll::Ready(None) => {
                self.progress.fetch_or(BODY_DONE, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// A counter of the body bytes read, readable while the body is on its way; the
    /// [`BODY_DONE`] bit is set once it has ended.
    pub(crate) fn progress(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.progress)
    }
}

/// Why the request body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("request body is larger than the limit")]
    TooLarge,
    #[error("reading the request body failed: {0}")]
    Client(#[source] hyper::Error),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(frame) = this.buffered.pop_front() {
            this.buffered_bytes -= frame.data_ref().map_or(0, Bytes::len);
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        this.poll_inner(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered_bytes as u64;
        if self.ended {
            return SizeHint::with_exact(buffered);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(buffered));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}
