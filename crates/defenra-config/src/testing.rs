//! Test support for this crate's users: [`FakeCore`], a Defenra Core on a loopback port that
//! answers the routes an agent calls as the real Core's Next.js routes do.
//!
//! - `POST /api/agent/poll` answers whatever the test set ([`Answer`]). Once an agent is
//!   registered ([`FakeCore::add_agent`]) it first checks the credentials as Core does: 401
//!   without a Bearer header, 400 without `agentId`/`agentKey`, 404 for an unknown agent, 401
//!   for a wrong key.
//! - `GET /api/agent/connect/{token}`: 400 for an empty token, 404 for a token no agent holds
//!   (unknown, expired, or already used: Core clears it on first use), 409 for an agent that
//!   is already connected, else 200 with the credentials and the GeoDNS auto-assignment.
//! - `POST /api/statistics` and `POST /api/clients`: Core's validation and status codes (500
//!   for a body that is not JSON, 401 without a Bearer header, 400 for missing fields, 404 for
//!   an unknown agent, 500 where Mongoose cannot cast a value). The fake is stricter than Core
//!   in two ways, so that agent bugs show: the Bearer token must be the agent's key (401), and a
//!   report's `resourceId` must be the id of a domain or proxy in the document the fake serves
//!   (400).
//!
//! Enabled by the `testing` feature; never part of the agent binary.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};
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
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
}

/// An agent as Core's `Agent` model holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeAgent {
    pub agent_id: String,
    pub agent_key: String,
    /// The one-time connect token; cleared when it is used.
    pub connection_token: Option<String>,
    pub is_connected: bool,
    pub polling_interval: u64,
    /// The locations Core's auto-assignment derives from the agent's address.
    pub locations: Vec<String>,
    /// The address the connect request came from.
    pub ip_address: Option<IpAddr>,
}

/// One row Core's `TrafficStats` collection would get from `POST /api/statistics`.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficRow {
    pub agent_id: String,
    pub resource_type: String,
    pub resource_id: String,
    pub inbound_bytes: u64,
    pub outbound_bytes: u64,
    pub requests: u64,
    pub response_time_ms: f64,
    pub errors: u64,
}

/// One document of Core's `Client` collection, upserted by `POST /api/clients`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRow {
    pub agent_id: String,
    pub ip: String,
    pub user_agent: Option<String>,
    pub country: Option<String>,
    pub city: Option<String>,
    pub country_code: Option<String>,
    /// How many times the client was reported (`$inc: {connections: 1}`).
    pub connections: u64,
}

#[derive(Default)]
struct State {
    answer: Mutex<Option<Answer>>,
    received: Mutex<Vec<Received>>,
    agents: Mutex<Vec<FakeAgent>>,
    traffic: Mutex<Vec<TrafficRow>>,
    clients: Mutex<Vec<ClientRow>>,
    /// Routes told to fail, by path (`/api/statistics`), whatever the request.
    failing: Mutex<HashMap<String, Answer>>,
}

/// A Defenra Core on `127.0.0.1:0`; see the module documentation for its routes.
pub struct FakeCore {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl FakeCore {
    /// Starts the fake Core on `127.0.0.1:0`; polls get `answer`.
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
        let state = Arc::new(State {
            answer: Mutex::new(Some(answer)),
            ..State::default()
        });
        let task_state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&task_state);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(respond(request, peer, &state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeCore { addr, state }
    }

    /// The base URL, as `CORE_URL` takes it (with a trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The connect URL Core's "add agent" dialog would show for `token`.
    pub fn connect_url(&self, token: &str) -> String {
        format!("http://{}/api/agent/connect/{token}", self.addr)
    }

    /// What polls get from now on.
    pub fn set(&self, answer: Answer) {
        *self.state.answer.lock() = Some(answer);
    }

    /// Every request so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().clone()
    }

