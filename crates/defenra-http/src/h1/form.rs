//! The browser challenge's submit path on HTTP/1: the small form body is read whole (at most
//! `MAX_SUBMISSION_BYTES`, within the header timeout), then the proxy answers it itself.

use defenra_shield::challenge::MAX_SUBMISSION_BYTES;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::chunked::ChunkedScanner;
use super::head::Framing;
use super::timer::Timer;
use super::{Session, write_all_within};
use crate::access::AccessEntry;
use crate::edge::{FormBody, Submit};
use crate::proxy::note_local;

/// What the engine keeps of a submit's head once it is gone from the buffer.
pub(super) struct Framed {
    pub(super) framing: Framing,
    pub(super) minor: u8,
    pub(super) keep_alive: bool,
    pub(super) is_head: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before sending the body.
    pub(super) expects_continue: bool,
}

/// How reading a form body ended.
enum Read {
    Body(Vec<u8>),
    /// Longer than a challenge form can be: refused unread, and the connection closed.
    TooLarge,
    /// Malformed chunked framing.
    Broken,
    /// The client closed, or did not send the body within the header timeout.
    Gone,
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Reads the form body of `submit` and answers it. Returns whether the connection may
    /// carry another request.
    pub(super) async fn submit(
        &mut self,
        submit: &Submit,
        framed: Framed,
        entry: &mut Option<Box<AccessEntry>>,
        timer: &mut Timer,
    ) -> bool {
        // Answers to earlier pipelined requests go out before this one's body is read.
        if !self.flush_held().await {
            return false;
        }
        let read = self.read_form(&framed, timer).await;
        let (local, close) = match &read {
            Read::Body(body) => (
                self.conn.answer_submit(submit, FormBody::Read(body)),
                !framed.keep_alive,
            ),
            // The rest of the body would be read as the next request.
            Read::TooLarge => (self.conn.answer_submit(submit, FormBody::TooLarge), true),
            Read::Broken => (self.conn.answer_submit(submit, FormBody::Broken), true),
            Read::Gone => return false,
        };
        note_local(entry, &local);
        let keep_alive_10 = framed.keep_alive && framed.minor == 0 && !close;
        self.respond_local(&local, close, keep_alive_10, framed.is_head)
            .await
            && !close
    }

    async fn read_form(&mut self, framed: &Framed, timer: &mut Timer) -> Read {
        let mut left = match framed.framing {
            Framing::Length(length) if length > MAX_SUBMISSION_BYTES as u64 => {
                return Read::TooLarge;
            }
            Framing::Length(length) if length > 0 => length as usize,
            Framing::Chunked => 0,
            Framing::None | Framing::UntilClose | Framing::Length(_) => {
                return Read::Body(Vec::new());
            }
        };
        if framed.expects_continue && framed.minor == 1 && self.inbuf.is_empty() {
            // RFC 9110 §10.1.1: the client holds the body back until it hears from us.
            let limit = self.conn.service.options.keepalive_timeout;
            let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
            if write_all_within(&mut self.io, interim, limit)
                .await
                .is_err()
            {
                return Read::Gone;
            }
        }
        timer.set(Instant::now() + self.conn.header_timeout);
        let mut body = Vec::with_capacity(left.min(MAX_SUBMISSION_BYTES));
        let mut scanner = ChunkedScanner::default();
        loop {
            let available = self.inbuf.filled();
            if !available.is_empty() {
                if framed.framing == Framing::Chunked {
                    let scanned = scanner.scan(available, |range| {
                        body.extend_from_slice(&available[range]);
                    });
                    let Ok(used) = scanned else {
                        return Read::Broken;
                    };
                    self.inbuf.consume(used);
                    if body.len() > MAX_SUBMISSION_BYTES {
                        return Read::TooLarge;
                    }
                    if scanner.is_done() {
                        return Read::Body(body);
                    }
                } else {
                    let take = available.len().min(left);
                    body.extend_from_slice(&available[..take]);
                    self.inbuf.consume(take);
                    left -= take;
                    if left == 0 {
                        return Read::Body(body);
                    }
                }
            }
            let read = tokio::select! {
                biased;
                read = self.inbuf.read_from(&mut self.io) => read,
                () = timer.expired() => return Read::Gone,
            };
            match read {
                Ok(0) | Err(_) => return Read::Gone,
                Ok(_) => {}
            }
        }
    }
}
