//! Test server, query builders and a one-line rendering of responses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use defenra_config::{Reload, SnapshotCell};
use defenra_dns::{Clock, DnsOptions, DnsService, DnsSockets, MonotonicClock};
use defenra_geo::GeoLookup;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A running DNS service; stops when dropped.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) service: Arc<DnsService>,
    pub(crate) cell: SnapshotCell,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestServer {
    pub(crate) async fn start(config: &str) -> TestServer {
        Self::start_with(config, None, DnsOptions::default()).await
    }

    pub(crate) async fn start_with(
        config: &str,
        geo: Option<Arc<dyn GeoLookup>>,
        options: DnsOptions,
    ) -> TestServer {
        Self::start_with_clock(config, geo, options, Arc::new(MonotonicClock::new())).await
    }

    /// A server whose rate limiter reads `clock`.
    pub(crate) async fn start_with_clock(
        config: &str,
        geo: Option<Arc<dyn GeoLookup>>,
        options: DnsOptions,
        clock: Arc<dyn Clock>,
    ) -> TestServer {
        let service = Arc::new(DnsService::new(geo, options).with_clock(clock));
        let sockets = DnsSockets::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = sockets.local_addr();
        let shutdown = CancellationToken::new();
        tokio::spawn(Arc::clone(&service).serve(sockets, shutdown.clone()));
        let server = TestServer {
            addr,
            service,
            cell: SnapshotCell::new(),
            shutdown,
        };
        server.load(config);
        server
    }

    /// Compiles `config`, publishes it and reloads the service; returns the issues.
    pub(crate) fn load(&self, config: &str) -> Vec<defenra_config::Issue> {
        let compiled = defenra_config::compile(config.as_bytes()).expect("test config compiles");
        let snapshot = self.cell.publish(compiled.snapshot);
        let mut issues = compiled.issues;
        self.service.reload(&snapshot, &mut issues);
        issues
    }

    /// Sends `query` over UDP and renders the answer.
    pub(crate) async fn udp(&self, query: &Message) -> Message {
        udp_exchange(self.addr, &query.to_vec().unwrap())
            .await
            .expect("an answer over udp")
    }

    pub(crate) async fn tcp(&self, query: &Message) -> Message {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let bytes = query.to_vec().unwrap();
        stream
            .write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&bytes).await.unwrap();
        read_tcp_message(&mut stream).await
    }

    /// `check(server, "www.example.com. A", "NOERROR aa | answer: ...")` over UDP.
    pub(crate) async fn check(&self, question: &str, expected: &str) {
        let response = self.udp(&query_text(question)).await;
        assert_eq!(render(&response), expected, "question {question}");
    }
}

/// Sends raw bytes over UDP; `None` when nothing comes back within 500 ms.
pub(crate) async fn udp_exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let raw = udp_raw(addr, bytes, Duration::from_millis(500)).await?;
    Some(Message::from_vec(&raw).expect("the server's answer parses"))
}

pub(crate) async fn udp_raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
        _ => None,
    }
}

pub(crate) async fn read_tcp_message(stream: &mut TcpStream) -> Message {
    let len = tokio::time::timeout(Duration::from_secs(2), stream.read_u16())
        .await
        .expect("tcp answer in time")
        .unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

/// A query for `"name TYPE"` with RD set, no EDNS.
pub(crate) fn query_text(question: &str) -> Message {
    let (name, kind) = question.rsplit_once(' ').expect("\"name TYPE\"");
    query(name, kind.parse().expect("a record type"))
}

pub(crate) fn query(name: &str, kind: RecordType) -> Message {
    let mut message = Message::new(0x5eed, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    message
}

/// Adds EDNS with `payload` and, when given, a client subnet.
pub(crate) fn with_edns(mut message: Message, payload: u16, subnet: Option<(&str, u8)>) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    if let Some((address, prefix)) = subnet {
        let address: IpAddr = address.parse().unwrap();
        edns.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(address, prefix, 0)));
    }
    message.set_edns(edns);
    message
}

/// `RCODE [aa] [tc] | answer: r; r | authority: r` with records as `name ttl TYPE data`.
pub(crate) fn render(message: &Message) -> String {
    let mut out = format!("{:?}", message.metadata.response_code).to_uppercase();
    if message.metadata.authoritative {
        out.push_str(" aa");
    }
    if message.metadata.truncation {
        out.push_str(" tc");
    }
    let section = |records: &[hickory_proto::rr::Record]| {
        records
            .iter()
            .map(|record| record.to_string().replacen(" IN ", " ", 1))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !message.answers.is_empty() {
        out.push_str(" | answer: ");
        out.push_str(&section(&message.answers));
    }
    if !message.authorities.is_empty() {
        out.push_str(" | authority: ");
        out.push_str(&section(&message.authorities));
    }
    out
}

/// The client subnet echoed in a response, as `(address, source, scope)`.
pub(crate) fn echoed_subnet(message: &Message) -> Option<(IpAddr, u8, u8)> {
    let edns = message.edns.as_ref()?;
    edns.options()
        .as_ref()
        .iter()
        .find_map(|(_, option)| match option {
            EdnsOption::Subnet(subnet) => {
                Some((subnet.addr(), subnet.source_prefix(), subnet.scope_prefix()))
            }
            _ => None,
        })
}

/// Polls `condition` every 10 ms for up to 2 s.
pub(crate) async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

pub(crate) const ZONE: &str = r#"{"domains":[{"domain":"example.com","dnsRecords":[
  {"name":"@","type":"A","value":"192.0.2.1","ttl":300},
  {"name":"@","type":"AAAA","value":"2001:db8::1","ttl":300},
  {"name":"@","type":"MX","value":"mail.example.com","priority":10,"ttl":300},
  {"name":"@","type":"TXT","value":"v=spf1 -all","ttl":300},
  {"name":"@","type":"CAA","value":"0 issue \"letsencrypt.org\"","ttl":300},
  {"name":"www","type":"A","value":"192.0.2.10","ttl":120},
  {"name":"www","type":"A","value":"192.0.2.11","ttl":120},
  {"name":"mail","type":"A","value":"192.0.2.20","ttl":300},
  {"name":"_sip._tcp","type":"SRV","value":"5 5060 sip.example.com.","priority":10,"ttl":300},
  {"name":"_xmpp._tcp","type":"SRV","value":"20 0 5222 xmpp.example.net","ttl":300},
  {"name":"alias","type":"CNAME","value":"www.example.com","ttl":300},
  {"name":"alias2","type":"CNAME","value":"alias.example.com.","ttl":300},
  {"name":"outside","type":"CNAME","value":"target.example.net","ttl":300},
  {"name":"dangling","type":"CNAME","value":"missing.example.com","ttl":300},
  {"name":"loop1","type":"CNAME","value":"loop2.example.com","ttl":300},
  {"name":"loop2","type":"CNAME","value":"loop1.example.com","ttl":300},
  {"name":"*.wild","type":"A","value":"192.0.2.30","ttl":300},
  {"name":"host.wild","type":"TXT","value":"real","ttl":300},
  {"name":"a.b.deep","type":"A","value":"192.0.2.40","ttl":300},
  {"name":"in.shop","type":"A","value":"192.0.2.99","ttl":300}
 ]},
 {"domain":"shop.example.com","dnsRecords":[
  {"name":"@","type":"A","value":"198.51.100.1","ttl":300},
  {"name":"in","type":"A","value":"198.51.100.2","ttl":300}
 ]}]}"#;