    /// Registers an agent as Core's "add agent" dialog creates it: not connected, holding
    /// `token`, polling every 60 s, auto-assigned to `europe`.
    pub fn add_agent(&self, agent_id: &str, agent_key: &str, token: &str) {
        self.state.agents.lock().push(FakeAgent {
            agent_id: agent_id.to_owned(),
            agent_key: agent_key.to_owned(),
            connection_token: Some(token.to_owned()),
            is_connected: false,
            polling_interval: 60,
            locations: vec!["europe".to_owned()],
            ip_address: None,
        });
    }

    /// Changes a registered agent (to mark it connected while it keeps its token, say).
    pub fn update_agent(&self, agent_id: &str, change: impl FnOnce(&mut FakeAgent)) {
        if let Some(agent) = self
            .state
            .agents
            .lock()
            .iter_mut()
            .find(|agent| agent.agent_id == agent_id)
        {
            change(agent);
        }
    }

    /// The registered agent `agent_id`, as Core holds it now.
    pub fn agent(&self, agent_id: &str) -> Option<FakeAgent> {
        self.state
            .agents
            .lock()
            .iter()
            .find(|agent| agent.agent_id == agent_id)
            .cloned()
    }

    /// Makes every request to `path` get `answer` (`None` restores the route).
    pub fn fail(&self, path: &str, answer: Option<Answer>) {
        let mut failing = self.state.failing.lock();
        match answer {
            Some(answer) => failing.insert(path.to_owned(), answer),
            None => failing.remove(path),
        };
    }

    /// The statistics rows accepted so far.
    pub fn traffic(&self) -> Vec<TrafficRow> {
        self.state.traffic.lock().clone()
    }

    /// The clients stored so far.
    pub fn clients(&self) -> Vec<ClientRow> {
        self.state.clients.lock().clone()
    }
}

/// A Core JSON answer: `NextResponse.json(body, {status})`.
fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: u16, message: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({ "error": message }))
}

async fn respond(
    request: Request<Incoming>,
    peer: SocketAddr,
    state: &State,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let method = request.method().clone();
    let (path, authorization, content_type) = (
        request.uri().path().to_owned(),
        header("authorization"),
        header("content-type"),
    );
    let bytes = request
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    // `None` is a body that is not JSON: `await request.json()` throws.
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    state.received.lock().push(Received {
        method: method.to_string(),
        path: path.clone(),
        authorization: authorization.clone(),
        content_type,
        body: body.clone().unwrap_or(Value::Null),
    });
    let failing = state.failing.lock().get(&path).cloned();
    if let Some(answer) = failing {
        return canned(answer).await;
    }
    let bearer = authorization
        .as_deref()
        .and_then(|value| value.strip_prefix("Bearer "));
    if let Some(token) = path.strip_prefix("/api/agent/connect/") {
        if method != Method::GET {
            return error(405, "Method Not Allowed");
        }
        return connect(state, token, peer.ip());
    }
    match (method, path.as_str()) {
        (Method::POST, "/api/statistics") => statistics(state, bearer, body),
        (Method::POST, "/api/clients") => clients(state, bearer, body),
        _ => poll(state, bearer, body).await,
    }
}

