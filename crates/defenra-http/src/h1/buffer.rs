//! A read buffer: bytes received but not yet used sit between `start` and `end`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

pub(crate) struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    pub(crate) fn new(capacity: usize) -> Self {
        Buffer {
            data: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// The bytes received and not consumed yet.
    pub(crate) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Drops the first `n` received bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for the next read, moving the received bytes to the front when the room at
    /// the end is gone. Empty only when the buffer is full of unconsumed bytes.
    fn spare(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    /// Whether a read has room (after moving the received bytes to the front).
    pub(crate) fn has_room(&mut self) -> bool {
        !self.spare().is_empty()
    }

    /// Doubles the capacity, up to `max`. False when it is at `max` already.
    pub(crate) fn grow(&mut self, max: usize) -> bool {
        if self.data.len() >= max {
            return false;
        }
        let size = (self.data.len() * 2).max(1024).min(max);
        self.data.resize(size, 0);
        true
    }

    /// Reads once from `reader` into the room at the end. `Ok(0)`: end of stream (or no
    /// room, which callers check first).
    pub(crate) fn poll_read_from<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<usize>> {
        let spare = self.spare();
        if spare.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut read = ReadBuf::new(spare);
        match Pin::new(reader).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads once from `reader`.
    pub(crate) async fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_from(cx, reader)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_move_to_the_front_when_the_end_is_reached() {
        let mut buffer = Buffer::new(8);
        let mut source: &[u8] = b"abcdefghijkl";
        assert_eq!(buffer.read_from(&mut source).await.unwrap(), 8);
        buffer.consume(6);
        assert_eq!(buffer.filled(), b"gh");
        assert_eq!(buffer.read_from(&mut source).await.unwrap(), 4);
        assert_eq!(buffer.filled(), b"ghijkl");
        buffer.consume(6);
        assert!(buffer.is_empty());
        assert!(buffer.grow(4096));
        assert_eq!(buffer.capacity(), 1024);
        assert!(buffer.grow(4096));
        assert_eq!(buffer.capacity(), 2048);
        assert!(buffer.grow(3000));
        assert_eq!(buffer.capacity(), 3000);
        assert!(!buffer.grow(3000));
    }
}
