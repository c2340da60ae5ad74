//! Test support for this crate's users: [`FakeCore`], a Defenra Core that answers
//! `POST /api/agent/poll` with whatever a test tells it to, on a loopback port.
//!
//! Enabled by the `testing` feature; never part of the agent binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpListener;

/// What the fake Core answers.
#[derive(Clone)]
pub enum Answer {
    Json(String),
    Status(u16),
    Garbage,
    /// Never answers within any sane timeout.
    Hang,
}

/// One request the fake Core received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: serde_json::Value,
}

/// A Core that answers `POST /api/agent/poll` with whatever it is told to.
pub struct FakeCore {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeCore {
    /// Starts the fake Core on `127.0.0.1:0`.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound.
    pub async fn start(answer: Answer) -> FakeCore {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let answer = Arc::new(Mutex::new(answer));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (answer_task, received_task) = (Arc::clone(&answer), Arc::clone(&received));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (answer, received) = (Arc::clone(&answer_task), Arc::clone(&received_task));
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (answer, received) = (Arc::clone(&answer), Arc::clone(&received));
                        async move { Ok::<_, Infallible>(respond(request, &answer, &received).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeCore {
            addr,
            answer,
            received,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().clone()
    }
}

async fn respond(
    request: Request<Incoming>,
    answer: &Mutex<Answer>,
    received: &Mutex<Vec<Received>>,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let (path, authorization, content_type) = (
        request.uri().path().to_owned(),
        header("authorization"),
        header("content-type"),
    );
    let body = request
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    received.lock().push(Received {
        path,
        authorization,
        content_type,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    });
    let current = answer.lock().clone();
    let (status, body) = match current {
        Answer::Json(json) => (200, json.into_bytes()),
        Answer::Status(status) => (status, b"internal trouble".to_vec()),
        Answer::Garbage => (200, b"<html>\x00\x01 not json".to_vec()),
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (200, Vec::new())
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}
