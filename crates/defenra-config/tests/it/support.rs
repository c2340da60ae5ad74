//! Shared helpers: a fake Core, a recording service, small documents, `eventually`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use defenra_config::{Issue, Reload, Snapshot};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpListener;

/// A document with one domain whose apex A record is `ip`.
pub(crate) fn doc_with_ip(ip: &str) -> String {
    format!(
        r#"{{"success":true,"timestamp":"{ip}","domains":[{{"domain":"example.com","dnsRecords":[{{"name":"@","type":"A","value":"{ip}"}}]}}]}}"#
    )
}

/// The apex A record of `example.com` in `snapshot`.
pub(crate) fn apex_ip(snapshot: &Snapshot) -> String {
    match &snapshot.domains[0].records[0].data {
        defenra_config::RecordData::A(ip) => ip.to_string(),
        other => panic!("unexpected record {other:?}"),
    }
}

/// What the fake Core answers.
#[derive(Clone)]
pub(crate) enum Answer {
    Json(String),
    Status(u16),
    Garbage,
    /// Never answers within any sane timeout.
    Hang,
}

/// One request the fake Core received.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) path: String,
    pub(crate) authorization: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) body: serde_json::Value,
}

/// A Core that answers `POST /api/agent/poll` with whatever it is told to.
pub(crate) struct FakeCore {
    pub(crate) addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeCore {
    pub(crate) async fn start(answer: Answer) -> FakeCore {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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

    pub(crate) fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub(crate) fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }

    pub(crate) fn received(&self) -> Vec<Received> {
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
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

/// A service that records what it was given and reports one issue per reload.
#[derive(Default)]
pub(crate) struct RecordingService {
    pub(crate) versions: Mutex<Vec<u64>>,
}

impl Reload for RecordingService {
    fn reload(&self, snapshot: &Arc<Snapshot>, issues: &mut Vec<Issue>) {
        self.versions.lock().push(snapshot.version);
        issues.push(Issue::new("domains[0].luaCode", "pretend syntax error"));
    }
}

/// Polls `condition` every 20 ms for up to 5 s.
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..250 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}
