//! Helpers for the end-to-end scenario: test origin, echo servers, DNS, HTTP and HTTPS
//! clients, certificates, GeoIP database.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A free loopback port (bound, then released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An origin that echoes the request line and Host, and streams `/stream` slowly.
pub(crate) async fn start_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let path = request.uri().path().to_owned();
                    if path == "/stream" {
                        // 10 chunks of 1 KiB, 200 ms apart.
                        let chunks = slow_chunks();
                        return Ok::<_, Infallible>(Response::new(http_body_util::Either::Right(
                            chunks,
                        )));
                    }
                    let host = request
                        .headers()
                        .get("host")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = format!("origin saw {} {path} host={host}", request.method());
                    Ok(Response::new(http_body_util::Either::Left(Full::new(
                        Bytes::from(body),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn slow_chunks() -> Channel<Bytes> {
    let (mut sender, body) = Channel::new(1);
    tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if sender
                .send_data(Bytes::from(vec![b'x'; 1024]))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    body
}

/// A TCP server that echoes everything back.
pub(crate) async fn start_tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    addr
}

/// A UDP server that echoes each datagram back, prefixed with `echo:`.
pub(crate) async fn start_udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65536];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buffer).await else {
                return;
            };
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buffer[..n]);
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    addr
}

pub(crate) async fn tcp_echo_through(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    stream.write_all(payload).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await??;
    Ok(reply)
}

pub(crate) async fn udp_echo_through(addr: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(addr).await.unwrap();
    let mut buffer = vec![0u8; 2048];
    for _ in 0..3 {
        socket.send(payload).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(700), socket.recv(&mut buffer)).await
        {
            return Some(buffer[..n].to_vec());
        }
    }
    None
}

/// Asks `server` for `name`'s A records, optionally with an ECS client subnet.
pub(crate) async fn dns_a(
    server: SocketAddr,
    name: &str,
    subnet: Option<&str>,
) -> (String, Vec<IpAddr>) {
    let mut query = Message::new(0x1234, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    if let Some(subnet) = subnet {
        edns.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(
                subnet.parse().unwrap(),
                24,
                0,
            )));
    }
    query.set_edns(edns);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bytes = query.to_vec().unwrap();
    let mut buffer = vec![0u8; 4096];
    for _ in 0..3 {
        socket.send_to(&bytes, server).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buffer)).await
        {
            let response = Message::from_vec(&buffer[..n]).unwrap();
            let rcode = format!("{:?}", response.metadata.response_code).to_uppercase();
            let ips = response
                .answers
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect();
            return (rcode, ips);
        }
    }
    panic!("no DNS answer for {name}");
}

/// One HTTP/1.1 GET through the agent: (status, `x-waf` header, body).
pub(crate) async fn http_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, Option<String>, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    exchange(TokioIo::new(stream), host, path).await
}

/// One HTTPS GET through the agent with SNI `host`, trusting `root`: (status, body, the
/// certificate the agent presented).
pub(crate) async fn https_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    roots: &[CertificateDer<'static>],
) -> Result<(u16, String, CertificateDer<'static>), String> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from(host.to_owned()).unwrap(), stream)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .cloned()
        .ok_or("no cert")?;
    let (status, _, body) = exchange(TokioIo::new(tls), host, path).await?;
    Ok((status, body, presented.into_owned()))
}

async fn exchange<T>(
    io: TokioIo<T>,
    host: &str,
    path: &str,
) -> Result<(u16, Option<String>, String), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let waf = response
        .headers()
        .get("x-waf")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, waf, String::from_utf8_lossy(&body).into_owned()))
}

/// A self-signed certificate for `names`: (cert PEM, key PEM, cert DER).
pub(crate) fn certificate(names: &[&str]) -> (String, String, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(
        names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    (
        certified.cert.pem(),
        certified.signing_key.serialize_pem(),
        certified.cert.der().clone(),
    )
}

/// A GeoIP database: 10.0.0.0/8 is Germany, 127.0.0.0/8 the United States.
pub(crate) fn geoip_db(path: &std::path::Path) {
    let mut writer = defenra_geo::mmdb_writer::MmdbWriter::new();
    writer.insert("10.0.0.0".parse().unwrap(), 8, Some("DE"), Some("EU"));
    writer.insert("127.0.0.0".parse().unwrap(), 8, Some("US"), Some("NA"));
    std::fs::write(path, writer.to_bytes()).unwrap();
}
