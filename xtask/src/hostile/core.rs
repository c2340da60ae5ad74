//! A Defenra Core the suite controls, on a loopback port: `POST /api/agent/poll` gets the
//! current [`CoreAnswer`], which may be a document or a hostile body. Plain std: xtask
//! depends on no agent crate (`defenra_config::testing::FakeCore` is the in-tree one).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What a poll gets.
#[derive(Clone)]
pub(crate) enum CoreAnswer {
    /// 200 with this body and its `Content-Length`.
    Document(Arc<Vec<u8>>),
    /// 200, chunked, a JSON prefix followed by whitespace that never ends (until the agent
    /// hangs up, or 60 s).
    Endless,
    /// 200 with `Content-Length` of this many bytes, sent in full unless the agent hangs up.
    Declared(u64),
}

impl CoreAnswer {
    pub(crate) fn document(text: String) -> CoreAnswer {
        CoreAnswer::Document(Arc::new(text.into_bytes()))
    }
}

#[derive(Default)]
struct State {
    answer: Mutex<Option<CoreAnswer>>,
    polls: AtomicU64,
    /// Body bytes written for hostile answers.
    streamed: AtomicU64,
    stop: AtomicBool,
}

pub(crate) struct FakeCore {
    port: u16,
    state: Arc<State>,
}

impl FakeCore {
    pub(crate) fn start(answer: CoreAnswer) -> anyhow::Result<FakeCore> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            answer: Mutex::new(Some(answer)),
            ..State::default()
        });
        let accept_state = Arc::clone(&state);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if accept_state.stop.load(Relaxed) {
                    return;
                }
                let state = Arc::clone(&accept_state);
                thread::spawn(move || serve(stream, &state));
            }
        });
        Ok(FakeCore { port, state })
    }

    /// The base URL, as `--core-url` takes it.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub(crate) fn set(&self, answer: CoreAnswer) {
        *self.state.answer.lock().expect("core lock") = Some(answer);
    }

    pub(crate) fn polls(&self) -> u64 {
        self.state.polls.load(Relaxed)
    }

    /// Bytes of hostile bodies sent so far.
    pub(crate) fn streamed(&self) -> u64 {
        self.state.streamed.load(Relaxed)
    }
}

impl Drop for FakeCore {
    fn drop(&mut self) {
        self.state.stop.store(true, Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
    }
}

fn serve(mut stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    loop {
        // The request: head, then a Content-Length body (the agent's poll is small JSON).
        let mut buffered = Vec::new();
        let head_end = loop {
            if let Some(end) = super::net::find(&buffered, b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffered.extend_from_slice(&chunk[..n]),
            }
            if buffered.len() > 1024 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buffered[..head_end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buffered.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffered.extend_from_slice(&chunk[..n]),
            }
        }
        if !head.starts_with("post /api/agent/poll") {
            // Reports and anything else: accepted and ignored.
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"success\":true}")
                .is_err()
            {
                return;
            }
            continue;
        }
        state.polls.fetch_add(1, Relaxed);
        let answer = state.answer.lock().expect("core lock").clone();
        let keep_going = match answer {
            Some(CoreAnswer::Document(body)) => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).is_ok() && stream.write_all(&body).is_ok()
            }
            Some(CoreAnswer::Endless) => {
                endless(&mut stream, state);
                false
            }
            Some(CoreAnswer::Declared(length)) => {
                declared(&mut stream, state, length);
                false
            }
            None => false,
        };
        if !keep_going {
            return;
        }
    }
}

/// Streams a chunked body that never ends: `{"success":true,"domains":[` then spaces.
fn endless(stream: &mut TcpStream, state: &State) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let prefix = br#"{"success":true,"domains":["#;
    let mut chunk = format!("{:x}\r\n", prefix.len()).into_bytes();
    chunk.extend_from_slice(prefix);
    chunk.extend_from_slice(b"\r\n");
    if stream.write_all(&chunk).is_err() {
        return;
    }
    let spaces = vec![b' '; 64 * 1024];
    let mut chunk = format!("{:x}\r\n", spaces.len()).into_bytes();
    chunk.extend_from_slice(&spaces);
    chunk.extend_from_slice(b"\r\n");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) && !state.stop.load(Relaxed) {
        if stream.write_all(&chunk).is_err() {
            return;
        }
        state.streamed.fetch_add(spaces.len() as u64, Relaxed);
    }
}

/// Announces `length` bytes and sends them (a JSON prefix, then spaces).
fn declared(stream: &mut TcpStream, state: &State, length: u64) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let prefix = br#"{"success":true,"domains":["#;
    if stream.write_all(prefix).is_err() {
        return;
    }
    let mut left = length.saturating_sub(prefix.len() as u64);
    let spaces = vec![b' '; 64 * 1024];
    let started = Instant::now();
    while left > 0 && started.elapsed() < Duration::from_secs(60) && !state.stop.load(Relaxed) {
        let n = left.min(spaces.len() as u64) as usize;
        if stream.write_all(&spaces[..n]).is_err() {
            return;
        }
        state.streamed.fetch_add(n as u64, Relaxed);
        left -= n as u64;
    }
}
