//! rustls configuration: the SNI certificate resolver and server config for clients, and
//! the two client configs for HTTPS origins.

use std::fmt;
use std::io;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::route::RouteTable;

/// TLS versions offered to clients and origins: 1.2 and 1.3 only.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The ALPN protocols the HTTPS listener speaks, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The HTTPS listener's handshakes. Its resolver reads the route table each handshake, so
/// a reload changes certificates for new handshakes only; established connections keep the
/// session they negotiated.
///
/// A client that offers ALPN but none of our protocols would get rustls' fatal
/// `no_application_protocol` alert (RFC 7301 §3.2 allows it); nginx carries on without ALPN
/// and speaks HTTP/1.1, and so does this acceptor: it reads the ClientHello first and picks
/// a config without ALPN for such clients. Both configs share the resolver, the ticket key
/// and the session cache.
pub(crate) struct Acceptor {
    standard: Arc<ServerConfig>,
    without_alpn: Arc<ServerConfig>,
}

impl Acceptor {
    /// Runs the handshake on `io`.
    pub(crate) async fn accept<IO>(&self, io: IO) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let offers_none_of_ours = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| !offered.any(|protocol| ALPN.contains(&protocol)));
        let config = if offers_none_of_ours {
            &self.without_alpn
        } else {
            &self.standard
        };
        start.into_stream(Arc::clone(config)).await
    }
}

/// The acceptor for the HTTPS listener, certificates from `routes`.
pub(crate) fn acceptor(routes: Arc<ArcSwap<RouteTable>>) -> Acceptor {
    let resolver = Arc::new(CertResolver { routes });
    let builder = match ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
    {
        Ok(builder) => builder,
        // The ring provider supports both versions; this arm only guards a future provider
        // change, degrading to the library defaults instead of failing.
        Err(error) => {
            tracing::error!(%error, "TLS 1.2/1.3 not supported by the provider; using defaults");
            ServerConfig::builder()
        }
    };
    let mut config = builder.with_no_client_auth().with_cert_resolver(resolver);
    // Stateless resumption: the ticket key rotates every few hours inside rustls.
    match rustls::crypto::ring::Ticketer::new() {
        Ok(ticketer) => config.ticketer = ticketer,
        Err(error) => tracing::warn!(%error, "TLS session tickets disabled"),
    }
    let without_alpn = Arc::new(config.clone());
    config.alpn_protocols = ALPN.iter().map(|protocol| protocol.to_vec()).collect();
    Acceptor {
        standard: Arc::new(config),
        without_alpn,
    }
}

/// Picks the certificate of the domain that owns the SNI name: the exact host first, then
/// the nearest wildcard record. No SNI, an unknown name or a domain without certificate
/// refuses the handshake.
struct CertResolver {
    routes: Arc<ArcSwap<RouteTable>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = client_hello.server_name()?;
        let routes = self.routes.load();
        let route = routes.lookup(name)?;
        let tls = route.domain.tls.as_ref()?;
        Some(Arc::clone(&tls.certified_key))
    }
}

/// Client config for `full_strict` origins: certificates verified against the host name
/// with the webpki roots. HTTP/1.1 only (see docs/http.md).
pub(crate) fn verified_client() -> Arc<ClientConfig> {
    let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut config = client_builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Client config for `full` origins: any certificate is accepted (the origin commonly has
/// a self-signed one), but the handshake signatures are still checked.
pub(crate) fn unverified_client() -> Arc<ClientConfig> {
    let verifier = Arc::new(AcceptAnyCert {
        provider: provider(),
    });
    let mut config = client_builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn client_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    match ClientConfig::builder_with_provider(provider()).with_protocol_versions(VERSIONS) {
        Ok(builder) => builder,
        Err(error) => {
            tracing::error!(%error, "TLS 1.2/1.3 not supported by the provider; using defaults");
            ClientConfig::builder()
        }
    }
}

#[derive(Debug)]
struct AcceptAnyCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