async fn canned(answer: Answer) -> Response<Full<Bytes>> {
    let (status, body) = match answer {
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

/// `POST /api/agent/poll`.
async fn poll(state: &State, bearer: Option<&str>, body: Option<Value>) -> Response<Full<Bytes>> {
    let checks_credentials = !state.agents.lock().is_empty();
    if checks_credentials {
        if bearer.is_none() {
            return error(401, "Missing or invalid authorization header");
        }
        let Some(body) = body else {
            return error(500, "Poll failed");
        };
        let (Some(agent_id), Some(agent_key)) =
            (truthy_str(&body["agentId"]), truthy_str(&body["agentKey"]))
        else {
            return error(400, "Missing agentId or agentKey");
        };
        let agents = state.agents.lock();
        let Some(agent) = agents.iter().find(|agent| agent.agent_id == agent_id) else {
            return error(404, "Agent not found");
        };
        if agent.agent_key != agent_key {
            return error(401, "Invalid agent key");
        }
    }
    let answer = state.answer.lock().clone().unwrap_or(Answer::Status(500));
    canned(answer).await
}

/// `GET /api/agent/connect/{token}`.
fn connect(state: &State, token: &str, peer: IpAddr) -> Response<Full<Bytes>> {
    if token.is_empty() {
        return error(400, "Invalid token");
    }
    let document = current_document(state);
    let mut agents = state.agents.lock();
    let Some(agent) = agents
        .iter_mut()
        .find(|agent| agent.connection_token.as_deref() == Some(token))
    else {
        return error(404, "Invalid or expired connection token");
    };
    if agent.is_connected {
        return error(409, "This connection token has already been used");
    }
    agent.is_connected = true;
    agent.ip_address = Some(peer);
    agent.connection_token = None;
    // autoAssignAgentToLocations: each location the address maps to, in each domain whose
    // GeoDNS config offers it.
    let domains = document["domains"].as_array().cloned().unwrap_or_default();
    let assigned_count = domains
        .iter()
        .map(|domain| {
            let offered = domain["geoDnsLocations"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            agent
                .locations
                .iter()
                .filter(|code| {
                    offered
                        .iter()
                        .any(|location| location["code"] == code.as_str())
                })
                .count()
        })
        .sum::<usize>();
    let mut auto_assignment = json!({
        "locations": agent.locations,
        "assignedCount": assigned_count,
    });
    if !agent.locations.is_empty() {
        auto_assignment["message"] = json!(format!(
            "Auto-assigned agent to {} across {} domain(s)",
            agent.locations.join(", "),
            domains.len()
        ));
    }
    json_response(
        200,
        json!({
            "success": true,
            "message": "Agent connected successfully",
            "config": {
                "agentId": agent.agent_id,
                "agentKey": agent.agent_key,
                "pollingInterval": agent.polling_interval,
                "apiEndpoint": "/api/agent/poll",
            },
            "autoAssignment": auto_assignment,
        }),
    )
}

/// `POST /api/statistics` with a Bearer header (the agent's branch of Core's route).
fn statistics(state: &State, bearer: Option<&str>, body: Option<Value>) -> Response<Full<Bytes>> {
    const FAILED: &str = "Failed to create statistics";
    // The route parses the body before it looks at the header.
    let Some(body) = body else {
        return error(500, FAILED);
    };
    let Some(bearer) = bearer else {
        return error(401, "Unauthorized");
    };
    let (Some(agent_id), Some(resource_type), Some(resource_id)) = (
        truthy_str(&body["agentId"]),
        truthy_str(&body["resourceType"]),
        truthy_str(&body["resourceId"]),
    ) else {
        return error(400, "agentId, resourceType и resourceId обязательны");
    };
    if resource_type != "proxy" && resource_type != "domain" {
        return error(400, "resourceType должен быть 'proxy' или 'domain'");
    }
    if let Some(response) = refuse_agent(state, &agent_id, bearer) {
        return response;
    }
    // Mongoose casts: resourceId to an ObjectId, the counts to Numbers.
    if !is_object_id(&resource_id) {
        return error(500, FAILED);
    }
    let number = |name: &str| -> Result<f64, ()> {
        match &body[name] {
            Value::Null => Ok(0.0),
            Value::Number(number) => number.as_f64().ok_or(()),
            Value::String(text) if text.trim().is_empty() => Ok(0.0),
            Value::String(text) => text.trim().parse().map_err(|_| ()),
            Value::Bool(false) => Ok(0.0),
            _ => Err(()),
        }
    };
    let counts: Result<Vec<f64>, ()> = [
        "inboundBytes",
        "outboundBytes",
        "requests",
        "responseTimeMs",
        "errors",
    ]
    .iter()
    .map(|name| number(name))
    .collect();
    let Ok(counts) = counts else {
        return error(500, FAILED);
    };
    let known_ids = resource_ids(&current_document(state), &resource_type);
    if !known_ids.contains(&resource_id) {
        return error(
            400,
            &format!(
                "resourceId {resource_id:?} is not the id of one of this Core's {resource_type}s"
            ),
        );
    }
    let row = TrafficRow {
        agent_id: agent_id.clone(),
        resource_type: resource_type.clone(),
        resource_id: resource_id.clone(),
        inbound_bytes: counts[0] as u64,
        outbound_bytes: counts[1] as u64,
        requests: counts[2] as u64,
        response_time_ms: counts[3],
        errors: counts[4] as u64,
    };
    state.traffic.lock().push(row);
    json_response(
        200,
        json!({ "stats": {
            "_id": "65f1c0ffee00000000000fff",
            "agentId": "65f1c0ffee00000000000aaa",
            "resourceType": resource_type,
            "resourceId": resource_id,
            "inboundBytes": counts[0],
            "outboundBytes": counts[1],
            "totalBytes": counts[0] + counts[1],
            "requests": counts[2],
            "responseTimeMs": counts[3],
            "errors": counts[4],
        }}),
    )
}

/// `POST /api/clients` with a Bearer header (the agent's branch of Core's route).
fn clients(state: &State, bearer: Option<&str>, body: Option<Value>) -> Response<Full<Bytes>> {
    // This route checks the header first and parses the body inside the agent's branch.
    let Some(bearer) = bearer else {
        return error(401, "Unauthorized");
    };
    let Some(body) = body else {
        return error(500, "Failed to update client");
    };
    let (Some(ip), Some(agent_id)) = (truthy_str(&body["ip"]), truthy_str(&body["agentId"])) else {
        return error(400, "ip and agentId are required");
    };
    if let Some(response) = refuse_agent(state, &agent_id, bearer) {
        return response;
    }
    let text = |name: &str| body[name].as_str().map(str::to_owned);
    let mut clients = state.clients.lock();
    let position = clients
        .iter()
        .position(|client| client.ip == ip && client.agent_id == agent_id);
    let client = match position {
        Some(index) => &mut clients[index],
        None => {
            clients.push(ClientRow {
                agent_id: agent_id.clone(),
                ip: ip.clone(),
                user_agent: None,
                country: None,
                city: None,
                country_code: None,
                connections: 0,
            });
            clients.last_mut().expect("just pushed")
        }
    };
    client.user_agent = text("userAgent");
    client.country = text("country");
    client.city = text("city");
    client.country_code = text("countryCode");
    client.connections += 1;
    json_response(
        200,
        json!({ "client": {
            "_id": "65f1c0ffee00000000000ccc",
            "ip": client.ip,
            "userAgent": client.user_agent,
            "country": client.country,
            "city": client.city,
            "countryCode": client.country_code,
            "connections": client.connections,
        }}),
    )
}

/// `Agent.findOne({agentId})`, plus the fake's own check of the Bearer key: the refusal
/// to answer with, if any.
fn refuse_agent(state: &State, agent_id: &str, bearer: &str) -> Option<Response<Full<Bytes>>> {
    let agents = state.agents.lock();
    let Some(agent) = agents.iter().find(|agent| agent.agent_id == agent_id) else {
        return Some(error(404, "Agent not found"));
    };
    (agent.agent_key != bearer).then(|| error(401, "Unauthorized"))
}

/// The document polls are answered with, or `null`.
fn current_document(state: &State) -> Value {
    match &*state.answer.lock() {
        Some(Answer::Json(json)) => serde_json::from_str(json).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// The `id`s of the document's `domains` (`resource_type` "domain") or `proxies`.
fn resource_ids(document: &Value, resource_type: &str) -> Vec<String> {
    let list = if resource_type == "domain" {
        &document["domains"]
    } else {
        &document["proxies"]
    };
    list.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A JavaScript-truthy string field (`!value` is false), as Core's checks read it.
fn truthy_str(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) if number.as_f64() != Some(0.0) => Some(number.to_string()),
        _ => None,
    }
}

/// What Mongoose casts to an ObjectId: 24 hexadecimal digits.
fn is_object_id(text: &str) -> bool {
    text.len() == 24 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}
